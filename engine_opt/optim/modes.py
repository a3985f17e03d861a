"""Optimizers with a train and an eval mode (schedule-free): which they are, and switching them.

A schedule-free optimizer (the ``schedulefree`` package, pytorch-optimizer's
variants) trains at one point and means another: ``optimizer.train()`` puts
the parameters where the gradients are taken, ``optimizer.eval()`` where the
model is meant to be evaluated and saved. ``OptimWrapper.train()``/``eval()``
and ``OptimWrapperDict``'s call these; ``create_trainer`` and the checkpoint
handlers call them where it matters.

Example:
    >>> import torch
    >>> has_modes(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    False
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def has_modes(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` has ``train()`` and ``eval()`` (a schedule-free optimizer)."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def in_train_mode(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is in train mode (its groups' ``'train_mode'``, as schedule-free keeps it; True
    for an optimizer that does not say)."""
    groups = optimizer.param_groups
    return bool(groups[0].get("train_mode", True)) if groups else True


def set_mode(optimizer: torch.optim.Optimizer, train: bool) -> None:
    """``optimizer.train()`` or ``optimizer.eval()``, where it has them."""
    if has_modes(optimizer):
        getattr(optimizer, "train" if train else "eval")()


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
