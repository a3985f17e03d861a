"""Step hooks of the core wrappers: per event, in order, removable; unscaled gradients before the step; cancelling."""

from __future__ import annotations

import contextlib

import pytest
import torch

from engine_opt import AmpOptimWrapper, OptimWrapper, StepEvent

from oracle import Plan, assert_same_model, assert_same_tensors, loss_fn, make_batches, make_model, plain_loop


def record(wrapper, events=None):
    seen = []
    handle = wrapper.register_step_hook(lambda w, event, loss: seen.append(event), events)
    return seen, handle


def test_a_hook_is_called_only_for_its_events_and_in_the_order_they_happen():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    everything, _ = record(wrapper)
    steps, _ = record(wrapper, [StepEvent.BEFORE_OPTIM_STEP, StepEvent.OPTIM_STEP_COMPLETED])
    for x, y in make_batches(3):
        wrapper.update_params(loss_fn(model(x), y))
    backward, before, completed = (
        StepEvent.BACKWARD_COMPLETED,
        StepEvent.BEFORE_OPTIM_STEP,
        StepEvent.OPTIM_STEP_COMPLETED,
    )
    assert everything == [backward, backward, before, completed, backward]
    assert steps == [before, completed]


def test_removing_a_handle_removes_the_hook_from_all_its_events():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    seen, handle = record(wrapper, [StepEvent.BACKWARD_COMPLETED, StepEvent.OPTIM_STEP_COMPLETED])
    x, y = make_batches(1)[0]
    wrapper.update_params(loss_fn(model(x), y))
    handle.remove()
    wrapper.update_params(loss_fn(model(x), y))
    assert seen == [StepEvent.BACKWARD_COMPLETED, StepEvent.OPTIM_STEP_COMPLETED]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_fused"])
def test_before_the_step_hooks_see_unscaled_gradients_and_the_numbers_stay_the_plain_loops(optimizer):
    make_optimizer = {
        "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
        "adamw_fused": lambda params: torch.optim.AdamW(params, lr=0.01, fused=True),
    }[optimizer]
    batches = make_batches(4)
    expected, expected_grads = make_model(), []
    plain = make_optimizer(expected.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(expected(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(plain)
        expected_grads.append([p.grad.clone() for p in expected.parameters()])
        scaler.step(plain)
        scaler.update()
        plain.zero_grad()

    model = make_model()
    wrapper = AmpOptimWrapper(optimizer=make_optimizer(model.parameters()), dtype="fp16", loss_scale=1024.0)
    grads = []
    wrapper.register_step_hook(
        lambda w, event, loss: grads.append([p.grad.clone() for p in model.parameters()]),
        [StepEvent.BEFORE_OPTIM_STEP],
    )
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)
    assert_same_tensors(grads, expected_grads)
    assert_same_model(model, expected)


def test_a_hook_that_raises_leaves_the_counts_and_the_veto_as_they_were():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))

    def explode(w, event, loss):
        raise FloatingPointError("stop here")

    handle = wrapper.register_step_hook(explode, [StepEvent.BEFORE_OPTIM_STEP])
    x, y = make_batches(1)[0]
    with pytest.raises(FloatingPointError):
        wrapper.update_params(loss_fn(model(x), y))
    assert (wrapper.step_count, wrapper.applied_steps, wrapper.inner_count) == (0, 0, 1)
    with pytest.raises(RuntimeError, match="cancel_step"):
        wrapper.cancel_step()
    handle.remove()
    wrapper.zero_grad()
    wrapper.update_params(loss_fn(model(x), y))
    assert (wrapper.step_count, wrapper.applied_steps) == (1, 1)


def test_step_count_includes_the_step_being_taken():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    counts = []
    wrapper.register_step_hook(
        lambda w, event, loss: counts.append((event, w.step_count, w.applied_steps)),
        [StepEvent.BEFORE_OPTIM_STEP, StepEvent.OPTIM_STEP_COMPLETED],
    )
    x, y = make_batches(1)[0]
    wrapper.update_params(loss_fn(model(x), y))
    assert counts == [(StepEvent.BEFORE_OPTIM_STEP, 1, 0), (StepEvent.OPTIM_STEP_COMPLETED, 1, 1)]


