"""Ignite's schedulers on the wrapper: on the trainer against Ignite's own trainer, through SchedulerHandler
against a plain loop, and FastaiLRFinder stopped mid-window.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from ignite.engine import Events, create_supervised_trainer
from ignite.handlers import FastaiLRFinder, LRScheduler, create_lr_scheduler_with_warmup

from engine_opt import OptimWrapper, create_trainer
from engine_opt.handlers import SchedulerHandler

from helpers import momentum_sgd, record_lrs
from oracle import assert_same_model, assert_same_tensors, loss_fn, make_batches, make_model

IGNITE_SCHEDULES = {
    "lr_scheduler": lambda opt: LRScheduler(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.001)),
    "warmup": lambda opt: create_lr_scheduler_with_warmup(
        torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8), warmup_start_value=0.01, warmup_duration=3
    ),
}


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("schedule", sorted(IGNITE_SCHEDULES))
def test_ignite_schedulers_on_the_trainer_match_ignites_own_trainer(schedule, accumulate):
    """Attached as Ignite documents it (ITERATION_STARTED), against create_supervised_trainer on a plain SGD."""
    batches = make_batches(8)
    expected = make_model()
    optimizer = momentum_sgd(expected)
    plain = create_supervised_trainer(expected, optimizer, loss_fn, gradient_accumulation_steps=accumulate)
    plain.add_event_handler(Events.ITERATION_STARTED, IGNITE_SCHEDULES[schedule](optimizer))
    expected_lrs = record_lrs(optimizer)
    plain.run(batches)

    model = make_model()
    wrapper = OptimWrapper(momentum_sgd(model), accumulative_counts=accumulate)
    trainer = create_trainer(model, wrapper, loss_fn)
    trainer.add_event_handler(Events.ITERATION_STARTED, IGNITE_SCHEDULES[schedule](wrapper))
    lrs = record_lrs(wrapper.optimizer)
    trainer.run(batches)
    assert lrs == expected_lrs and len(lrs) == 8 // accumulate
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict(), optimizer.state_dict())


@pytest.mark.parametrize("schedule", sorted(IGNITE_SCHEDULES))
def test_ignite_schedulers_through_scheduler_handler_match_a_plain_loop(schedule):
    """SchedulerHandler: the first value before the first update, then one step after each update."""
    batches = make_batches(8)
    expected = make_model()
    optimizer = momentum_sgd(expected)
    expected_scheduler = IGNITE_SCHEDULES[schedule](optimizer)
    expected_lrs = record_lrs(optimizer)
    expected_scheduler(None)
    for idx, (x, y) in enumerate(batches):
        (loss_fn(expected(x), y) / 2).backward()
        if idx % 2 == 1:
            optimizer.step()
            optimizer.zero_grad()
            expected_scheduler(None)

    model = make_model()
    wrapper = OptimWrapper(momentum_sgd(model), accumulative_counts=2)
    trainer = create_trainer(model, wrapper, loss_fn)
    SchedulerHandler(IGNITE_SCHEDULES[schedule](wrapper)).attach(trainer)
    lrs = record_lrs(wrapper.optimizer)
    trainer.run(batches)
    assert lrs == expected_lrs and len(lrs) == 4
    assert wrapper.get_lr()["lr"] == [optimizer.param_groups[0]["lr"]]
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict(), optimizer.state_dict())


@pytest.mark.parametrize("stop", ["num_iter", "diverged"])
def test_an_lr_finder_stopped_mid_window_leaves_the_next_run_equal_to_a_fresh_one(stop):
    batches = make_batches(8)

    def build():
        model = make_model()
        wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), accumulative_counts=2)
        return model, wrapper, create_trainer(model, wrapper, loss_fn)

    fresh_model, fresh_wrapper, fresh_trainer = build()
    fresh_trainer.run(batches)

    model, wrapper, trainer = build()
    finder = FastaiLRFinder()
    if stop == "num_iter":  # Ignite stops after iteration num_iter + 1
        settings = {"num_iter": 4, "end_lr": 1.0}
    else:
        settings = {"num_iter": 8, "end_lr": 100.0, "smooth_f": 0.0, "diverge_th": 3.0}
    stopped_at = []
    count = trainer.add_event_handler(Events.COMPLETED, lambda engine: stopped_at.append(wrapper.inner_count))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the finder's own "did not diverge", torch's micro-step schedule warning
        with finder.attach(trainer, to_save={"model": model, "optimizer": wrapper}, **settings) as finding:
            finding.run(batches)
    count.remove()
    assert stopped_at[0] % 2 == 1 and stopped_at[0] < 8  # stopped mid-window, a window's gradients pending
    assert finder.get_results()["lr"][-1] > 0.01
    assert all(p.grad is None for p in model.parameters())
    trainer.run(batches)
    assert_same_model(model, fresh_model)
    assert_same_tensors(wrapper.state_dict(), fresh_wrapper.state_dict())
