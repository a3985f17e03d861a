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


def read_hparams(log_dir: str | Path) -> tuple[dict[str, object], list[str]]:
    """The hparams TensorBoard's HPARAMS tab shows for the run in ``log_dir``, and its metrics' tags."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    session, experiment = HParamsPluginData(), HParamsPluginData()
    session.ParseFromString(content["_hparams_/session_start_info"])
    experiment.ParseFromString(content["_hparams_/experiment"])
    values = {
        name: getattr(value, value.WhichOneof("kind")) for name, value in session.session_start_info.hparams.items()
    }
    return values, [info.name.tag for info in experiment.experiment.metric_infos]
