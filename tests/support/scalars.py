"""Scalars read back from what a logger wrote: TensorBoard's own reader, and float32 rounding to compare with."""

from __future__ import annotations

from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the TensorBoard event files in ``log_dir``: its (step, value) pairs in order."""
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def f32(value: float) -> float:
    """``value`` rounded to float32, as TensorBoard stores a scalar."""
    return torch.tensor(value, dtype=torch.float32).item()
