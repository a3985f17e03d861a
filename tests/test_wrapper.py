"""OptimWrapper against the plain PyTorch loop of tests/oracle.py, bitwise in float32."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from engine_opt import AmpOptimWrapper, OptimWrapper

from helpers import roundtrip, run_wrapper
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


@pytest.mark.parametrize("stop_after", [2, 4, 5])
def test_resume_between_micro_steps_is_exact(stop_after):
    """Stop anywhere (also mid-window), save, load into fresh objects, finish: same as not stopping."""
    n, plan = 8, Plan(accumulate=3, clip_norm=0.05)
    batches = make_batches(n)
    expected = make_model()
    expected_optimizer = OPTIMIZERS["adamw"](expected.parameters())
    plain_loop(expected, expected_optimizer, batches, plan)

    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS["adamw"](model.parameters()), accumulative_counts=3, clip_grad={"max_norm": 0.05})
    wrapper.initialize_count_status(model, 0, n)
    run_wrapper(model, wrapper, batches[:stop_after])
    checkpoint = roundtrip({"model": model.state_dict(), "wrapper": wrapper.state_dict()})
    assert ("accumulated_grads" in checkpoint["wrapper"]) == (stop_after % 3 != 0)

    model = make_model(seed=5)
    wrapper = OptimWrapper(OPTIMIZERS["adamw"](model.parameters()), accumulative_counts=3, clip_grad={"max_norm": 0.05})
    model.load_state_dict(checkpoint["model"])
    wrapper.load_state_dict(checkpoint["wrapper"])
    assert wrapper.inner_count == stop_after and wrapper.max_counts == n
    run_wrapper(model, wrapper, batches[stop_after:])
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict(), expected_optimizer.state_dict())
    assert wrapper.applied_steps == 3


def test_state_dict_is_compatible_with_plain_optimizers():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    run_wrapper(model, wrapper, make_batches(2))
    state = wrapper.state_dict()
    assert {"state", "param_groups", "counters"} <= set(state)
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain.load_state_dict(roundtrip(state))
    assert_same_tensors(plain.state_dict(), wrapper.optimizer.state_dict())

    other = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), accumulative_counts=2)
    other.initialize_count_status(model, 3, 10)
    other.load_state_dict(plain.state_dict())  # an optimizer's (or MMEngine's) state: counters kept
    assert other.inner_count == 3 and other.max_counts == 10
    assert_same_tensors(other.optimizer.state_dict(), wrapper.optimizer.state_dict())


def test_load_does_not_mutate_its_argument():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    run_wrapper(model, wrapper, make_batches(3))
    state = wrapper.state_dict()
    snapshot = copy.deepcopy(state)
    OptimWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1), accumulative_counts=2).load_state_dict(state)
    assert_same_tensors(state, snapshot)


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


def _bad_states(good):
    def edit(**changes):
        state = copy.deepcopy(good)
        state.update(changes)
        return state

    return {
        "not a dict": ([1, 2], TypeError, "state_dict must be a dict"),
        "no optimizer keys": ({"counters": good["counters"]}, ValueError, "lacks the optimizer key"),
        "group count": (edit(param_groups=good["param_groups"] * 2), ValueError, "2 param group"),
        "group sizes": (
            edit(param_groups=[{**good["param_groups"][0], "params": [0]}]),
            ValueError,
            "hold \\[1\\] parameters",
        ),
        "groups not dicts": (edit(param_groups=[3]), ValueError, "list of dicts"),
        "state not dict": (edit(state=[]), TypeError, "state_dict\\['state'\\]"),
        "counter type": (edit(counters={"inner_count": "3"}), TypeError, "inner_count"),
        "counter name": (edit(counters={"inner": 3}), ValueError, "unknown key"),
        "grads length": (edit(accumulated_grads=[None]), ValueError, "accumulated_grads"),
        "grads shape": (
            edit(accumulated_grads=[torch.zeros(1)] * len(good["param_groups"][0]["params"])),
            ValueError,
            "shape",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not a dict",
        "no optimizer keys",
        "group count",
        "group sizes",
        "groups not dicts",
        "state not dict",
        "counter type",
        "counter name",
        "grads length",
        "grads shape",
    ],
)
def test_failed_load_leaves_the_wrapper_as_it_was(case):
    model = make_model()
    wrapper = OptimWrapper(torch.optim.Adam(model.parameters(), lr=0.1), accumulative_counts=2)
    run_wrapper(model, wrapper, make_batches(3))
    before = copy.deepcopy(wrapper.state_dict())
    other = OptimWrapper(torch.optim.Adam(make_model().parameters(), lr=0.5), accumulative_counts=2)
    bad, error, pattern = _bad_states(other.state_dict())[case]
    with pytest.raises(error, match=pattern):
        wrapper.load_state_dict(bad)
    assert_same_tensors(wrapper.state_dict(), before)


def test_optim_context_skips_ddp_gradient_sync_mid_window():
    """A real single-process DDP (gloo): no_sync is entered exactly on micro-steps that do not end a window."""
    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(os.path.join(folder, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            model = nn.parallel.DistributedDataParallel(make_model())
            wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=3)
            wrapper.initialize_count_status(model, 0, 5)
            flags = []
            for x, y in make_batches(5):
                with wrapper.optim_context(model):
                    flags.append(model.require_backward_grad_sync)
                    loss = loss_fn(model(x), y)
                wrapper.update_params(loss)
            assert flags == [False, False, True, False, True]
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("amp", [False, True])
def test_loading_a_state_saved_between_windows_leaves_no_gradient_of_before_behind(amp):
    """Rolling back: a window begun before the load must not leak into the updates after it."""
    batches = make_batches(6)

    def build(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if amp:
            return AmpOptimWrapper(optimizer=optimizer, dtype="fp16", loss_scale=256.0, accumulative_counts=2)
        return OptimWrapper(optimizer, accumulative_counts=2)

    def train(model, wrapper, some):
        for x, y in some:
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)

    model = make_model()
    wrapper = build(model)
    train(model, wrapper, batches[:2])
    saved_model, saved_wrapper = copy.deepcopy(model.state_dict()), copy.deepcopy(wrapper.state_dict())
    train(model, wrapper, batches[2:3])  # half a window, then roll back
    if amp:
        wrapper.unscale_grads()  # as a hook reading gradients would
    model.load_state_dict(saved_model)
    wrapper.load_state_dict(copy.deepcopy(saved_wrapper))  # torch's load keeps the tensors it is given
    assert all(param.grad is None for param in model.parameters())
    train(model, wrapper, batches[2:])

    fresh = make_model(seed=4)
    fresh.load_state_dict(saved_model)
    fresh_wrapper = build(fresh)
    fresh_wrapper.load_state_dict(copy.deepcopy(saved_wrapper))
    train(fresh, fresh_wrapper, batches[2:])
    assert_same_model(model, fresh)
