"""engine-opt train, step by step: build, resume, attach handlers; the summary reports the run."""

from __future__ import annotations

import pytest
import torch

from engine_opt.app.cli import build_parser
from engine_opt.app.config import UsageError
from engine_opt.app.train import build, resume, train
from engine_opt.engine.trainer import Trainer


def options(tmp_path, *extra):
    return build_parser().parse_args(["train", "--no-progress", "--log-dir", str(tmp_path / "logs"), *extra])


@pytest.mark.slow  # builds the whole run: the task, its data, the wrappers, the trainer and its handlers
def test_build_makes_every_object_a_checkpoint_holds(tmp_path):
    run = build(options(tmp_path, "--task", "gan", "--schedule", "cosine", "--accumulate", "2"))
    assert isinstance(run.trainer, Trainer) and sorted(run.optim_wrapper) == ["disc", "gen"]
    assert sorted(run.to_save()) == ["data", "model", "optim_wrapper", "run", "scheduler_0", "scheduler_1", "trainer"]
    updates = -(-5 * len(run.data) // 2)
    assert [scheduler.T_max for scheduler in run.schedulers] == [updates, updates]
    assert run.checkpoint_dir == tmp_path / "logs" / "checkpoints"


@pytest.mark.slow  # trains a whole run, then builds three more
def test_a_run_resumes_only_where_it_fits(tmp_path):
    first = train(options(tmp_path, "--epochs", "1"))
    assert (first.iterations, first.resumed_from) == (64, None)
    args = options(tmp_path, "--epochs", "2", "--resume")
    run = build(args)
    assert resume(run, args) == tmp_path / "logs" / "checkpoints" / "checkpoint_64.pt"
    assert run.trainer.state.iteration == 64
    done = options(tmp_path, "--epochs", "1", "--resume")
    with pytest.raises(UsageError, match=r"is complete \(1 epochs\); pass --epochs above 1"):
        resume(build(done), done)
    assert resume(build(options(tmp_path / "other", "--resume")), options(tmp_path / "other", "--resume")) is None


@pytest.mark.slow  # trains a run of one epoch
def test_threads_are_one_on_cpu_unless_given_and_the_callers_come_back_after_the_run(tmp_path, monkeypatch):
    import torch

    from engine_opt.app import train as app_train

    before, seen, real_build = torch.get_num_threads(), [], app_train.build

    def spying_build(args):
        seen.append(torch.get_num_threads())  # what the run trains with
        return real_build(args)

    monkeypatch.setattr(app_train, "build", spying_build)
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting stands
        train(options(tmp_path / "environment", "--epochs", "1"))
        monkeypatch.delenv("OMP_NUM_THREADS")
        train(options(tmp_path / "default", "--epochs", "1"))
        train(options(tmp_path / "given", "--epochs", "1", "--threads", "3"))
        assert seen == [2, 1, 3] and torch.get_num_threads() == 2  # given back after each
        real_build(options(tmp_path / "built"))
        assert torch.get_num_threads() == 2  # build alone changes nothing
    finally:
        torch.set_num_threads(before)


def test_num_items_counts_labels_and_rows_of_class_probabilities():
    from engine_opt.app.train import _samples

    assert _samples(None, torch.zeros(8, dtype=torch.long)) == 8
    assert _samples(None, torch.zeros(8, 5, dtype=torch.long)) == 40  # a label per position
    assert _samples(None, torch.zeros(8, 10)) == 8  # class probabilities along dimension 1
    assert _samples(None, torch.zeros(8, 10, 4)) == 32
