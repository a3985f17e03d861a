"""The run's schedules: a Python config's param_scheduler over the run's updates, with accumulation too."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from engine_opt import build_optim_wrapper
from engine_opt.app.config import UsageError
from engine_opt.app.schedules import run_schedules
from engine_opt.engine.trainer import create_trainer
from engine_opt.handlers import SchedulerHandler

ARGS = argparse.Namespace(schedule="constant", config="run.py")


def wrapper_of(model, accumulation):
    cfg = {"optimizer": {"type": "SGD", "lr": 1.0}, "accumulative_counts": accumulation}
    return build_optim_wrapper(model, cfg)


def test_an_iteration_schedule_without_an_end_ends_with_the_runs_last_update():
    """6 batches an epoch, windows of 4 running on across epochs, 3 epochs: 5 updates, the schedule's 5 steps."""
    model = torch.nn.Linear(2, 1)
    wrapper = wrapper_of(model, 4)
    cosine = [{"type": "CosineAnnealingLR", "by_epoch": False, "eta_min": 0.0}]
    schedules = run_schedules(ARGS, wrapper, epochs=3, epoch_length=6, param_scheduler=cosine)
    assert (schedules[0].begin, schedules[0].end) == (0, 5)
    trainer = create_trainer(model, wrapper, torch.nn.functional.mse_loss)
    SchedulerHandler(schedules).attach(trainer)
    trainer.run([(torch.ones(2, 2), torch.zeros(2, 1))] * 6, max_epochs=3)
    assert wrapper.applied_steps == 5
    # the last update ran at the schedule's last step, MMEngine's cosine at 4 of 5
    assert wrapper.param_groups[0]["lr"] == pytest.approx((1 + math.cos(math.pi * 4 / 5)) / 2)


def test_converting_epochs_to_updates_is_refused_where_windows_cross_epochs():
    wrapper = wrapper_of(torch.nn.Linear(2, 1), 4)
    converted = [{"type": "CosineAnnealingLR", "by_epoch": True, "convert_to_iter_based": True}]
    with pytest.raises(UsageError, match=r"an epoch's 6 batches are no whole number of windows"):
        run_schedules(ARGS, wrapper, epochs=3, epoch_length=6, param_scheduler=converted)
    (built,) = run_schedules(ARGS, wrapper, epochs=3, epoch_length=8, param_scheduler=converted)
    assert (built.begin, built.end) == (0, 6)  # 2 windows an epoch, 3 epochs


def test_a_schedule_option_beside_the_configs_is_refused():
    wrapper = wrapper_of(torch.nn.Linear(2, 1), 1)
    with pytest.raises(UsageError, match=r"--schedule cosine: --config run.py sets param_scheduler; drop one"):
        run_schedules(argparse.Namespace(schedule="cosine", config="run.py"), wrapper, 1, 4, [{"type": "LinearLR"}])


def test_each_member_counts_its_own_updates():
    model = torch.nn.ModuleDict({"gen": torch.nn.Linear(2, 2), "disc": torch.nn.Linear(2, 1)})
    one = {"optimizer": {"type": "SGD", "lr": 1.0}}
    wrappers = build_optim_wrapper(model, {"gen": one, "disc": {**one, "accumulative_counts": 4}})
    linear = [{"type": "LinearLR", "by_epoch": False, "start_factor": 0.5}]
    gen, disc = run_schedules(ARGS, wrappers, epochs=3, epoch_length=8, param_scheduler=linear)
    assert (gen.end, disc.end) == (24, 6)  # 8 updates an epoch, and 2
    with pytest.raises(UsageError, match=r"names member\(s\) \['critic'\], which the wrappers lack"):
        run_schedules(ARGS, wrappers, epochs=3, epoch_length=8, param_scheduler={"critic": linear})
