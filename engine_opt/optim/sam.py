"""Sharpness-aware minimisation (SAM) and adaptive SAM: the two-pass update a wrapper runs with ``sam=``.

The published algorithm (Foret et al., 2021; adaptive: Kwon et al., 2021), for
a batch's loss ``L`` and weights ``w``::

    g = grad L(w)                              # first pass: the caller's forward and backward
    e = rho * T(w)**2 * g / ||T(w) * g||_2     # T(w) = |w| (adaptive) or 1; the norm over all parameters
    g' = grad L(w + e)                         # second pass: the closure, at the perturbed weights
    w <- the optimizer's step from w with g'   # the weights are put back exactly (saved, not subtracted)

The norm is taken over every parameter with a gradient, as ``||T(w) g||``'s
per-parameter norms stacked and normed again, and ``rho / (norm + 1e-12)``
scales each parameter's term.

Examples:
    >>> import torch
    >>> param = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> param.grad = torch.tensor([3.0, 4.0])
    >>> perturbation = SharpnessAware(rho=0.5).perturb([param])
    >>> param.detach()
    tensor([3.3000, 4.4000])
    >>> perturbation.restore()
    >>> param.detach()
    tensor([3., 4.])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import checks

_EPSILON = 1e-12
"""Added to the norm, as the published implementations do, so a zero gradient perturbs by zero."""


@dataclass(frozen=True)
class SharpnessAware:
    """SAM's settings: the radius ``rho`` of the perturbation, and whether it scales by the weights (adaptive).

    Args:
        rho: The perturbation's radius, a positive finite number (SAM's
            paper: 0.05 for SGD on CIFAR; adaptive SAM takes larger ones, 0.5 to 2).
        adaptive: Scale the perturbation by ``|w|`` (adaptive SAM), so it does
            not depend on how each layer's weights are scaled.
    """

    rho: float = 0.05
    adaptive: bool = False

    def __post_init__(self) -> None:
        rho = self.rho
        if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
            raise TypeError(f"sam['rho'] must be a positive finite number, got {checks.describe(rho)}")
        if not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"sam['rho'] must be a positive finite number, got {rho!r}")
        object.__setattr__(self, "rho", float(rho))
        checks.flag("sam['adaptive']", self.adaptive)

    @classmethod
    def parse(cls, sam: Any) -> SharpnessAware | None:
        """SAM's settings from ``None``, a ``SharpnessAware`` or a config ``dict(rho=..., adaptive=...)``.

        Examples:
            >>> SharpnessAware.parse(dict(rho=0.1))
            SharpnessAware(rho=0.1, adaptive=False)
            >>> SharpnessAware.parse(dict(radius=0.1))
            Traceback (most recent call last):
            ...
            ValueError: sam got unknown key(s) ['radius']; accepted: ['adaptive', 'rho']
        """
        if sam is None or isinstance(sam, SharpnessAware):
            return sam
        if not isinstance(sam, Mapping):
            raise TypeError(
                f"sam must be None or a dict such as dict(rho=0.05, adaptive=False), got {checks.describe(sam)}"
            )
        checks.known_keys("sam", sam, ["adaptive", "rho"])
        return cls(rho=sam.get("rho", cls.rho), adaptive=sam.get("adaptive", cls.adaptive))

    def perturb(self, params: Sequence[torch.Tensor]) -> Perturbation:
        """Move each parameter with a gradient by its share of ``e``, computed from those gradients; how to undo it."""
        moved = [param for param in params if param.grad is not None]
        with torch.no_grad():
            if not moved:
                return Perturbation([], [], torch.zeros(()))
            grads: list[torch.Tensor] = [param.grad for param in moved]  # type: ignore[misc]
            weighted = [grad * param.abs() if self.adaptive else grad for param, grad in zip(moved, grads, strict=True)]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(term) for term in weighted]))
            scale = self.rho / (norm + _EPSILON)
            saved = [param.detach().clone() for param in moved]
            for param, grad in zip(moved, grads, strict=True):
                param.add_(param.pow(2) * grad * scale if self.adaptive else grad * scale)
        return Perturbation(moved, saved, norm)


class Perturbation:
    """Parameters moved by ``SharpnessAware.perturb``, their weights before, and the first pass's gradient norm."""

    def __init__(self, params: list[torch.Tensor], saved: list[torch.Tensor], norm: torch.Tensor) -> None:
        self.params = params
        self.saved = saved
        self.norm = norm

    def restore(self) -> None:
        """Put the weights back exactly as they were (copied back, not the perturbation subtracted)."""
        with torch.no_grad():
            for param, weight in zip(self.params, self.saved, strict=True):
                param.copy_(weight)

    def carry_overflow(self, params: Sequence[torch.Tensor]) -> None:
        """Make the second pass's gradients non-finite where the first pass's were, on the device.

        A float16 scaler then sees one overflow, skips one update and lowers its
        scale once, whichever pass overflowed; finite gradients are multiplied by 1.
        """
        grad = next((param.grad for param in params if param.grad is not None), None)
        if grad is not None:
            grad.mul_(torch.where(torch.isfinite(self.norm), 1.0, torch.nan).to(grad.dtype))


def check_unsharded(params: Sequence[torch.Tensor]) -> None:
    """Refuse sharded parameters (FSDP2's ``DTensor``): their first-pass gradients are not local to perturb by."""
    if any(hasattr(param, "full_tensor") for param in params):
        raise ValueError(
            "sam: the parameters are sharded (FSDP2): SAM perturbs each rank's weights by its own first-pass "
            "gradient, which a sharded model does not keep unreduced; use DistributedDataParallel, or no sam"
        )


__all__ = ["Perturbation", "SharpnessAware", "check_unsharded"]
