"""write_scalars: the values read back by TensorBoard's own reader, one event per log while the writer is open."""

from __future__ import annotations

import builtins

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch.utils.tensorboard import SummaryWriter

from engine_opt.handlers.tensorboard_writer import write_hparams, write_scalars

from scalars import f32, read_scalars


def values_per_event(log_dir):
    return [
        len(event.summary.value)
        for path in sorted(log_dir.iterdir())
        for event in EventFileLoader(str(path)).Load()
        if event.HasField("summary")
    ]


def test_each_log_is_one_event_and_a_closed_writer_still_logs(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    write_scalars(writer, {"lr": 0.5, "momentum": 0.25}, step=1)
    write_scalars(writer, {"lr": 0.125, "momentum": 0.25}, step=2)
    writer.close()  # torch's writer drops its file writer; add_scalar opens a new one
    write_scalars(writer, {"lr": 0.0625, "momentum": 0.5}, step=3)
    writer.close()
    assert read_scalars(tmp_path) == {
        "lr": [(1, 0.5), (2, 0.125), (3, 0.0625)],
        "momentum": [(1, 0.25), (2, 0.25), (3, 0.5)],
    }
    assert values_per_event(tmp_path) == [2, 2, 1, 1]


def test_without_tensorboards_records_it_writes_one_event_per_scalar(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_summary_proto(name, *args, **kwargs):
        if name == "tensorboard.compat.proto.summary_pb2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    writer = SummaryWriter(str(tmp_path))
    monkeypatch.setattr(builtins, "__import__", no_summary_proto)
    write_scalars(writer, {"a": 1.0, "b": 2.0}, step=7)
    monkeypatch.undo()
    writer.close()
    assert read_scalars(tmp_path) == {"a": [(7, 1.0)], "b": [(7, 2.0)]}
    assert values_per_event(tmp_path) == [1, 1]


@pytest.mark.parametrize("value", [0.1, 1e-8, 3e4])
def test_values_are_stored_as_float32(tmp_path, value):
    writer = SummaryWriter(str(tmp_path))
    write_scalars(writer, {"x": value}, step=0)
    writer.close()
    assert read_scalars(tmp_path)["x"] == [(0, f32(value))]


def test_hparams_are_in_the_runs_own_file_and_the_end_only_when_the_run_ended_well(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def hparams_tags():
        writer.flush()
        accumulator = EventAccumulator(str(tmp_path))
        accumulator.Reload()
        return sorted(accumulator.PluginTagToContent("hparams"))

    writer = SummaryWriter(str(tmp_path))
    write_hparams(writer, {"lr": 0.1, "optimizer": "SGD", "nesterov": True}, ["train/loss"])
    assert hparams_tags() == ["_hparams_/experiment", "_hparams_/session_start_info"]  # a crash now: no end
    write_hparams(writer, {}, [], ended=True)
    assert hparams_tags() == ["_hparams_/experiment", "_hparams_/session_end_info", "_hparams_/session_start_info"]
    writer.close()
    assert [path for path in tmp_path.iterdir() if path.is_dir()] == []  # no second run in a sub-directory
