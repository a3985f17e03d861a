"""``GradClipper``: the ``clip_grad`` argument, checked once, applied once per window.

Examples:
    >>> import torch
    >>> clipper = GradClipper.parse(dict(max_norm=1.0))
    >>> param = torch.zeros(2, requires_grad=True)
    >>> param.grad = torch.tensor([3.0, 4.0])
    >>> clipper.clip([param]), param.grad
    (tensor(5.), tensor([0.6000, 0.8000]))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import checks
from .distributed import replicated_value

# For each type: the argument it needs, and those it accepts.
_CLIP_ARGS = {
    "norm": ("max_norm", ("max_norm", "norm_type", "error_if_nonfinite", "foreach")),
    "value": ("clip_value", ("clip_value", "foreach")),
}


def _positive(name: str, value: Any, allow_inf: bool) -> None:
    """A number > 0 (a negative max_norm would flip every gradient; a negative clip_value, set them all)."""
    checks.number(name, value, "a number > 0")
    if not (value > 0 and (allow_inf or math.isfinite(value))):
        accepted = "a number > 0 (inf to measure the norm without clipping)" if allow_inf else "a finite number > 0"
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


@dataclass(frozen=True)
class GradClipper:
    """Clipping by norm (``clip_grad_norm_``) or by value (``clip_grad_value_``).

    Attributes:
        type: ``'norm'`` or ``'value'``.
        kwargs: The arguments of the torch function (without ``type`` and ``fold_into_step``).
        fold_into_step: ``clip_grad['fold_into_step']``: the clipping (and a float16 unscaling) done by a
            fused optimizer's step (``clip_in_step``); default ``False``.
    """

    type: str
    kwargs: dict[str, Any]
    fold_into_step: bool = False

    @classmethod
    def parse(cls, clip_grad: Any) -> GradClipper | None:
        """Check ``clip_grad`` (``None`` or a dict) without touching the caller's dict."""
        if clip_grad is None:
            return None
        kwargs = dict(checks.mapping("clip_grad", clip_grad))
        clip_type = kwargs.pop("type", "norm")
        fold = checks.flag("clip_grad['fold_into_step']", kwargs.pop("fold_into_step", False))
        if clip_type not in _CLIP_ARGS:
            raise ValueError(f"clip_grad['type'] must be one of {sorted(_CLIP_ARGS)}, got {clip_type!r}")
        required, accepted = _CLIP_ARGS[clip_type]
        checks.known_keys(f"clip_grad (type {clip_type!r})", kwargs, ("type", "fold_into_step", *accepted))
        if required not in kwargs:
            raise ValueError(
                f"clip_grad of type {clip_type!r} needs {required!r}, got {dict(clip_grad)!r}; "
                f"for example dict(type={clip_type!r}, {required}=1.0)"
            )
        _positive("clip_grad['max_norm']", kwargs.get("max_norm", 1.0), allow_inf=True)  # inf: measure, not clip
        _positive("clip_grad['clip_value']", kwargs.get("clip_value", 1.0), allow_inf=False)
        if kwargs.get("norm_type", 2.0) not in ("inf", "-inf"):
            _positive("clip_grad['norm_type']", kwargs.get("norm_type", 2.0), allow_inf=True)
        if "error_if_nonfinite" in kwargs:
            checks.flag("clip_grad['error_if_nonfinite']", kwargs["error_if_nonfinite"])
        if kwargs.get("foreach") is not None:
            checks.flag("clip_grad['foreach']", kwargs["foreach"])
        return cls(clip_type, kwargs, fold)

    def clip(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """Clip the gradients of ``params`` in place; return the total norm before clipping (norm type only)."""
        if self.type == "norm":  # FSDP2: the global norm over every shard, as one tensor on each rank
            return replicated_value(nn.utils.clip_grad_norm_(params, **self.kwargs))
        nn.utils.clip_grad_value_(params, **self.kwargs)
        return None

    def as_config(self) -> Mapping[str, Any]:
        """The ``clip_grad`` dict this clipper was parsed from, with its type made explicit."""
        fold = {"fold_into_step": True} if self.fold_into_step else {}
        return {"type": self.type, **self.kwargs, **fold}
