"""attach_checkpoint and resume_from_latest: files, the newest checkpoint, exact resume (in new processes too)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import filelock
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ignite.engine import Engine, Events
from resume_worker import build

from engine_opt import OptimWrapper, create_trainer
from engine_opt.checkpoint import attach_checkpoint, latest_checkpoint, resume_from_latest
from engine_opt.checkpoint.durable import DurableCheckpoint
from engine_opt.checkpoint.run_directory import RunDirectory, RunDirectoryBusy
from engine_opt.engine import ResumableLoader

from crashes import RENAMED, STAGES, Crash, crash_at
from oracle import assert_same_tensors, loss_fn, make_batches, make_model

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "support" / "resume_worker.py"


def run_worker(config, checkpoint_dir, output, kill_at=None, extra=()):
    args = [sys.executable, str(WORKER), config, str(checkpoint_dir), str(output), *extra]
    if kill_at is not None:
        args.append(str(kill_at))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == (3 if kill_at is not None else 0), result.stderr
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "kills"),
    [
        ("fp32", [4, 11]),  # 4: mid-epoch and mid-window; 11: resumes from the end of epoch 2
        ("fp16", [5, 9]),  # killed between checkpoints: the iterations after 4 and 8 are redone
        ("bf16", [7]),
    ],
)
def test_a_killed_run_resumed_in_new_processes_ends_bitwise_equal(tmp_path, config, kills):
    run_worker(config, tmp_path / "uninterrupted", tmp_path / "expected.pt")
    for kill_at in kills:
        run_worker(config, tmp_path / "interrupted", tmp_path / "unused.pt", kill_at)
    run_worker(config, tmp_path / "interrupted", tmp_path / "actual.pt")
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    actual = torch.load(tmp_path / "actual.pt", weights_only=True)
    assert_same_tensors(actual, expected)
    assert expected["wrapper"]["counters"]["steps"] > 0


@pytest.mark.parametrize("config", ["fp16", "bf16"])
def test_stopping_after_any_iteration_and_resuming_ends_bitwise_equal(tmp_path, config):
    trainer, data, final = build(config, tmp_path / "uninterrupted", every=1)
    trainer.run(data, max_epochs=3)
    expected = final()
    for stop_at in range(1, 15):
        checkpoint_dir = tmp_path / f"stopped_at_{stop_at}"
        trainer, data, _ = build(config, checkpoint_dir, every=1)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda engine: engine.terminate())
        trainer.run(data, max_epochs=3)
        trainer, data, final = build(config, checkpoint_dir, every=1)  # reseeds, as a new process would
        assert trainer.state.iteration == stop_at
        trainer.run(data, max_epochs=3)
        assert_same_tensors(final(), expected, f"stopped at {stop_at}")


def train_with_checkpoints(tmp_path, n_batches, every):
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = create_trainer(model, wrapper, loss_fn)
    checkpoint = attach_checkpoint(
        trainer, {"model": model, "optim_wrapper": wrapper, "trainer": trainer}, tmp_path, every=every
    )
    trainer.run(make_batches(n_batches))
    return model, wrapper, trainer, checkpoint


def test_periodic_files_the_newest_kept_and_the_last_iteration_saved(tmp_path):
    train_with_checkpoints(tmp_path, 5, every=2)
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == ["checkpoint_4.pt", "checkpoint_5.pt"]
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_5.pt"


def test_no_duplicate_save_when_the_run_ends_on_a_period(tmp_path):
    *_, checkpoint = train_with_checkpoints(tmp_path, 4, every=2)
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == ["checkpoint_2.pt", "checkpoint_4.pt"]
    assert Path(checkpoint.last_checkpoint).name == "checkpoint_4.pt"


def test_a_lone_object_is_checkpointed_found_and_resumed_like_several(tmp_path):
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = create_trainer(model, wrapper, loss_fn)
    attach_checkpoint(trainer, {"model": model}, tmp_path, every=2)
    trainer.run(make_batches(5))
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == ["checkpoint_4.pt", "checkpoint_5.pt"]

    fresh = make_model(seed=5)
    assert resume_from_latest({"model": fresh}, tmp_path) == tmp_path / "checkpoint_5.pt"
    assert_same_tensors(dict(fresh.state_dict()), dict(model.state_dict()))


def test_a_run_behind_the_files_in_its_directory_is_refused_before_it_trains(tmp_path):
    train_with_checkpoints(tmp_path, 5, every=2)
    model = make_model()
    trainer = create_trainer(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)), loss_fn)
    attach_checkpoint(trainer, {"model": model}, tmp_path, every=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"holds checkpoints of later iterations than this run's 0 \(checkpoint_4.pt, "
    ):
        trainer.run(make_batches(2))
    assert_same_tensors(dict(model.state_dict()), before)
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == ["checkpoint_4.pt", "checkpoint_5.pt"]


def test_the_newest_checkpoint_is_found_by_iteration_not_by_name(tmp_path):
    for step in (20, 100, 3):
        torch.save({}, tmp_path / f"checkpoint_{step}.pt")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_100.pt"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_resume_loads_into_the_objects_or_changes_nothing(tmp_path):
    model, *_ = train_with_checkpoints(tmp_path, 3, every=1)
    fresh = make_model(seed=5)
    fresh_wrapper = OptimWrapper(torch.optim.SGD(fresh.parameters(), lr=0.1))
    fresh_trainer = create_trainer(fresh, fresh_wrapper, loss_fn)
    path = resume_from_latest({"model": fresh, "optim_wrapper": fresh_wrapper, "trainer": fresh_trainer}, tmp_path)
    assert path == tmp_path / "checkpoint_3.pt"
    assert_same_tensors(dict(fresh.state_dict()), dict(model.state_dict()))
    assert fresh_trainer.state.iteration == 3 and fresh_wrapper.inner_count == 3

    assert resume_from_latest({"model": fresh}, tmp_path / "empty") is None
    with pytest.raises(ValueError, match=r"checkpoint_3.pt lacks \['data'\]"):
        resume_from_latest({"model": fresh, "data": ResumableLoader([1])}, tmp_path)

    wider = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.LayerNorm(9), torch.nn.ReLU(), torch.nn.Linear(9, 2))
    wider_wrapper = OptimWrapper(torch.optim.SGD(wider.parameters(), lr=0.1))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint_3.pt: 'model' does not match this run: shapes differ: 0.weight"):
        resume_from_latest({"model": wider, "optim_wrapper": wider_wrapper}, tmp_path)
    assert_same_tensors(dict(wider.state_dict()), before)
    with pytest.raises(ValueError, match=r"'model' does not match this run: the model lacks \['0.bias', '0.weight'"):
        resume_from_latest({"model": torch.nn.Linear(4, 2)}, tmp_path)

    same = make_model(seed=6)  # fits, but its wrapper does not: the model is not loaded either
    params = list(same.parameters())
    two_groups = OptimWrapper(torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1))
    before = {k: v.clone() for k, v in same.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint_3.pt: 'optim_wrapper' does not match this run: state_dict has 1"):
        resume_from_latest({"model": same, "optim_wrapper": two_groups}, tmp_path)
    assert_same_tensors(dict(same.state_dict()), before)


KILL_RUN = ["--every", "1", "--epochs", "20", "--hidden", "100000"]  # 100 iterations, an 11 MB checkpoint each
KILL_RUN_LENGTH = 100


@pytest.mark.slow
def test_random_sigkills_never_leave_an_unloadable_newest_checkpoint_and_the_run_ends_bitwise_equal(tmp_path):
    """Real processes, real SIGKILLs at random moments (most land in a checkpoint write, the bulk of each iteration).

    Each next process loads the newest checkpoint (weights_only) before it prints ``ready``; a kill that broke it
    would fail there. A run that reaches its end is finished and compared bitwise with the uninterrupted one, and
    the next kills hit a new run. ENGINE_OPT_KILL_TRIALS sets the number of kills (default 8).
    """
    trials = int(os.environ.get("ENGINE_OPT_KILL_TRIALS", "8"))
    run_worker("fp32", tmp_path / "uninterrupted", tmp_path / "expected.pt", extra=KILL_RUN)
    last = torch.load(tmp_path / "uninterrupted" / f"checkpoint_{KILL_RUN_LENGTH}.pt", weights_only=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(0)
    runs, steps, interrupted_saves = 0, [], 0

    def finish(checkpoints: Path) -> None:
        """Run to the end unless the run got there before its kill; its last checkpoint must equal the other's."""
        if latest_checkpoint(checkpoints) != checkpoints / f"checkpoint_{KILL_RUN_LENGTH}.pt":
            run_worker("fp32", checkpoints, tmp_path / "unused.pt", extra=KILL_RUN)
        actual = torch.load(checkpoints / f"checkpoint_{KILL_RUN_LENGTH}.pt", weights_only=True)
        for key in ("model", "optim_wrapper", "scheduler", "trainer"):
            assert_same_tensors(actual[key], last[key], key)
        assert actual["data"]["position"] == last["data"]["position"]
        assert_same_tensors(actual["data"]["rng"]["torch"], last["data"]["rng"]["torch"])  # dropout's stream
        assert len(list(checkpoints.glob("checkpoint_*.pt"))) <= 2  # earlier processes' files are retired too
        assert not list(checkpoints.glob("*.partial"))  # what killed saves left was removed when a run started

    checkpoints = tmp_path / "killed_0"
    for _ in range(trials):
        args = [sys.executable, str(WORKER), "fp32", str(checkpoints), str(tmp_path / "unused.pt"), *KILL_RUN]
        with subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
            line = process.stdout.readline()
            assert line == "ready\n", f"the newest checkpoint did not load: {process.stderr.read()[-2000:]}"
            time.sleep(rng.uniform(0.0, 0.3))
            process.kill()
            process.wait()
        leftovers = [path for path in checkpoints.iterdir() if path.name.endswith(".partial")]
        interrupted_saves += len(
            leftovers
        )  # a save cut short: its partial file, never renamed (the next run removes it)
        newest = latest_checkpoint(checkpoints)
        steps.append(0 if newest is None else int(newest.stem.split("_")[1]))
        if steps[-1] == KILL_RUN_LENGTH:  # this run got to its end between two kills: check it, start another
            finish(checkpoints)
            runs += 1
            checkpoints = tmp_path / f"killed_{runs}"
    finish(checkpoints)
    print(
        f"{trials} kills over {runs + 1} runs, each ended bitwise equal to the uninterrupted run; "
        f"{interrupted_saves} kills landed mid-save; newest checkpoint after each kill: {steps}"
    )


