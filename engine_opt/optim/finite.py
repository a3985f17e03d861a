"""``all_finite``: whether tensors hold only finite values, decided on the device (no host read).

Examples:
    >>> import torch
    >>> bool(all_finite([torch.ones(2), torch.tensor([1.0, float("inf")])]))
    False
"""

from __future__ import annotations

import torch


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor, on the first tensor's device: every element of every tensor is finite."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    device = tensors[0].device
    return torch.stack([torch.isfinite(tensor).all().to(device) for tensor in tensors]).all()


def grads_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """``all_finite`` of the gradients of ``optimizer``'s parameters (true when there are none)."""
    return all_finite(
        [param.grad for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
    )
