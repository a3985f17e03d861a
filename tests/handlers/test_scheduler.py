"""SchedulerHandler: schedules advance on applied updates only, against plain loops with a scheduler."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from ignite.engine import Events
from ignite.handlers import PiecewiseLinear

from engine_opt import AmpOptimWrapper, OptimEvents, OptimWrapper, create_trainer
from engine_opt.handlers import SchedulerHandler
from engine_opt.optim.schedulers import build_param_scheduler

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
    with pytest.raises(TypeError, match=r"LRScheduler or an Ignite ParamScheduler, or an engine_opt .* got 'step'"):
        SchedulerHandler("step")
    with pytest.raises(TypeError, match="or a dict of such lists, got 3 of type int"):
        SchedulerHandler({"gen": [torch.optim.lr_scheduler.StepLR(wrapper.optimizer, step_size=1), 3]})
    other = torch.optim.SGD(make_model().parameters(), lr=0.1)
    trainer = create_trainer(model, wrapper, loss_fn)
    SchedulerHandler(torch.optim.lr_scheduler.StepLR(other, step_size=1)).attach(trainer)
    with pytest.raises(ValueError, match=r"not driven by this trainer's wrapper\(s\) \[None\]"):
        trainer.run(make_batches(1))


# ------------------------------------------------------------------ MMEngine's param_scheduler configs


def two_groups(model, lr):
    """The first layer at ``lr``, the rest at three times it: two groups with different base lrs."""
    first = list(model[0].parameters())
    rest = [param for param in model.parameters() if all(param is not other for other in first)]
    return [{"params": first, "lr": lr}, {"params": rest, "lr": 3 * lr}]


def mmengine_runner(cfg, epochs, updates_per_epoch):
    """MMEngine's ParamSchedulerHook on a plain optimizer: ``by_epoch=False`` schedulers after each
    iteration (here: each applied update), ``by_epoch=True`` ones after each epoch. Returns the
    (lrs, momenta) each iteration used, and those at the end."""
    pytest.importorskip("mmengine")
    import mmengine.optim  # noqa: F401 (registers the schedulers)
    from mmengine.registry import PARAM_SCHEDULERS

    optimizer = torch.optim.SGD(two_groups(make_model(), 0.1), lr=0.1, momentum=0.9)
    read = lambda: [(group["lr"], group["momentum"]) for group in optimizer.param_groups]  # noqa: E731
    used = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no optimizer.step() here
        schedulers = [
            PARAM_SCHEDULERS.build(dict(item), default_args=dict(optimizer=optimizer, epoch_length=updates_per_epoch))
            for item in cfg
        ]
        for _ in range(epochs):
            for _ in range(updates_per_epoch):
                used.append(read())
                for scheduler in schedulers:
                    if not scheduler.by_epoch:
                        scheduler.step()
            for scheduler in schedulers:
                if scheduler.by_epoch:
                    scheduler.step()
    return used, read()


CONFIGS = {
    "warmup, epoch milestones, iteration momentum": [
        dict(type="LinearLR", start_factor=0.1, begin=0, end=4, by_epoch=False),
        dict(type="MultiStepLR", milestones=[1, 2], gamma=0.5),
        dict(type="CosineAnnealingMomentum", eta_min=0.5, begin=0, end=9, by_epoch=False),
    ],
    "warmup then cosine converted to iterations": [
        dict(type="LinearLR", start_factor=0.25, begin=0, end=2, by_epoch=False),
        dict(type="CosineAnnealingLR", eta_min=1e-3, begin=1, end=3, by_epoch=True, convert_to_iter_based=True),
    ],
    "one cycle, epoch momentum": [
        dict(type="OneCycleLR", eta_max=0.5, pct_start=0.4, begin=0, end=9, by_epoch=False),
        dict(type="StepMomentum", step_size=1, gamma=0.9, by_epoch=True),
    ],
    "epoch-based poly and exponential": [
        dict(type="PolyLR", eta_min=1e-3, power=2.0, begin=0, end=3),
        dict(type="ExponentialLR", gamma=0.8, begin=1),
    ],
}


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=list(CONFIGS))
def test_param_scheduler_configs_follow_mmengines_sequence_indexed_by_applied_update(cfg):
    """3 epochs of 3 applied updates, each an accumulation of 2 micro-steps: update N uses MMEngine's value N."""
    epochs, updates, window = 3, 3, 2
    expected, expected_end = mmengine_runner(cfg, epochs, updates)
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(two_groups(model, 0.1), lr=0.1, momentum=0.9), accumulative_counts=window)
    schedulers = build_param_scheduler(wrapper, cfg, epoch_length=updates)
    trainer = create_trainer(model, wrapper, loss_fn)
    SchedulerHandler(schedulers).attach(trainer)
    read = lambda: [(group["lr"], group["momentum"]) for group in wrapper.param_groups]  # noqa: E731
    used = []
    trainer.add_event_handler(OptimEvents.BEFORE_OPTIM_STEP, lambda engine: used.append(read()))
    state = trainer.run(make_batches(updates * window), max_epochs=epochs)
    assert state.optim_updates == epochs * updates
    assert used == expected
    assert read() == expected_end


