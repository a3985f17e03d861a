"""attach_sharded_checkpoint in one process: exact resume, saves between windows, rotation, crashes at every stage.

Runs of 2 and more processes (FSDP2, resharding) are in tests/test_distributed.py.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from ignite.engine import Events
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from engine_opt import OptimWrapper, OptimWrapperDict, create_trainer
from engine_opt.checkpoint import (
    attach_sharded_checkpoint,
    latest_checkpoint,
    load_sharded_checkpoint,
    resume_from_latest,
    sharded,
)
from engine_opt.checkpoint.run_directory import RunDirectory
from engine_opt.engine import ResumableLoader

from crashes import Crash
from oracle import OPTIMIZERS, Plan, assert_same_tensors, loss_fn, make_batches, make_model, plain_loop

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
BATCHES = 10
ACCUMULATE = 2


class ShardedParameter(torch.nn.Parameter):
    """A parameter that calls itself sharded, as FSDP2's DTensors do: its window's gradients are not the wrapper's."""

    def full_tensor(self):
        return self


def shard(model):
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, ShardedParameter(param.detach().clone()))
    return model


def build(directory, every=3, n_saved=2, async_save=False, sharded=False):
    """A run of the trainer over the oracle's batches, resumed from ``directory``'s newest checkpoint if any."""
    model = shard(make_model()) if sharded else make_model()
    wrapper = OptimWrapper(OPTIMIZERS["adamw"](model.parameters()), accumulative_counts=ACCUMULATE)
    trainer = create_trainer(model, wrapper, loss_fn)
    data = ResumableLoader(make_batches(BATCHES))
    to_save = {"model": model, "optim_wrapper": wrapper, "trainer": trainer, "data": data}
    resume_from_latest(to_save, directory)
    checkpoint = attach_sharded_checkpoint(
        trainer, to_save, directory, every=every, n_saved=n_saved, async_save=async_save
    )
    return trainer, data, model, checkpoint


def expected_params():
    model = make_model()
    plain_loop(model, OPTIMIZERS["adamw"](model.parameters()), make_batches(BATCHES), Plan(accumulate=ACCUMULATE))
    return list(model.parameters())


def stop_at(trainer, iteration):
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), lambda engine: engine.terminate())


def names(directory):
    return sorted(path.name for path in Path(directory).iterdir() if not path.name.startswith(".engine_opt"))


@pytest.mark.parametrize("async_save", [False, True])
def test_a_run_stopped_mid_window_and_resumed_from_its_sharded_checkpoint_ends_bitwise_as_the_plain_loop(
    tmp_path, async_save
):
    trainer, data, _, checkpoint = build(tmp_path, async_save=async_save)
    stop_at(trainer, 7)
    trainer.run(data, max_epochs=1)
    assert names(tmp_path) == ["checkpoint_6", "checkpoint_7"]  # 7: the run's end, mid-window
    assert checkpoint.last_checkpoint == tmp_path / "checkpoint_7"
    trainer, data, model, _ = build(tmp_path, async_save=async_save)
    assert trainer.state.iteration == 7
    trainer.run(data, max_epochs=1)
    assert_same_tensors(list(model.parameters()), expected_params())
    assert names(tmp_path) == ["checkpoint_10", "checkpoint_9"]


def test_a_save_of_sharded_parameters_asked_mid_window_waits_for_the_windows_end(tmp_path):
    trainer, data, _, _ = build(tmp_path, sharded=True)
    stop_at(trainer, 7)
    with pytest.warns(RuntimeWarning, match="part-way through an accumulation window.*the newest is of 6"):
        trainer.run(data, max_epochs=1)
    assert names(tmp_path) == ["checkpoint_4", "checkpoint_6"]  # asked at 3 and 6: the one at 3 waited for 4
    trainer, data, model, _ = build(tmp_path, sharded=True)
    assert trainer.state.iteration == 6
    trainer.run(data, max_epochs=1)
    assert_same_tensors([param.detach() for param in model.parameters()], expected_params())
    assert names(tmp_path) == ["checkpoint_10", "checkpoint_6"]  # asked at 9: waited for the window to end at 10


def test_saves_asked_at_every_iteration_of_sharded_parameters_write_each_windows_end_once(tmp_path, monkeypatch):
    written = []
    real_save = sharded.save_sharded

    def counted(layout, directory, **kwargs):
        written.append(int(directory.name.split(".")[1].removeprefix("checkpoint_")))  # .checkpoint_4.{pid}.partial
        return real_save(layout, directory, **kwargs)

    monkeypatch.setattr(sharded, "save_sharded", counted)
    trainer, data, model, _ = build(tmp_path, every=1, n_saved=None, sharded=True)
    trainer.run(data, max_epochs=1)
    assert written == list(
        range(ACCUMULATE, BATCHES + 1, ACCUMULATE)
    )  # asked at every iteration, written once a window
    assert_same_tensors([param.detach() for param in model.parameters()], expected_params())


