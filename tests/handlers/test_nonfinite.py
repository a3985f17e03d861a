"""NonFiniteGuard: a bad window is dropped exactly as if its batches were never seen; or the run stops."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events

from engine_opt import AmpOptimWrapper, OptimWrapper, create_trainer
from engine_opt.handlers import NonFiniteGuard

from oracle import (
    OPTIMIZERS,
    Plan,
    assert_same_model,
    assert_same_tensors,
    loss_fn,
    make_batches,
    make_model,
    plain_loop,
)


def poisoned(batches, index):
    batches = list(batches)
    x, y = batches[index]
    batches[index] = (x, torch.full_like(y, float("nan")))
    return batches


@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize(
    ("wrapper_kwargs", "amp"),
    [({}, False), ({"clip_grad": {"max_norm": 1.0}}, False), ({"dtype": "bf16", "clip_grad": {"max_norm": 1.0}}, True)],
)
def test_skip_drops_the_window_as_if_it_never_happened(optimizer_name, wrapper_kwargs, amp):
    batches = make_batches(8)
    bad = poisoned(batches, 3)  # window [2, 3] of accumulate=2
    plan = Plan(
        accumulate=2,
        clip_norm=wrapper_kwargs.get("clip_grad", {}).get("max_norm"),
        amp_dtype=torch.bfloat16 if amp else None,
    )
    expected = make_model()
    expected_optimizer = OPTIMIZERS[optimizer_name](expected.parameters())
    plain_loop(expected, expected_optimizer, batches[:2] + batches[4:], plan)

    model = make_model()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    wrapper = (
        AmpOptimWrapper(optimizer=optimizer, accumulative_counts=2, **wrapper_kwargs)
        if amp
        else OptimWrapper(optimizer, accumulative_counts=2, **wrapper_kwargs)
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    guard = NonFiniteGuard("skip")
    guard.attach(trainer)
    state = trainer.run(bad)
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict()["state"], expected_optimizer.state_dict()["state"])
    assert guard.skipped == {None: 1}
    assert (state.optim_updates, state.optim_skipped, wrapper.skipped_steps) == (3, 1, 1)


def test_stop_raises_naming_the_iteration_and_leaves_the_weights_alone():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.Adam(model.parameters(), lr=0.01))
    trainer = create_trainer(model, wrapper, loss_fn)
    NonFiniteGuard("stop").attach(trainer)
    snapshots = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda engine: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}),
    )
    with pytest.raises(FloatingPointError, match="non-finite loss or gradients at iteration 3; the update was not"):
        trainer.run(poisoned(make_batches(5), 2))
    assert_same_tensors(dict(model.state_dict()), snapshots[-1])
    assert len(snapshots) == 2


def test_a_non_finite_loss_with_finite_gradients_is_caught():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def train_step(engine, batch):
        x, y = batch
        loss = loss_fn(model(x), y) + torch.tensor(float("inf"))  # the constant has no gradient
        wrapper.update_params(loss)

    trainer = create_trainer(model, wrapper, train_step=train_step)
    guard = NonFiniteGuard()
    guard.attach(trainer)
    trainer.run(make_batches(2))
    assert guard.skipped == {None: 2}
    assert_same_tensors(dict(model.state_dict()), before)


def test_members_with_a_grad_scaler_are_left_to_it():
    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype="fp16", loss_scale={"init_scale": 256.0}
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    guard = NonFiniteGuard("stop")
    guard.attach(trainer)
    trainer.run(poisoned(make_batches(3), 1))
    assert guard.skipped == {}
    assert wrapper.skipped_steps == 1


def fp16_run(action, max_scaler_skips):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    wrapper = AmpOptimWrapper(optimizer=optimizer, dtype="fp16", loss_scale={"init_scale": 256.0})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = create_trainer(model, wrapper, loss_fn)
    guard = NonFiniteGuard(action, max_scaler_skips=max_scaler_skips)
    guard.attach(trainer)
    return model, wrapper, guard, trainer, before


def test_a_collapsing_fp16_loss_scale_stops_the_run_naming_the_iteration_and_the_scale():
    batches = [poisoned([batch], 0)[0] for batch in make_batches(6)]  # every batch non-finite
    model, wrapper, _, trainer, before = fp16_run("stop", max_scaler_skips=4)
    with pytest.raises(
        FloatingPointError, match=r"loss scale has collapsed: 4 updates in a row skipped .*iteration 4, "
    ):
        trainer.run(batches)
    assert trainer.state.iteration == 4 and wrapper.skipped_steps == 4
    assert_same_tensors(dict(model.state_dict()), before)  # nothing was applied, nothing poisoned
    assert wrapper.optimizer.state_dict()["state"] == {}
    assert wrapper.loss_scaler.get_scale() == 256.0 / 2**4


def test_a_collapsing_fp16_loss_scale_warns_once_per_streak_when_skipping():
    batches = make_batches(10)
    bad = (
        [poisoned([batch], 0)[0] for batch in batches[:3]]
        + batches[3:5]
        + [poisoned([batch], 0)[0] for batch in batches[5:8]]
    )
    model, wrapper, guard, trainer, _ = fp16_run("skip", max_scaler_skips=3)
    with pytest.warns(RuntimeWarning, match="loss scale has collapsed: 3 updates in a row") as warned:
        trainer.run(bad)
    assert [str(w.message).split("(iteration ")[1].split(",")[0] for w in warned] == ["3", "8"]
    assert guard.scaler_streaks == {None: 3} and wrapper.skipped_steps == 6 and wrapper.applied_steps == 2
    for value in [*model.state_dict().values(), *wrapper.optimizer.state_dict()["state"][0].values()]:
        assert bool(torch.isfinite(value).all())


def test_bad_action():
    with pytest.raises(ValueError, match=r"action must be one of \['skip', 'stop'\], got 'ignore'"):
        NonFiniteGuard("ignore")


def poison_gradients_at(model, micro_step):
    """Make the first layer's weight gradient inf on one micro-step (the loss itself stays finite)."""
    calls = []

    def hook(grad):
        calls.append(None)
        return grad * float("inf") if len(calls) == micro_step else grad

    model[0].weight.register_hook(hook)


