"""SchedulerHandler: schedules advance on applied updates only, against plain loops with a scheduler."""

from __future__ import annotations

import warnings

import pytest
import torch
from ignite.handlers import PiecewiseLinear

from engine_opt import AmpOptimWrapper, OptimEvents, OptimWrapper, create_trainer
from engine_opt.handlers import SchedulerHandler

from helpers import gan_step, make_amp_gan_wrappers
from oracle import assert_same_model, assert_same_tensors, loss_fn, make_batches, make_gan, make_model


def test_torch_scheduler_steps_once_per_window_like_the_plain_loop():
    batches = make_batches(7)
    expected = make_model()
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.7)
    for idx, (x, y) in enumerate(batches):
        window = 3 if idx < 6 else 1
        (loss_fn(expected(x), y) / window).backward()
        if (idx + 1) % 3 == 0 or idx == 6:
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()

    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), accumulative_counts=3)
    handler = SchedulerHandler(torch.optim.lr_scheduler.ExponentialLR(wrapper.optimizer, gamma=0.7))
    trainer = create_trainer(model, wrapper, loss_fn)
    handler.attach(trainer)
    trainer.run(batches)
    assert_same_model(model, expected)
    assert_same_tensors(handler.scheduler.state_dict(), scheduler.state_dict())
    assert wrapper.get_lr() == {"lr": [scheduler.get_last_lr()[0]]}


def test_skipped_fp16_steps_do_not_move_the_schedule_or_warn():
    batches = make_batches(4)
    batches[0] = (torch.full_like(batches[0][0], float("nan")), batches[0][1])  # the very first step is skipped
    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0), dtype="fp16", loss_scale={"init_scale": 256.0}
    )
    scheduler = torch.optim.lr_scheduler.StepLR(wrapper.optimizer, step_size=1, gamma=0.5)
    trainer = create_trainer(model, wrapper, loss_fn)
    SchedulerHandler(scheduler).attach(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = trainer.run(batches)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert (state.optim_updates, state.optim_skipped) == (3, 1)
    assert scheduler.last_epoch == 3 and wrapper.get_lr() == {"lr": [0.125]}


def test_ignite_param_scheduler_values_are_used_by_successive_updates():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    scheduler = PiecewiseLinear(wrapper, "lr", milestones_values=[(0, 1.0), (4, 0.0)])
    trainer = create_trainer(model, wrapper, loss_fn)
    SchedulerHandler(scheduler).attach(trainer)
    used = []
    trainer.add_event_handler(OptimEvents.BEFORE_OPTIM_STEP, lambda engine: used.append(wrapper.get_lr()["lr"][0]))
    trainer.run(make_batches(8))
    assert used == [1.0, 0.75, 0.5, 0.25]


def test_a_member_schedule_follows_that_members_updates_only():
    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale=64.0)  # disc accumulates 2 micro-steps
    disc_schedule = torch.optim.lr_scheduler.StepLR(wrappers["disc"].optimizer, step_size=1, gamma=0.5)
    gen_schedule = PiecewiseLinear(wrappers["gen"], "lr", milestones_values=[(0, 0.01), (10, 0.0)])
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: gan_step(gan, wrappers, x))
    SchedulerHandler(disc_schedule).attach(trainer)
    SchedulerHandler(gen_schedule).attach(trainer)
    trainer.run([x for x, _ in make_batches(4)])
    assert disc_schedule.last_epoch == 2
    assert gen_schedule.event_index == 5  # the first value at the start, then one per generator update


def test_bad_schedulers():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="ReduceLROnPlateau needs a metric"):
        SchedulerHandler(torch.optim.lr_scheduler.ReduceLROnPlateau(wrapper.optimizer))
    with pytest.raises(TypeError, match="LRScheduler or an Ignite ParamScheduler, got 'step'"):
        SchedulerHandler("step")
    other = torch.optim.SGD(make_model().parameters(), lr=0.1)
    trainer = create_trainer(model, wrapper, loss_fn)
    SchedulerHandler(torch.optim.lr_scheduler.StepLR(other, step_size=1)).attach(trainer)
    with pytest.raises(ValueError, match=r"not driven by this trainer's wrapper\(s\) \[None\]"):
        trainer.run(make_batches(1))