def test_a_save_waiting_for_windows_that_never_end_together_says_so(tmp_path):
    gan = {name: shard(make_model(seed)) for seed, name in enumerate(("gen", "disc"))}
    wrappers = OptimWrapperDict(
        **{
            name: OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
            for name, model in gan.items()
        }
    )

    def train_step(engine, batch):  # the generator begins one iteration after the discriminator
        for name, model in gan.items():
            if name == "disc" or engine.state.iteration > 1:
                wrappers[name].update_params(model(batch[0]).square().mean())

    trainer = create_trainer(gan["gen"], wrappers, train_step=train_step)
    attach_sharded_checkpoint(trainer, {**gan, "optim": wrappers}, tmp_path, every=2)
    with pytest.warns(RuntimeWarning, match="asked for at iteration 2 still waits.*never end together") as caught:
        trainer.run(make_batches(8), max_epochs=1)
    assert names(tmp_path) == []
    assert "none was written" in str(caught[-1].message)


def test_an_asynchronous_save_holds_the_state_of_its_iteration_while_training_goes_on(tmp_path):
    trainer, data, model, checkpoint = build(tmp_path, every=2, n_saved=None, async_save=True)
    at_save = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(every=2),
        lambda engine: at_save.update({engine.state.iteration: copy.deepcopy(model.state_dict())}),
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=2), lambda engine: torch.nn.init.zeros_(model[0].weight))
    trainer.run(data, max_epochs=1)
    assert checkpoint.last_checkpoint == tmp_path / "checkpoint_10"
    for iteration in (2, 4, 6, 8, 10):  # each written while the next iterations zeroed a weight and trained
        fresh = make_model(seed=9)
        load_sharded_checkpoint({"model": fresh}, tmp_path / f"checkpoint_{iteration}")
        assert_same_tensors(fresh.state_dict(), at_save[iteration], f"iteration {iteration}")


def crash_stage(stage):
    """Patch one step of a sharded save to die there (``Crash``: nothing catches it, as nothing catches SIGKILL)."""

    def die(*args, **kwargs):
        raise Crash(stage)

    targets = {
        "objects": (torch, "save"),
        "shards": (FileSystemWriter, "write_data"),
        "metadata": (FileSystemWriter, "finish"),
        "rename": (os, "replace"),
        "rotate": (shutil, "rmtree"),
    }
    return mock.patch.object(*targets[stage], die)


@pytest.mark.parametrize("stage", ["objects", "shards", "metadata", "rename", "rotate"])
def test_a_crash_at_any_stage_of_a_save_leaves_the_last_good_checkpoint_newest(tmp_path, stage):
    trainer, data, _, _ = build(tmp_path, every=2, n_saved=1)
    stop_at(trainer, 4)
    trainer.run(data, max_epochs=1)
    assert names(tmp_path) == ["checkpoint_4"]
    trainer, data, _, _ = build(tmp_path, every=2, n_saved=1)
    with crash_stage(stage), pytest.raises((Crash, CheckpointException)):  # DCP passes on its ranks' crashes
        trainer.run(data, max_epochs=1)
    newest = latest_checkpoint(tmp_path)
    assert newest is not None
    # a crash after the rename leaves the new checkpoint, complete; before it, the old one
    assert newest.name == ("checkpoint_6" if stage == "rotate" else "checkpoint_4")
    trainer, data, model, _ = build(tmp_path, every=2, n_saved=1)  # loads it; its start removes what the crash left
    trainer.run(data, max_epochs=1)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
    assert names(tmp_path) == ["checkpoint_10"]
    assert_same_tensors(list(model.parameters()), expected_params())


def test_rotation_keeps_n_saved_and_never_touches_other_entries(tmp_path):
    (tmp_path / "best_checkpoint_30.pt").write_bytes(b"mine")
    (tmp_path / "notes").mkdir()
    trainer, data, _, _ = build(tmp_path, every=2, n_saved=3)
    trainer.run(data, max_epochs=1)
    assert names(tmp_path) == ["best_checkpoint_30.pt", "checkpoint_10", "checkpoint_6", "checkpoint_8", "notes"]
    assert [step for step, _ in RunDirectory(tmp_path).checkpoints()] == [6, 8, 10]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every": 0}, ValueError, "every must be"),
        ({"n_saved": -1}, ValueError, "n_saved must be"),
        ({"async_save": "yes"}, TypeError, "async_save must be a bool, got 'yes'"),
        ({"dirname": 3}, TypeError, "dirname must be a str or a path, got 3 of type int"),
        ({"trainer": None}, TypeError, "trainer must be an Ignite Engine .*got None"),
        ({"to_save": {"x": 5}}, TypeError, r"to_save\['x'\] must have state_dict and load_state_dict methods, got 5"),
        ({"to_save": [1]}, TypeError, "to_save must be a dict, got"),
        ({"async_save": 1, "dirname": 3}, TypeError, "async_save must be a bool, got 1"),  # in the order of before
    ],
)
def test_bad_arguments_are_refused_by_name(tmp_path, kwargs, error, message):
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    arguments = {
        "trainer": create_trainer(model, wrapper, loss_fn),
        "to_save": {"model": model, "optim_wrapper": wrapper},
        "dirname": tmp_path,
        **kwargs,
    }
    with pytest.raises(error, match=message):
        attach_sharded_checkpoint(**arguments)


@pytest.mark.parametrize(
    ("load", "message"),
    [
        (lambda path: load_sharded_checkpoint({"model": make_model()}, 5), "path must be a str or a path, got 5"),
        (lambda path: load_sharded_checkpoint([make_model()], path), "to_load must be a dict"),
        (lambda path: resume_from_latest([make_model()], path), "to_load must be a dict"),
    ],
)
def test_bad_arguments_of_a_load_are_refused_by_name(tmp_path, load, message):
    with pytest.raises(TypeError, match=message):
        load(tmp_path)
