"""Token-weighted accumulation (``num_items``): the argument checked, and a window's gradients divided by its items.

With ``update_params(loss, num_items=n)`` a micro-step's loss is the sum
over its ``n`` items; the wrapper sums the window's counts (on the device
for tensors, never read on the host) and, when the window ends, divides its
gradients by the total: the update of the mean loss over all its items.

Examples:
    >>> import torch
    >>> param = torch.nn.Parameter(torch.zeros(2))
    >>> param.grad = torch.tensor([6.0, 3.0])
    >>> divide_by_items([param], check_num_items(3, torch.device("cpu")))
    >>> param.grad
    tensor([2., 1.])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import checks, distributed


def check_num_items(num_items: Any, device: torch.device) -> int | torch.Tensor:
    """``num_items`` as a positive int, or a 0-d integer tensor on ``device`` (as int64; its value is not read).

    Examples:
        >>> check_num_items(0, torch.device("cpu"))  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        ValueError: num_items must be a positive int (the number of items the loss
        sums over), got 0
    """
    accepted = "a positive int or a 0-d integer tensor on the gradients' device"
    if isinstance(num_items, torch.Tensor):
        if (
            num_items.dim() != 0
            or num_items.is_floating_point()
            or num_items.is_complex()
            or num_items.dtype == torch.bool
        ):
            raise TypeError(
                f"num_items must be {accepted}, got a {str(num_items.dtype).removeprefix('torch.')} tensor of "
                f"shape {tuple(num_items.shape)}; count with an integer result, e.g. (labels != ignore_index).sum()"
            )
        if num_items.device != device:
            raise ValueError(
                f"num_items must be {accepted} ({device}), got a tensor on {num_items.device}; "
                f"count on {device}, or pass an int"
            )
        # a copy: the caller may reuse its tensor
        return num_items.detach().to(torch.int64, copy=True)
    if not checks.is_int(num_items):
        raise TypeError(f"num_items must be {accepted}, got {checks.describe(num_items)}")
    if num_items <= 0:
        raise ValueError(f"num_items must be a positive int (the number of items the loss sums over), got {num_items}")
    return num_items


def divide_by_items(params: Sequence[torch.Tensor], items: int | torch.Tensor) -> None:
    """Divide the window's gradients by its item count, summed over the ranks (one all-reduce).

    In a distributed run the gradients are the ranks' mean (DDP's and
    FSDP2's reduction), so the sum over ranks is the mean times the world
    size: the gradients are divided by ``total / world_size``, computed in
    their dtype (float64 gradients by a float64 divisor).
    """
    world = distributed.world_size()
    total = items if world == 1 else distributed.all_reduce_sum(items)
    if isinstance(total, torch.Tensor):  # a window of no items (all padding) has zero gradients: keep them zero
        total = total.clamp_min(1)
    divisors: dict[torch.dtype, Any] = {}  # total / world in each gradient dtype, at least float32's precision
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if world == 1:
            grad.div_(total)
            continue
        dtype = torch.promote_types(grad.dtype, torch.float32)
        if dtype not in divisors:
            divisors[dtype] = torch.as_tensor(total).to(dtype) / world
        grad.div_(divisors[dtype])