def test_an_epoch_schedule_resumes_exactly_whichever_handler_saves_first_and_wherever():
    """Saved at an epoch's end by a handler that runs before the schedule's step, at an epoch's last
    iteration, or mid-epoch: the resumed run uses the values of the run that never stopped."""
    cfg = [
        dict(type="LinearLR", start_factor=0.2, begin=0, end=3, by_epoch=False),
        dict(type="StepLR", step_size=1, gamma=0.5),
        dict(type="ExponentialMomentum", gamma=0.9),
    ]
    batches = make_batches(4)  # 2 applied updates an epoch

    def build():
        model = make_model()
        wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), accumulative_counts=2)
        schedulers = build_param_scheduler(wrapper, cfg)
        trainer = create_trainer(model, wrapper, loss_fn)
        used = []
        trainer.add_event_handler(OptimEvents.BEFORE_OPTIM_STEP, lambda engine: used.append(wrapper.get_lr()))
        return model, wrapper, schedulers, trainer, used

    model, wrapper, schedulers, trainer, expected = build()
    SchedulerHandler(schedulers).attach(trainer)
    trainer.run(batches, max_epochs=4)
    expected_end = (wrapper.state_dict()["param_groups"], [s.state_dict() for s in schedulers])

    for event in (
        Events.EPOCH_COMPLETED(once=2),
        Events.ITERATION_COMPLETED(once=8),
        Events.ITERATION_COMPLETED(once=6),
    ):
        model, wrapper, schedulers, trainer, used = build()
        saved = {}

        def save(engine, model=model, wrapper=wrapper, schedulers=schedulers, saved=saved):
            saved.update(
                model=copy.deepcopy(model.state_dict()),
                wrapper=copy.deepcopy(wrapper.state_dict()),
                trainer=engine.state_dict(),
                schedulers=[s.state_dict() for s in schedulers],
            )
            engine.terminate()

        trainer.add_event_handler(event, save)  # before the schedule's own handlers
        SchedulerHandler(schedulers).attach(trainer)
        trainer.run(batches, max_epochs=4)

        fresh, fresh_wrapper, fresh_schedulers, fresh_trainer, fresh_used = build()
        SchedulerHandler(fresh_schedulers).attach(fresh_trainer)
        fresh.load_state_dict(saved["model"])
        fresh_wrapper.load_state_dict(saved["wrapper"])
        fresh_trainer.load_state_dict(saved["trainer"])
        for scheduler, state in zip(fresh_schedulers, saved["schedulers"], strict=True):
            scheduler.load_state_dict(state)
        fresh_trainer.run(batches, max_epochs=4)
        assert used + fresh_used == expected, event
        assert (fresh_wrapper.state_dict()["param_groups"], [s.state_dict() for s in fresh_schedulers]) == expected_end

    fresh, fresh_wrapper, fresh_schedulers, fresh_trainer, _ = build()  # the schedulers' state not loaded
    SchedulerHandler(fresh_schedulers).attach(fresh_trainer)
    fresh_trainer.load_state_dict({"iteration": 8, "epoch_length": 4, "max_epochs": 4})  # (a gap of one is a catch-up)
    with pytest.raises(ValueError, match=r"StepLR.* has taken 0 epoch step\(s\) but the trainer has completed 2"):
        fresh_trainer.run(batches, max_epochs=4)


def test_member_schedules_from_a_config_follow_their_members():
    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale=64.0)  # disc accumulates 2 micro-steps
    schedulers = build_param_scheduler(
        wrappers,
        {
            "disc": dict(type="LinearLR", start_factor=0.5, end=10, by_epoch=False),
            "gen": [dict(type="ExponentialLR", gamma=0.5), dict(type="LinearMomentum", end=10, by_epoch=False)],
        },
    )
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: gan_step(gan, wrappers, x))
    SchedulerHandler(schedulers).attach(trainer)
    state = trainer.run([x for x, _ in make_batches(4)], max_epochs=2)
    assert state.optim_updates == 8 + 4
    assert [s.global_step for s in schedulers["disc"]] == [4]  # one per discriminator update
    assert [s.global_step for s in schedulers["gen"]] == [2, 8]  # one per epoch, one per generator update
    assert wrappers["gen"].get_lr()["lr"] == [0.01 * 0.5 * 0.5]


def test_a_config_scheduler_on_another_optimizer_is_refused_when_the_run_starts():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    other = OptimWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1))
    trainer = create_trainer(model, wrapper, loss_fn)
    SchedulerHandler(build_param_scheduler(other, dict(type="LinearLR", by_epoch=False))).attach(trainer)
    with pytest.raises(ValueError, match=r"not driven by this trainer's wrapper\(s\) \[None\]"):
        trainer.run(make_batches(1))