@pytest.mark.parametrize(
    ("hook", "events", "message"),
    [
        (3, None, r"hook must be callable as hook\(wrapper, event, loss\), got 3"),
        (print, ["before_optim_step"], r"events must be StepEvent members .* got \['before_optim_step'\]"),
        (print, [], r"events must be StepEvent members .* got \[\]"),
    ],
)
def test_bad_hooks_are_refused_when_registered(hook, events, message):
    wrapper = OptimWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1))
    with pytest.raises(TypeError, match=message):
        wrapper.register_step_hook(hook, events)


def test_step_hooks_without_a_trainer():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    events = []

    def cancel(w, event, loss):
        events.append((event.value, None if loss is None else loss.shape))
        if event is StepEvent.BEFORE_OPTIM_STEP:
            w.cancel_step()

    handle = wrapper.register_step_hook(cancel)
    x, y = make_batches(1)[0]
    wrapper.update_params(loss_fn(model(x), y))
    assert events == [("backward_completed", ()), ("before_optim_step", None), ("optim_step_skipped", None)]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert (wrapper.applied_steps, wrapper.skipped_steps, wrapper.step_was_skipped) == (0, 1, True)

    handle.remove()
    wrapper.update_params(loss_fn(model(x), y))
    assert len(events) == 3 and wrapper.applied_steps == 1


def test_cancelling_an_fp16_step_keeps_the_scaler_usable():
    model = make_model()
    wrapper = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype="fp16", loss_scale=8.0)
    handle = wrapper.register_step_hook(
        lambda w, event, loss: w.cancel_step() if event is StepEvent.BEFORE_OPTIM_STEP else None
    )
    x, y = make_batches(1)[0]
    wrapper.update_params(loss_fn(model(x), y))
    handle.remove()
    wrapper.update_params(loss_fn(model(x), y))
    assert (wrapper.applied_steps, wrapper.skipped_steps) == (1, 1)


def test_hook_misuse_is_a_clear_error():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"only be called from a step hook handling StepEvent\.BEFORE_OPTIM_STEP"):
        wrapper.cancel_step()
    with pytest.raises(TypeError, match=r"hook must be callable as hook\(wrapper, event, loss\), got 3"):
        wrapper.register_step_hook(3)


def test_a_float16_window_whose_hook_raised_is_dropped_and_the_next_windows_are_the_plain_loops():
    batches = make_batches(6)
    expected = make_model()
    plain = torch.optim.SGD(expected.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    for index, (x, y) in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(expected(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(plain)
        if index != 2:  # the window whose hook raised: unscaled, not stepped, its scaler iteration closed
            scaler.step(plain)
        scaler.update()
        plain.zero_grad()

    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dtype="fp16",
        loss_scale={"init_scale": 1024.0, "growth_interval": 2},
    )
    calls = []

    def raise_at_the_third(w, event, loss):
        calls.append(event)
        if len(calls) == 3:
            raise FloatingPointError("a guard said stop")

    wrapper.register_step_hook(raise_at_the_third, [StepEvent.BEFORE_OPTIM_STEP])
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        try:
            wrapper.update_params(loss)
        except FloatingPointError:
            assert all(param.grad is None for param in model.parameters())
    assert_same_model(model, expected)
    assert wrapper.loss_scaler.state_dict() == scaler.state_dict()


def test_a_window_whose_outcome_hook_raised_keeps_its_update_and_leaves_no_gradient_behind():
    batches = make_batches(5)
    expected = make_model()
    plain_loop(expected, torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.9), batches, Plan())
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    failures = [OSError("the logger's disk is full")]

    def log_once_badly(w, event, loss):
        if failures:
            raise failures.pop()

    wrapper.register_step_hook(log_once_badly, [StepEvent.OPTIM_STEP_COMPLETED])
    for x, y in batches:
        with contextlib.suppress(OSError):
            wrapper.update_params(loss_fn(model(x), y))
    assert_same_model(model, expected)
    assert (wrapper.applied_steps, wrapper.step_count) == (5, 5)


def test_hooks_unpickled_from_before_the_veto_lived_there_refuse_cancel_step_outside_a_hook_as_documented():
    from engine_opt.optim.hooks import StepHooks

    saved = {key: value for key, value in vars(StepHooks()).items() if key != "_veto"}  # as pickled before
    restored = StepHooks.__new__(StepHooks)
    restored.__dict__.update(saved)
    with pytest.raises(RuntimeError, match=r"cancel_step\(\) can only be called from a step hook"):
        restored.veto()