class Counter:
    """A stateful object whose state says which save wrote it."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state):
        self.step = int(state["step"])


operations = st.lists(
    st.one_of(st.just(("restart", None)), st.tuples(st.just("save"), st.sampled_from([None, None, *STAGES]))),
    min_size=1,
    max_size=10,
)


@settings(max_examples=250, deadline=None)
@given(operations=operations, n_saved=st.sampled_from([1, 2, 3]))
def test_whatever_save_a_crash_cuts_short_the_newest_loadable_checkpoint_is_the_last_completed_save(
    operations, n_saved
):
    """The model: what the directory must hold after random saves, crashes at each stage of a save, and restarts."""
    with tempfile.TemporaryDirectory() as path:
        directory = RunDirectory(path)
        counter, engine = Counter(), Engine(lambda engine, batch: None)
        checkpoint = DurableCheckpoint({"counter": counter}, directory, n_saved)
        completed = None  # the step of the last save whose file took its final name
        for kind, stage in operations:
            if kind == "restart":  # a new process: a new handler, and what the dead one left is cleaned up
                checkpoint = DurableCheckpoint({"counter": counter}, directory, n_saved)
                directory.prepare()
                assert not list(Path(path).glob("*.partial"))
                continue
            counter.step += 1
            engine.state.iteration = counter.step
            try:
                with crash_at(stage):
                    checkpoint(engine)
                completed = counter.step
                assert len(directory.checkpoints()) <= n_saved
            except Crash:
                completed = counter.step if stage in RENAMED else completed
            newest = directory.newest()
            assert newest == (None if completed is None else Path(path) / f"checkpoint_{completed}.pt")
            if newest is not None:
                assert torch.load(newest, weights_only=True)["step"].item() == completed


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("config", "crash_at_iteration"), [("fp16", 5), ("bf16", 7)])
def test_a_run_whose_save_crashed_resumes_from_what_is_left_and_ends_bitwise_equal(
    tmp_path, stage, config, crash_at_iteration
):
    trainer, data, final = build(config, tmp_path / "uninterrupted", every=1)
    trainer.run(data, max_epochs=3)
    expected = final()

    checkpoints = tmp_path / "crashed"
    trainer, data, _ = build(config, checkpoints, every=1)
    trainer.add_event_handler(
        Events.ITERATION_STARTED(once=crash_at_iteration), lambda: crashing.enter_context(crash_at(stage))
    )
    with contextlib.ExitStack() as crashing, pytest.raises(Crash):
        trainer.run(data, max_epochs=3)
    expected_newest = crash_at_iteration if stage in RENAMED else crash_at_iteration - 1
    assert latest_checkpoint(checkpoints) == checkpoints / f"checkpoint_{expected_newest}.pt"
    trainer, data, final = build(
        config, checkpoints, every=1
    )  # a new process, n_saved=2 as attach_checkpoint's default
    assert trainer.state.iteration == expected_newest
    trainer.run(data, max_epochs=3)
    assert_same_tensors(final(), expected)
    assert not list(checkpoints.glob("*.partial"))


def test_a_run_into_a_directory_another_run_holds_is_refused_before_it_trains(tmp_path):
    other_run = filelock.FileLock(tmp_path / ".engine_opt.lock", timeout=0)  # as another process holds it
    other_run.acquire()
    (tmp_path / ".engine_opt.lock.owner").write_text(json.dumps({"pid": 4242, "host": "node7"}))
    model = make_model()
    trainer = create_trainer(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)), loss_fn)
    attach_checkpoint(trainer, {"model": model}, tmp_path, every=1)
    iterations = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: iterations.append(engine.state.iteration))
    with pytest.raises(RunDirectoryBusy, match=rf"^{tmp_path} is in use by another run \(process 4242 on node7\)"):
        trainer.run(make_batches(3))
    assert iterations == [] and not list(tmp_path.glob("*.pt"))
    other_run.release()
    train_with_checkpoints(tmp_path, 3, every=1)  # once the other run is gone
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_3.pt"


def test_files_that_are_not_the_runs_own_are_never_counted_rotated_or_in_the_way(tmp_path):
    for name in ("best_checkpoint_30.pt", "pretrained_checkpoint_1.pt"):
        torch.save({"mine": torch.ones(1)}, tmp_path / name)
    train_with_checkpoints(tmp_path, 5, every=1)  # not refused as "behind" best_checkpoint_30.pt
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == [
        "best_checkpoint_30.pt",
        "checkpoint_4.pt",
        "checkpoint_5.pt",
        "pretrained_checkpoint_1.pt",
    ]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_5.pt"


def test_leftovers_of_a_killed_save_are_removed_when_the_next_run_starts(tmp_path):
    train_with_checkpoints(tmp_path, 2, every=1)
    (tmp_path / ".checkpoint_3.pt.999.partial").write_bytes(b"PK half")
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = create_trainer(model, wrapper, loss_fn)
    to_load = {"model": model, "optim_wrapper": wrapper, "trainer": trainer}
    resume_from_latest(to_load, tmp_path)
    attach_checkpoint(trainer, to_load, tmp_path, every=1)
    trainer.run(make_batches(2), max_epochs=2)
    assert not list(tmp_path.glob("*.partial"))
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == ["checkpoint_3.pt", "checkpoint_4.pt"]


def test_a_checkpoint_path_that_is_a_file_is_refused_when_the_run_starts(tmp_path):
    (tmp_path / "file").write_text("")
    model = make_model()
    trainer = create_trainer(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)), loss_fn)
    attach_checkpoint(trainer, {"model": model}, tmp_path / "file" / "checkpoints")
    iterations = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: iterations.append(engine.state.iteration))
    with pytest.raises(OSError, match=r"cannot write checkpoints to .*file/checkpoints"):
        trainer.run(make_batches(2))
    assert iterations == []


def test_a_run_that_raised_lets_its_directory_go(tmp_path):
    model = make_model()
    trainer = create_trainer(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)), loss_fn)
    attach_checkpoint(trainer, {"model": model}, tmp_path, every=1)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        trainer.run(make_batches(4))
    another_process = filelock.FileLock(tmp_path / ".engine_opt.lock", timeout=0)  # as another process would
    another_process.acquire()  # not refused: the run that raised holds nothing
    another_process.release()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_2.pt"
