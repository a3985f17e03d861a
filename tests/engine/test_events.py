"""OptimEvents: the event map, counters and filters, per dict member; step hooks and cancelling a step."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from ignite.handlers import EMAHandler

from engine_opt import AmpOptimWrapper, OptimEvents, OptimWrapper, create_trainer, member_filter

from helpers import gan_step, make_amp_gan_wrappers, roundtrip
from oracle import loss_fn, make_batches, make_gan, make_model


def record_events(trainer, events=(*OptimEvents, Events.ITERATION_STARTED, Events.ITERATION_COMPLETED)):
    seen = []
    for event in events:
        trainer.add_event_handler(
            event,
            lambda engine, event=event: seen.append((event.value, engine.state.iteration, engine.state.optim.name)),
        )
    return seen


def test_the_event_map_of_an_accumulating_trainer():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    trainer = create_trainer(model, wrapper, loss_fn)
    seen = record_events(trainer)
    state = trainer.run(make_batches(3))
    names = [(event, iteration) for event, iteration, _ in seen]
    assert names == [
        ("iteration_started", 1),
        ("backward_completed", 1),
        ("iteration_completed", 1),
        ("iteration_started", 2),
        ("backward_completed", 2),
        ("before_optim_step", 2),
        ("optim_step_completed", 2),
        ("iteration_completed", 2),
        ("iteration_started", 3),
        ("backward_completed", 3),  # the last window, of one micro-step, is applied
        ("before_optim_step", 3),
        ("optim_step_completed", 3),
        ("iteration_completed", 3),
    ]
    assert (state.optim_backwards, state.optim_steps, state.optim_updates, state.optim_skipped) == (3, 2, 2, 0)


def test_gradients_are_complete_and_unscaled_before_the_step():
    batches = make_batches(4)
    expected_grads = []
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for idx, (x, y) in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss / 2).backward()
        if idx % 2 == 1:
            scaler.unscale_(optimizer)
            expected_grads.append([p.grad.clone() for p in model.parameters()])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()

    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype="fp16", loss_scale=1024.0, accumulative_counts=2
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    grads = []
    trainer.add_event_handler(
        OptimEvents.BEFORE_OPTIM_STEP, lambda engine: grads.append([p.grad.clone() for p in model.parameters()])
    )
    trainer.run(batches)
    assert len(grads) == 2
    for actual, expected in zip(grads, expected_grads, strict=True):
        for a, e in zip(actual, expected, strict=True):
            assert torch.equal(a, e)


def test_a_skipped_fp16_step_fires_skipped_and_is_counted():
    batches = make_batches(4)
    batches[1] = (torch.full_like(batches[1][0], float("nan")), batches[1][1])
    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype="fp16", loss_scale={"init_scale": 256.0}
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    seen = record_events(trainer, [OptimEvents.OPTIM_STEP_COMPLETED, OptimEvents.OPTIM_STEP_SKIPPED])
    state = trainer.run(batches)
    assert [(event, iteration) for event, iteration, _ in seen] == [
        ("optim_step_completed", 1),
        ("optim_step_skipped", 2),
        ("optim_step_completed", 3),
        ("optim_step_completed", 4),
    ]
    assert (state.optim_steps, state.optim_updates, state.optim_skipped) == (4, 3, 1)
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()


def test_filters_count_applied_updates():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    trainer = create_trainer(model, wrapper, loss_fn)
    fired = []
    trainer.add_event_handler(
        OptimEvents.OPTIM_STEP_COMPLETED(every=2), lambda engine: fired.append(engine.state.iteration)
    )
    trainer.run(make_batches(10))
    assert fired == [4, 8]  # updates 2 and 4 happen at iterations 4 and 8


def test_events_fire_for_each_member_of_a_dict():
    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale=64.0)
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: gan_step(gan, wrappers, x))
    seen = record_events(trainer, list(OptimEvents))
    gen_updates = []
    trainer.add_event_handler(
        OptimEvents.OPTIM_STEP_COMPLETED(event_filter=member_filter("gen")),
        lambda engine: gen_updates.append(engine.state.optim.wrapper),
    )
    trainer.run([x for x, _ in make_batches(2)])
    assert seen == [
        ("backward_completed", 1, "disc"),
        ("backward_completed", 1, "gen"),
        ("before_optim_step", 1, "gen"),
        ("optim_step_completed", 1, "gen"),
        ("backward_completed", 2, "disc"),
        ("before_optim_step", 2, "disc"),
        ("optim_step_completed", 2, "disc"),
        ("backward_completed", 2, "gen"),
        ("before_optim_step", 2, "gen"),
        ("optim_step_completed", 2, "gen"),
    ]
    assert gen_updates == [wrappers["gen"], wrappers["gen"]]


def test_member_filter_counts_each_members_own_events():
    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale=64.0)  # gen updates every iteration, disc every 2
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: gan_step(gan, wrappers, x))
    fired = {"each": [], "disc": [], "together": [], "backward": []}

    def record(key):
        return lambda engine: fired[key].append((engine.state.optim.name, engine.state.iteration))

    completed = OptimEvents.OPTIM_STEP_COMPLETED
    trainer.add_event_handler(completed(event_filter=member_filter(every=2)), record("each"))
    trainer.add_event_handler(completed(event_filter=member_filter("disc", every=2)), record("disc"))
    trainer.add_event_handler(completed(every=3), record("together"))
    trainer.add_event_handler(OptimEvents.BACKWARD_COMPLETED(event_filter=member_filter("gen", 3)), record("backward"))
    trainer.run([x for x, _ in make_batches(8)])
    gen_updates = [("gen", iteration) for iteration in range(1, 9)]
    disc_updates = [("disc", iteration) for iteration in range(2, 9, 2)]
    in_order = sorted(gen_updates + disc_updates, key=lambda event: (event[1], event[0] == "gen"))
    assert fired["each"] == [event for event in in_order if event in gen_updates[1::2] + disc_updates[1::2]]
    assert fired["disc"] == disc_updates[1::2]
    assert fired["together"] == in_order[2::3]  # every=3 counts both members' updates together
    assert fired["backward"] == [("gen", 3), ("gen", 6)]
    with pytest.raises(TypeError, match=r"name must be a member's name .* got 3"):
        member_filter(3)
    with pytest.raises(ValueError, match="every"):
        member_filter("gen", every=0)


def test_counters_continue_from_the_wrappers_state_on_resume():
    batches = make_batches(6)
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    trainer = create_trainer(model, wrapper, loss_fn)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda engine: engine.terminate())
    trainer.run(batches)
    saved = roundtrip({"wrapper": wrapper.state_dict(), "trainer": trainer.state_dict()})

    resumed_wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    resumed_wrapper.load_state_dict(saved["wrapper"])
    resumed = create_trainer(model, resumed_wrapper, loss_fn)
    resumed.load_state_dict(saved["trainer"])
    fired = []
    resumed.add_event_handler(OptimEvents.OPTIM_STEP_COMPLETED(every=3), lambda engine: fired.append(True))
    state = resumed.run(batches)
    assert (state.optim_backwards, state.optim_updates) == (6, 3)
    assert fired == [True]  # the third update overall, not the third since resuming


def test_ignite_ema_on_applied_updates_matches_a_hand_written_average():
    batches = make_batches(6)
    batches[2] = (torch.full_like(batches[2][0], float("nan")), batches[2][1])  # window [2, 3] is skipped
    expected = make_model()
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    average = [p.detach().clone() for p in expected.parameters()]
    for idx, (x, y) in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(expected(x), y)
        scaler.scale(loss / 2).backward()
        if idx % 2 == 1:
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            if scaler.get_scale() >= scale:  # applied
                for avg, p in zip(average, expected.parameters(), strict=True):
                    avg.mul_(1.0 - 0.25).add_(p.detach(), alpha=0.25)

    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dtype="fp16",
        loss_scale={"init_scale": 256.0},
        accumulative_counts=2,
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    ema = EMAHandler(model, momentum=0.25)
    ema.attach(trainer, event=OptimEvents.OPTIM_STEP_COMPLETED)
    state = trainer.run(batches)
    assert (state.optim_updates, state.optim_skipped) == (2, 1)
    for actual, avg in zip(ema.ema_model.parameters(), average, strict=True):
        assert torch.equal(actual, avg)
