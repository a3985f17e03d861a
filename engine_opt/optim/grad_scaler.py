"""Whether a ``GradScaler`` step was skipped, read on the device: the one place that uses its private state.

``torch.amp.GradScaler`` decides on the device whether to skip a step
(non-finite gradients) and says so only through the scale it lowers, which
``get_scale()`` reads on the host. Between ``step()`` and ``update()`` its
private ``_found_inf_per_device(optimizer)`` holds the decision as tensors;
fused optimizers step unconditionally, so whether ``optimizer.step`` ran says
nothing. Where that private method is missing, the fallback unscales the
gradients first and checks them itself (the same decision, made from the
same gradients). ``inverse_scale`` reads its private ``_scale`` tensor, for
clipping folded into a fused step (``clip_in_step``); where it is missing,
the gradients are unscaled as usual.

Examples:
    >>> import torch
    >>> param = torch.zeros(1, requires_grad=True)
    >>> optimizer = torch.optim.SGD([param], lr=0.1)
    >>> scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    >>> scaler.scale(param.sum() * float("inf")).backward()
    >>> def unscale():
    ...     scaler.unscale_(optimizer)
    >>> found_inf = step_reporting_skip(scaler, optimizer, {}, unscale)
    >>> scaler.update(); bool(found_inf), param.item()
    (True, 0.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .finite import grads_finite

_FOUND_INF = "_found_inf_per_device"  # torch.amp.GradScaler's, private
_SCALE = "_scale"  # torch.amp.GradScaler's, private: the scale tensor, on the device


def inverse_scale(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """``1 / scale`` as a tensor on the device, as ``unscale_`` computes it; ``None`` where it cannot be read.

    ``get_scale()`` would read the scale on the host; the private ``_scale``
    holds it on the device (from the first ``scale()`` on). ``None`` (the
    private name missing, or no loss scaled yet): the caller unscales as usual.

    Examples:
        >>> import torch
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        >>> loss = scaler.scale(torch.ones(()))
        >>> inverse_scale(scaler)
        tensor(0.2500)
    """
    scale = getattr(scaler, _SCALE, None)
    return scale.double().reciprocal().float() if isinstance(scale, torch.Tensor) else None


def step_reporting_skip(
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    step_kwargs: dict[str, Any],
    unscale: Callable[[], None],
) -> torch.Tensor:
    """Run ``scaler.step(optimizer, **step_kwargs)``; return a tensor that is non-zero if it skipped the step.

    ``unscale`` must unscale the gradients once per window (it is called
    only by the fallback). Nothing is read on the host.
    """
    read_found_inf = getattr(scaler, _FOUND_INF, None)
    if read_found_inf is None:
        unscale()
        found_inf = (~grads_finite(optimizer)).float()
        scaler.step(optimizer, **step_kwargs)
        return found_inf
    scaler.step(optimizer, **step_kwargs)
    flags = list(read_found_inf(optimizer).values())
    return flags[0] if len(flags) == 1 else torch.stack([flag.to(flags[0].device) for flag in flags]).sum()
