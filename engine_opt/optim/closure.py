"""Closures for optimizers that re-evaluate the model during their step (``torch.optim.LBFGS``).

The closure is torch's: it zeroes the gradients, evaluates the model on the
batch, runs backward and returns the loss. ``Reevaluation`` is what the
wrapper hands to ``optimizer.step``: each evaluation's gradients are clipped
as the wrapper's other gradients are, and the first one can be the loss and
gradients the wrapper already has (``update_params(loss, closure=...)``), so
the model is evaluated as many times as in torch's own loop.

Examples:
    >>> import torch
    >>> param = torch.nn.Parameter(torch.ones(1))
    >>> def closure():
    ...     param.grad = None
    ...     loss = (param * 3).sum()
    ...     loss.backward()
    ...     return loss
    >>> evaluate = Reevaluation(closure, clip=None)
    >>> evaluate().item(), param.grad.item()
    (3.0, 3.0)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from . import checks

Closure = Callable[[], Any]
"""torch's closure: zero the gradients, evaluate the model, backward, return the loss."""


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` cannot be called without a closure (LBFGS's ``step(closure)``).

    Examples:
        >>> needs_closure(torch.optim.LBFGS([torch.zeros(1, requires_grad=True)]))
        True
        >>> needs_closure(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
        False
    """
    try:
        parameter = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read: it does not say it needs one
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def check_closure(closure: Any) -> Closure:
    """``closure`` if it can be called with no argument; a ``TypeError`` naming it otherwise."""
    if not callable(closure):
        raise TypeError(
            "closure must be callable with no argument, zeroing the gradients, evaluating the model, running "
            f"backward and returning the loss (torch's closure), got {checks.describe(closure)}"
        )
    checked: Closure = closure
    return checked


class Reevaluation:
    """The closure ``optimizer.step`` calls: ``closure``, then the wrapper's clipping of the new gradients.

    Args:
        closure: torch's closure.
        clip: Clips the parameters' gradients (the wrapper's ``clip_grad``), or ``None``.
        first: The loss of the model as it is, with its gradients already in
            place and clipped: the first call returns it instead of evaluating.
    """

    def __init__(self, closure: Closure, clip: Callable[[], object] | None, first: torch.Tensor | None = None) -> None:
        self.closure = closure
        self.clip = clip
        self.first = first

    def __call__(self) -> Any:
        if self.first is not None:
            loss, self.first = self.first, None
            return loss
        loss = self.closure()
        if self.clip is not None:
            self.clip()
        return loss


__all__ = ["Closure", "Reevaluation", "check_closure", "needs_closure"]
