"""The training side of the comparisons: the loop every wrapper test runs, and a checkpoint round trip."""

from __future__ import annotations

import io
from typing import Any

import torch

from oracle import loss_fn


def run_wrapper(model: torch.nn.Module, wrapper: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The tutorial's wrapper loop: forward inside optim_context, then update_params."""
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)


def roundtrip(obj: Any) -> Any:
    """Save with torch.save and load back with weights_only=True, as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
