"""Optimizers with a train and an eval mode (schedule-free): which they are, and switching them.

A schedule-free optimizer (the ``schedulefree`` package, pytorch-optimizer's
variants) trains at one point and means another: ``optimizer.train()`` puts
the parameters where the gradients are taken, ``optimizer.eval()`` where the
model is meant to be evaluated and saved. ``OptimWrapper.train()``/``eval()``
and ``OptimWrapperDict``'s call these; ``create_trainer`` and the checkpoint
handlers call them where it matters.

Examples:
    >>> import torch
    >>> has_modes(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    False
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from .distributed import state_holder


def has_modes(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` (a ``ZeroRedundancyOptimizer``'s inner one) has ``train()`` and ``eval()``."""
    inner = state_holder(optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def in_train_mode(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is in train mode: its groups' ``'train_mode'`` (the ``schedulefree`` package's), or
    its own ``train_mode`` attribute (pytorch-optimizer's wrapper); True for one that says neither."""
    inner = state_holder(optimizer)
    groups = inner.param_groups
    if groups and "train_mode" in groups[0]:
        return bool(groups[0]["train_mode"])
    return bool(getattr(inner, "train_mode", True))


def set_mode(optimizer: torch.optim.Optimizer, train: bool) -> None:
    """``optimizer.train()`` or ``optimizer.eval()`` (a ZeRO optimizer's inner one's), where it has them."""
    if has_modes(optimizer):
        getattr(state_holder(optimizer), "train" if train else "eval")()


@contextlib.contextmanager
def eval_mode(optimizers: Iterable[torch.optim.Optimizer]) -> Iterator[None]:
    """The optimizers in eval mode while the block runs, then each in the mode it was in."""
    switched = [optimizer for optimizer in optimizers if has_modes(optimizer) and in_train_mode(optimizer)]
    for optimizer in switched:
        set_mode(optimizer, train=False)
    try:
        yield
    finally:
        for optimizer in switched:
            set_mode(optimizer, train=True)


__all__ = ["eval_mode", "has_modes", "in_train_mode", "set_mode"]
