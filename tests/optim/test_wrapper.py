"""OptimWrapper against the plain PyTorch loop of tests/support/oracle.py, bitwise in float32.

The update itself, counting micro-steps and windows, the views of the optimizer, bad arguments, DDP's
no_sync mid-window, and cancel_step. Its saved state is tested in test_window_state.py, the wrapper as a
torch Optimizer in test_optimizer_view.py, num_items in test_num_items.py.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from engine_opt import OptimWrapper

from helpers import run_wrapper
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

CONFIGS = {
    "plain": (Plan(), {}, 5),
    "accumulate_2": (Plan(accumulate=2), {"accumulative_counts": 2}, 6),
    "accumulate_3_short_last_window": (Plan(accumulate=3), {"accumulative_counts": 3}, 7),
    "accumulate_2_short_last_window": (Plan(accumulate=2), {"accumulative_counts": 2}, 5),
    "clip_norm": (Plan(clip_norm=0.05), {"clip_grad": {"max_norm": 0.05}}, 5),
    "clip_value": (Plan(clip_value=0.01), {"clip_grad": {"type": "value", "clip_value": 0.01}}, 5),
    "accumulate_3_clip_norm": (
        Plan(accumulate=3, clip_norm=0.05),
        {"accumulative_counts": 3, "clip_grad": {"max_norm": 0.05}},
        8,
    ),
}


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_plain_loop_bitwise(optimizer_name, config):
    plan, kwargs, n = CONFIGS[config]
    batches = make_batches(n)
    expected_model = make_model()
    expected_optimizer = OPTIMIZERS[optimizer_name](expected_model.parameters())
    plain_loop(expected_model, expected_optimizer, batches, plan)

    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS[optimizer_name](model.parameters()), **kwargs)
    wrapper.initialize_count_status(model, 0, n)
    run_wrapper(model, wrapper, batches)

    assert_same_model(model, expected_model)
    assert_same_tensors(wrapper.optimizer.state_dict(), expected_optimizer.state_dict())
    windows = -(-n // plan.accumulate)
    assert wrapper.applied_steps == windows and wrapper.skipped_steps == 0
    assert all(p.grad is None for p in model.parameters())


def test_unknown_run_length_keeps_the_last_partial_window_pending():
    """Without initialize_count_status, as in MMEngine, a partial last window is not stepped."""
    batches = make_batches(7)
    expected = make_model()
    expected_optimizer = torch.optim.SGD(expected.parameters(), lr=0.1)
    plain_loop(expected, expected_optimizer, batches[:6], Plan(accumulate=3))

    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=3)
    run_wrapper(model, wrapper, batches)
    assert_same_model(model, expected)
    assert wrapper.applied_steps == 2 and wrapper.inner_count == 7
    assert not wrapper.should_update()


def test_accumulation_equals_one_big_batch_in_float64():
    k, batch_size = 4, 3
    small = make_batches(k, batch_size=batch_size, dtype=torch.float64)
    big = [(torch.cat([x for x, _ in small]), torch.cat([y for _, y in small]))]
    reference = make_model(dtype=torch.float64)
    plain_loop(reference, torch.optim.SGD(reference.parameters(), lr=0.1), big, Plan())

    model = make_model(dtype=torch.float64)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=k)
    run_wrapper(model, wrapper, small)
    for actual, expected in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-14)
    untrained = make_model(dtype=torch.float64).parameters()
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), untrained, strict=True))


def test_grad_norm_is_the_pre_clip_total_norm_and_stays_a_tensor():
    x, y = make_batches(1)[0]
    reference = make_model()
    loss_fn(reference(x), y).backward()
    expected = nn.utils.clip_grad_norm_(reference.parameters(), 1e-3)

    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), clip_grad=dict(max_norm=1e-3))
    assert wrapper.grad_norm is None
    wrapper.update_params(loss_fn(model(x), y))
    assert isinstance(wrapper.grad_norm, torch.Tensor)
    assert torch.equal(wrapper.grad_norm, expected) and expected > 1e-3


def test_counting_should_update_and_should_sync():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=3)
    wrapper.initialize_count_status(model, 0, 7)
    syncs, updates, sizes = [], [], []
    for x, y in make_batches(7):
        syncs.append(wrapper.should_sync())
        scaled = wrapper.scale_loss(torch.tensor(6.0))
        sizes.append(int(6 / scaled.item()))
        wrapper.backward(loss_fn(model(x), y))
        updates.append(wrapper.should_update())
        if updates[-1]:
            wrapper.step()
            wrapper.zero_grad()
    assert updates == [False, False, True, False, False, True, True]
    assert syncs == updates
    assert sizes == [3, 3, 3, 3, 3, 3, 1]


def test_micro_steps_past_the_run_length_form_full_windows_again():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=3)
    wrapper.initialize_count_status(model, 0, 4)
    updates, sizes = [], []
    for x, y in make_batches(10):
        sizes.append(round(1 / wrapper.scale_loss(torch.tensor(1.0)).item()))
        wrapper.update_params(loss_fn(model(x), y))
        updates.append(wrapper.should_update())
    assert [i + 1 for i, u in enumerate(updates) if u] == [3, 4, 6, 9]
    assert sizes == [3, 3, 3, 1, 3, 3, 3, 3, 3, 3]


def test_optimizer_views():
    model = make_model()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.5}, {"params": model[3].parameters()}], lr=0.1, momentum=0.9
    )
    wrapper = OptimWrapper(optimizer)
    assert wrapper.param_groups is optimizer.param_groups and len(wrapper.param_groups) == 2
    assert wrapper.defaults is optimizer.defaults
    assert wrapper.get_lr() == {"base_lr": [0.1], "lr": [0.5, 0.1]}
    assert wrapper.get_momentum() == {"momentum": [0.9, 0.9]}
    optimizer.param_groups[1]["lr"] = 0.01
    assert wrapper.get_lr()["lr"] == [0.5, 0.01]
    adam = OptimWrapper(torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.8, 0.99)))
    assert adam.get_momentum() == {"momentum": [0.8]} and adam.get_lr() == {"lr": [0.1]}
    assert OptimWrapper(torch.optim.Adagrad(model.parameters())).get_momentum() == {"momentum": [0]}
    text = repr(OptimWrapper(optimizer, accumulative_counts=2, clip_grad=dict(max_norm=1.0)))
    assert "OptimWrapper(" in text and "accumulative_counts=2" in text and "'max_norm': 1.0" in text and "SGD" in text


def test_step_and_zero_grad_pass_keyword_arguments():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = make_batches(1)[0]
    wrapper.update_params(loss_fn(model(x), y), zero_kwargs={"set_to_none": False})
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    calls = []
    wrapper.backward(loss_fn(model(x), y))
    wrapper.step(closure=lambda: calls.append(1))
    assert calls == [1]


def test_arguments_are_not_mutated():
    clip = {"type": "norm", "max_norm": 1.0}
    OptimWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1), clip_grad=clip)
    assert clip == {"type": "norm", "max_norm": 1.0}


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"accumulative_counts": 0}, ValueError, ["accumulative_counts", "0"]),
        ({"accumulative_counts": -2}, ValueError, ["accumulative_counts", "-2"]),
        ({"accumulative_counts": 1.5}, TypeError, ["accumulative_counts", "1.5"]),
        ({"accumulative_counts": True}, TypeError, ["accumulative_counts", "True"]),
        ({"accumulative_counts": "2"}, TypeError, ["accumulative_counts", "'2'"]),
        ({"clip_grad": {"type": "l2", "max_norm": 1}}, ValueError, ["clip_grad", "'l2'", "norm", "value"]),
        ({"clip_grad": {}}, ValueError, ["clip_grad", "max_norm"]),
        ({"clip_grad": {"type": "value"}}, ValueError, ["clip_grad", "clip_value"]),
        ({"clip_grad": {"max_norm": 1, "maxnorm": 2}}, ValueError, ["clip_grad", "maxnorm", "norm_type"]),
        ({"clip_grad": 1.0}, TypeError, ["clip_grad", "1.0", "dict"]),
    ],
)
def test_bad_constructor_arguments(kwargs, error, words):
    with pytest.raises(error) as info:
        OptimWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_non_optimizer_is_refused():
    model = make_model()
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer.*Sequential"):
        OptimWrapper(model)


@pytest.mark.parametrize(
    ("init", "total", "error", "pattern"),
    [
        (-1, 5, ValueError, "init_counts must be >= 0, got -1"),
        (0, 0, ValueError, "max_counts must be a positive int or -1"),
        (6, 5, ValueError, r"init_counts \(6\) must not exceed max_counts \(5\)"),
        (1.0, 5, TypeError, "init_counts must be an int, got 1.0 of type float"),
        (0, "5", TypeError, "max_counts must be an int, got '5' of type str"),
        (True, 5, TypeError, "init_counts must be an int, got True"),
    ],
)
def test_bad_count_status(init, total, error, pattern):
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(error, match=pattern):
        wrapper.initialize_count_status(model, init, total)
    assert (wrapper.inner_count, wrapper.max_counts) == (0, -1)


@pytest.mark.parametrize(
    ("each_micro_step", "expected"), [(False, [False, False, True, False, True]), (True, [True] * 5)]
)
def test_optim_context_skips_ddp_gradient_sync_mid_window(each_micro_step, expected):
    """A real single-process DDP (gloo): no_sync is entered exactly on micro-steps that do not end a window
    (on none with sync_each_micro_step)."""
    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(os.path.join(folder, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            model = nn.parallel.DistributedDataParallel(make_model())
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            wrapper = OptimWrapper(optimizer, accumulative_counts=3, sync_each_micro_step=each_micro_step)
            wrapper.initialize_count_status(model, 0, 5)
            flags = []
            for x, y in make_batches(5):
                with wrapper.optim_context(model):
                    flags.append(model.require_backward_grad_sync)
                    loss = loss_fn(model(x), y)
                wrapper.update_params(loss)
            assert flags == expected
        finally:
            dist.destroy_process_group()


def cancelling_run(optimizer_name, batches, cancelled_windows, accumulate=2, clip_norm=None):
    """The wrapper over ``batches``, a hook cancelling the windows at ``cancelled_windows`` with a device flag."""
    from engine_opt.optim.hooks import StepEvent

    model = make_model()
    clip = None if clip_norm is None else {"max_norm": clip_norm}
    wrapper = OptimWrapper(
        OPTIMIZERS[optimizer_name](model.parameters()), accumulative_counts=accumulate, clip_grad=clip
    )
    windows, outcomes = iter(range(len(batches))), []

    def cancel(w, event, loss):
        w.cancel_step(when=torch.tensor(next(windows) in cancelled_windows))

    wrapper.register_step_hook(cancel, [StepEvent.BEFORE_OPTIM_STEP])
    wrapper.register_step_hook(
        lambda w, event, loss: outcomes.append(event.name),
        [StepEvent.OPTIM_STEP_COMPLETED, StepEvent.OPTIM_STEP_SKIPPED],
    )
    wrapper.initialize_count_status(model, 0, len(batches))
    norms = []
    for x, y in batches:
        wrapper.update_params(loss_fn(model(x), y))
        if wrapper.inner_count % accumulate == 0 and wrapper.grad_norm is not None:
            norms.append(wrapper.grad_norm.clone())
    return model, wrapper, outcomes, norms


@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adamw", "adamw_fused"])
@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_cancel_step_when_a_device_flag_skips_exactly_those_windows(optimizer_name, clip_norm):
    batches, cancelled = make_batches(12), {0, 3}  # windows of 2: the first (no optimizer state yet) and the fourth
    model, wrapper, outcomes, norms = cancelling_run(optimizer_name, batches, cancelled, clip_norm=clip_norm)
    expected = make_model()
    optimizer = OPTIMIZERS[optimizer_name](expected.parameters())
    kept = [batch for index, batch in enumerate(batches) if index // 2 not in cancelled]
    plain_loop(expected, optimizer, kept, Plan(accumulate=2, clip_norm=clip_norm))
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict()["state"], optimizer.state_dict()["state"])
    assert (wrapper.skipped_steps, wrapper.applied_steps) == (2, 4)
    assert outcomes == ["OPTIM_STEP_" + ("SKIPPED" if w in cancelled else "COMPLETED") for w in range(6)]
    if clip_norm is not None:  # a cancelled window keeps the last applied norm (nan before any)
        assert norms[0].isnan() and torch.equal(norms[3], norms[2]) and not torch.equal(norms[2], norms[1])


def test_cancel_step_when_is_read_nowhere_on_the_host_with_a_stateless_optimizer(monkeypatch):
    from engine_opt.optim.hooks import StepEvent

    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))  # no state: nothing the device cannot undo
    wrapper.register_step_hook(lambda w, e, loss: w.cancel_step(when=loss_flag), [StepEvent.BEFORE_OPTIM_STEP])
    loss_flag = torch.tensor(True)
    before = [param.detach().clone() for param in model.parameters()]
    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: pytest.fail("a host read"))
    x, y = make_batches(1)[0]
    wrapper.update_params(loss_fn(model(x), y))
    monkeypatch.undo()
    assert_same_tensors(list(model.parameters()), before)
    assert wrapper.skipped_steps == 1


@pytest.mark.parametrize(
    ("when", "message"),
    [
        (True, r"when must be a one-element bool tensor \(e\.g\. norm > limit\), got True of type bool"),
        (torch.tensor(1.0), r"when must be a one-element bool tensor .*, got tensor\(1\.\) of type Tensor"),
        (torch.tensor([True, False]), r"when must be a one-element bool tensor .*, got tensor\(\[ True, False\]\)"),
    ],
)
def test_cancel_step_refuses_a_when_that_is_not_a_bool_flag(when, message):
    from engine_opt.optim.hooks import StepEvent

    model = torch.nn.Linear(1, 1)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    wrapper.register_step_hook(lambda w, e, loss: w.cancel_step(when=when), [StepEvent.BEFORE_OPTIM_STEP])
    before = [param.detach().clone() for param in model.parameters()]
    with pytest.raises(TypeError, match=message):
        wrapper.update_params(model(torch.ones(1, 1)).sum())
    assert_same_tensors(list(model.parameters()), before)  # the failed step abandoned its window
    assert all(param.grad is None for param in model.parameters())