@pytest.mark.parametrize("clip_grad", [None, {"max_norm": 1.0}, {"type": "value", "clip_value": 0.01}])
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_the_guard_sees_non_finite_gradients_whatever_the_clipping(clip_grad, dtype):
    """Clipping by value turns inf into the clip value: the guard looks before it (oracle: the window never seen)."""
    batches = make_batches(8)
    plan = Plan(
        accumulate=2,
        clip_norm=(clip_grad or {}).get("max_norm"),
        clip_value=(clip_grad or {}).get("clip_value"),
        amp_dtype=torch.bfloat16 if dtype else None,
    )
    expected = make_model()
    expected_optimizer = OPTIMIZERS["sgd_momentum"](expected.parameters())
    plain_loop(expected, expected_optimizer, batches[:2] + batches[4:], plan)

    model = make_model()
    poison_gradients_at(model, micro_step=4)  # window [2, 3]
    optimizer = OPTIMIZERS["sgd_momentum"](model.parameters())
    kwargs = {"accumulative_counts": 2, "clip_grad": clip_grad}
    wrapper = (
        AmpOptimWrapper(optimizer=optimizer, dtype=dtype, **kwargs) if dtype else OptimWrapper(optimizer, **kwargs)
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    guard = NonFiniteGuard("skip")
    guard.attach(trainer)
    trainer.run(batches)
    assert guard.skipped == {None: 1}
    assert_same_model(model, expected)


@pytest.mark.parametrize("clip_grad", [None, {"max_norm": 1.0}, {"type": "value", "clip_value": 0.01}])
def test_float16_skips_non_finite_gradients_whatever_the_clipping(clip_grad):
    model = make_model()
    poison_gradients_at(model, micro_step=4)
    wrapper = AmpOptimWrapper(
        optimizer=OPTIMIZERS["sgd_momentum"](model.parameters()),
        dtype="fp16",
        loss_scale={"init_scale": 256.0},  # the default 2**16 overflows this model's float16 gradients once
        accumulative_counts=2,
        clip_grad=clip_grad,
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    NonFiniteGuard("skip").attach(trainer)
    trainer.run(make_batches(8))
    assert (wrapper.applied_steps, wrapper.skipped_steps) == (3, 1)
    assert all(bool(param.isfinite().all()) for param in model.parameters())
