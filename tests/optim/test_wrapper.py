"""OptimWrapper against the plain PyTorch loop of tests/support/oracle.py, bitwise in float32."""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Events, create_supervised_trainer
from ignite.handlers import FastaiLRFinder, LRScheduler, create_lr_scheduler_with_warmup
from torch import nn

from engine_opt import AmpOptimWrapper, OptimWrapper, create_trainer
from engine_opt.handlers import SchedulerHandler

from helpers import roundtrip, run_wrapper
from oracle import (
    OPTIMIZERS,
    Plan,
    assert_same_model,
    assert_same_tensors,
    loss_fn,
    make_batches,
    make_model,
    plain_item_windows,
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


# ---------------------------------------------------------------------- the wrapper as a torch Optimizer

TORCH_SCHEDULES = {
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3, eta_min=0.001),
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10),
    "sequential": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4),
        ],
        milestones=[2],
    ),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.8**step),
}


def record_lrs(optimizer):
    """The lr each optimizer step used, read by a step pre-hook of the plain optimizer."""
    lrs = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    return lrs


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def scheduler_warnings(caught):
    return [str(w.message) for w in caught if "optimizer.step()" in str(w.message)]


def test_the_wrapper_is_a_torch_optimizer_with_live_views():
    model = make_model()
    optimizer = sgd(model)
    wrapper = OptimWrapper(optimizer)
    assert isinstance(wrapper, torch.optim.Optimizer)
    assert wrapper.param_groups is optimizer.param_groups and wrapper.defaults is optimizer.defaults
    assert wrapper.state is optimizer.state
    wrapper.update_params(loss_fn(model(torch.ones(2, 4)), torch.zeros(2, 2)))
    assert len(wrapper.state) == len(list(model.parameters()))  # momentum buffers, seen through the wrapper
    extra = nn.Parameter(torch.zeros(3))
    wrapper.add_param_group({"params": [extra], "lr": 0.5})
    assert optimizer.param_groups[-1]["params"] == [extra] and optimizer.param_groups[-1]["momentum"] == 0.9
    seen = []
    handle = wrapper.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt))
    wrapper.update_params(loss_fn(model(torch.ones(2, 4)), torch.zeros(2, 2)))
    handle.remove()
    assert seen == [optimizer]  # torch's optimizer hooks run around the wrapped optimizer's step
    model(torch.ones(1, 4)).sum().backward()
    wrapper.zero_grad(False)  # torch's positional set_to_none
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    with pytest.raises(TypeError, match=r"got the wrapper OptimWrapper; pass the optimizer it wraps"):
        OptimWrapper(wrapper)


def test_a_copy_of_a_scheduled_wrapper_steps_its_own_parameters():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=2)
    torch.optim.lr_scheduler.StepLR(wrapper, step_size=1)  # patches wrapper.step, as on any optimizer
    run_wrapper(model, wrapper, make_batches(3))  # mid-window
    twin = copy.deepcopy(wrapper)
    assert twin.inner_count == 3 and "step" not in vars(twin)
    before = [p.detach().clone() for p in model.parameters()]
    twin.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("schedule", sorted(TORCH_SCHEDULES))
def test_torch_schedulers_on_the_wrapper_match_a_plain_loop(schedule, accumulate):
    batches = make_batches(8)
    expected = make_model()
    optimizer = sgd(expected)
    expected_scheduler = TORCH_SCHEDULES[schedule](optimizer)
    expected_lrs = record_lrs(optimizer)
    for idx, (x, y) in enumerate(batches):
        (loss_fn(expected(x), y) / accumulate).backward()
        if (idx + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
            expected_scheduler.step()

    model = make_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=accumulate)
    scheduler = TORCH_SCHEDULES[schedule](wrapper)
    lrs = record_lrs(wrapper.optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches:
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)
            if wrapper.should_update():
                scheduler.step()
    assert not scheduler_warnings(caught)
    assert lrs == expected_lrs and len(lrs) == 8 // accumulate
    assert scheduler.get_last_lr() == expected_scheduler.get_last_lr()
    assert wrapper.get_momentum() == {"momentum": [optimizer.param_groups[0]["momentum"]]}
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict(), optimizer.state_dict())


def test_a_scheduler_stepped_on_micro_steps_warns_as_torch_does():
    """Two scheduler steps before the first update: the first value was never used, as torch says."""
    model = make_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=2)
    scheduler = torch.optim.lr_scheduler.StepLR(wrapper, step_size=1)
    with pytest.warns(UserWarning, match=r"lr_scheduler.step\(\)` before `optimizer.step\(\)"):
        for x, y in make_batches(2):
            wrapper.update_params(loss_fn(model(x), y))
            scheduler.step()


def test_a_scheduler_and_the_wrapper_resume_mid_window_exactly():
    batches = make_batches(7)
    expected = make_model()
    expected_wrapper = OptimWrapper(sgd(expected), accumulative_counts=2)
    expected_scheduler = TORCH_SCHEDULES["cosine"](expected_wrapper)
    for x, y in batches:
        expected_wrapper.update_params(loss_fn(expected(x), y))
        if expected_wrapper.should_update():
            expected_scheduler.step()

    model = make_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=2)
    scheduler = TORCH_SCHEDULES["cosine"](wrapper)
    for x, y in batches[:3]:
        wrapper.update_params(loss_fn(model(x), y))
        if wrapper.should_update():
            scheduler.step()
    saved = roundtrip(
        {"model": model.state_dict(), "wrapper": wrapper.state_dict(), "scheduler": scheduler.state_dict()}
    )
    model = make_model(seed=5)
    model.load_state_dict(saved["model"])
    wrapper = OptimWrapper(sgd(model), accumulative_counts=2)
    wrapper.load_state_dict(saved["wrapper"])
    scheduler = TORCH_SCHEDULES["cosine"](wrapper)
    scheduler.load_state_dict(saved["scheduler"])
    for x, y in batches[3:]:
        wrapper.update_params(loss_fn(model(x), y))
        if wrapper.should_update():
            scheduler.step()
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.state_dict(), expected_wrapper.state_dict())


def mmengine_chain(optimizer, eta_min_ratio=None):
    schedulers = pytest.importorskip("mmengine.optim.scheduler")
    eta_min = {"eta_min": 0.001} if eta_min_ratio is None else {"eta_min_ratio": eta_min_ratio}
    return [
        schedulers.LinearLR(optimizer, start_factor=0.1, by_epoch=False, begin=0, end=2),
        schedulers.CosineAnnealingLR(optimizer, T_max=3, by_epoch=False, begin=2, end=5, **eta_min),
    ]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_mmengine_schedulers_on_the_wrapper_match_a_plain_optimizer(accumulate):
    batches = make_batches(10)
    expected = make_model()
    optimizer = sgd(expected)
    expected_chain = mmengine_chain(optimizer)
    expected_lrs = record_lrs(optimizer)
    for idx, (x, y) in enumerate(batches):
        (loss_fn(expected(x), y) / accumulate).backward()
        if (idx + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
            for scheduler in expected_chain:
                scheduler.step()

    model = make_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=accumulate)
    chain = mmengine_chain(wrapper)
    lrs = record_lrs(wrapper.optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches:
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)
            if wrapper.should_update():
                for scheduler in chain:
                    scheduler.step()
    assert not scheduler_warnings(caught)
    assert lrs == expected_lrs
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict(), optimizer.state_dict())


@pytest.mark.parametrize(
    ("group_lrs", "eta_min_ratio"),
    [((0.1, 0.3), None), ((0.3, 0.1), None), ((0.2, 0.3), 0.01)],
    ids=["first_group_at_default", "second_group_at_default", "no_group_at_default_proportional"],
)
def test_base_lr_follows_the_schedule_as_mmengines_does(group_lrs, eta_min_ratio):
    """MMEngine schedules a phantom group at the default lr (0.1); base_lr is derived to match it."""
    mmengine_optim = pytest.importorskip("mmengine.optim")

    def two_groups(model):
        groups = [{"params": model[0].parameters(), "lr": group_lrs[0]}, {"params": model[3].parameters()}]
        groups[1]["lr"] = group_lrs[1]
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)

    theirs = mmengine_optim.OptimWrapper(two_groups(make_model()))
    ours = OptimWrapper(two_groups(make_model()))
    assert ours.get_lr() == theirs.get_lr() == {"base_lr": [0.1], "lr": list(group_lrs)}
    their_chain, our_chain = mmengine_chain(theirs, eta_min_ratio), mmengine_chain(ours, eta_min_ratio)
    seen = []
    for x, _ in make_batches(6):
        for wrapper, chain in ((theirs, their_chain), (ours, our_chain)):
            params = [p for group in wrapper.optimizer.param_groups for p in group["params"]]
            wrapper.update_params(sum((p * x.mean()).sum() for p in params))
            for scheduler in chain:
                scheduler.step()
        seen.append(theirs.get_lr()["base_lr"][0])
        assert ours.get_lr()["lr"] == theirs.get_lr()["lr"]
        if 0.1 in group_lrs:  # a group started at the default: the same floats
            assert ours.get_lr() == theirs.get_lr()
        else:  # the same value, from a ratio
            assert ours.get_lr()["base_lr"][0] == pytest.approx(theirs.get_lr()["base_lr"][0], rel=1e-12)
    assert len(set(seen)) == 3  # it follows the schedule: the end of the warm-up, the cosine, then held


def test_clip_grad_kwargs_is_none_without_clipping_as_in_mmengine():
    model = make_model()
    assert OptimWrapper(sgd(model)).clip_grad_kwargs is None
    assert OptimWrapper(sgd(model), clip_grad={"type": "value", "clip_value": 0.5}).clip_grad_kwargs == {
        "clip_value": 0.5
    }
    mmengine_optim = pytest.importorskip("mmengine.optim")
    assert mmengine_optim.OptimWrapper(sgd(model)).clip_grad_kwargs is None


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
    optimizer = sgd(expected)
    plain = create_supervised_trainer(expected, optimizer, loss_fn, gradient_accumulation_steps=accumulate)
    plain.add_event_handler(Events.ITERATION_STARTED, IGNITE_SCHEDULES[schedule](optimizer))
    expected_lrs = record_lrs(optimizer)
    plain.run(batches)

    model = make_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=accumulate)
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
    optimizer = sgd(expected)
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
    wrapper = OptimWrapper(sgd(model), accumulative_counts=2)
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


@pytest.mark.parametrize("copy_of", [copy.deepcopy, lambda wrapper: pickle.loads(pickle.dumps(wrapper))])
def test_hooks_registered_on_a_copy_run(copy_of):
    model = torch.nn.Linear(2, 1)
    wrapper = copy_of(OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)))
    calls = []
    wrapper.register_step_pre_hook(lambda optimizer, args, kwargs: calls.append("pre"))
    wrapper.register_step_post_hook(lambda optimizer, args, kwargs: calls.append("post"))
    params = [param for group in wrapper.param_groups for param in group["params"]]
    sum(param.sum() for param in params).backward()
    wrapper.step()
    assert calls == ["pre", "post"]


# ---------------------------------------------------------------- token-weighted accumulation (num_items)
# The reference is one plain step per window on its items concatenated (oracle.plain_item_windows). The
# wrapper sums the micro-batches' summed-loss gradients and divides them by the window's count: the same
# update, summed in another order, so the comparison is within float32 rounding (rtol 1e-5, atol 1e-6, as
# tests/test_distributed.py's "sum of halves vs whole"); with autocast, within the autocast dtype's rounding.

ITEM_SIZES = [3, 5, 1, 7, 2, 4, 6]  # 7 micro-batches of varying item counts


def item_windows(sizes, accumulate):
    from oracle import make_item_batches

    batches = make_item_batches(sizes)
    return batches, [batches[start : start + accumulate] for start in range(0, len(batches), accumulate)]


def run_items(model, wrapper, batches, as_tensor=False):
    from oracle import item_loss_sum

    for x, y in batches:
        with wrapper.optim_context(model):
            loss = item_loss_sum(model(x), y)
        wrapper.update_params(loss, num_items=torch.tensor(len(x)) if as_tensor else len(x))


ITEM_CONFIGS = {
    "sgd": ("sgd_momentum", Plan(), {}, (1e-5, 1e-6)),
    "adamw_clip_norm": ("adamw", Plan(clip_norm=0.5), {"clip_grad": {"max_norm": 0.5}}, (1e-5, 1e-6)),
    "adam_clip_value": (
        "adam",
        Plan(clip_value=0.1),
        {"clip_grad": {"type": "value", "clip_value": 0.1}},
        (1e-5, 1e-6),
    ),
    # bfloat16 rounds the micro-batches' weight gradients separately, the reference the window's at once
    "bf16": ("adamw", Plan(amp_dtype=torch.bfloat16), {"dtype": "bf16"}, (2e-2, 2e-3)),
    "fp16_scaler_clip": (
        "sgd_momentum",
        Plan(amp_dtype=torch.float16, scaler_kwargs={"init_scale": 256.0}, clip_norm=1.0),
        {"dtype": "fp16", "loss_scale": {"init_scale": 256.0}, "clip_grad": {"max_norm": 1.0}},
        (5e-3, 5e-4),  # float16 rounding
    ),
}


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("name", list(ITEM_CONFIGS))
def test_num_items_windows_equal_one_step_on_the_windows_items(name, as_tensor):
    optimizer_name, plan, kwargs, (rtol, atol) = ITEM_CONFIGS[name]
    batches, windows = item_windows(ITEM_SIZES, 3)  # windows of 9, 13 and, the short last one, 6 items
    expected = make_model()
    result = plain_item_windows(expected, OPTIMIZERS[optimizer_name](expected.parameters()), windows, plan)
    model = make_model()
    cls = AmpOptimWrapper if "dtype" in kwargs else OptimWrapper
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    wrapper = cls(optimizer=optimizer, accumulative_counts=3, **kwargs)
    wrapper.initialize_count_status(model, 0, len(batches))
    run_items(model, wrapper, batches, as_tensor)
    assert wrapper.step_count == 3 and wrapper.skipped_steps == result["skipped"]
    for actual, wanted in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(actual, wanted, rtol=rtol, atol=atol)


def test_num_items_without_a_run_length_steps_full_windows_only():
    batches, windows = item_windows(ITEM_SIZES[:6], 2)
    expected = make_model()
    plain_item_windows(expected, OPTIMIZERS["adam"](expected.parameters()), windows, Plan())
    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS["adam"](model.parameters()), accumulative_counts=2)
    run_items(model, wrapper, batches)
    for actual, wanted in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6)


def test_num_items_fp16_skipped_step_is_counted_and_its_count_dropped():
    """A scale of 2**40 overflows float16 in the first window: skipped, as in the reference; the next ones apply."""
    plan = Plan(amp_dtype=torch.float16, scaler_kwargs={"init_scale": 2.0**40, "backoff_factor": 2.0**-30})
    batches, windows = item_windows(ITEM_SIZES, 3)
    expected = make_model()
    result = plain_item_windows(expected, OPTIMIZERS["sgd_momentum"](expected.parameters()), windows, plan)
    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=OPTIMIZERS["sgd_momentum"](model.parameters()),
        accumulative_counts=3,
        dtype="fp16",
        loss_scale=plan.scaler_kwargs,
    )
    wrapper.initialize_count_status(model, 0, len(batches))
    run_items(model, wrapper, batches)
    assert result["skipped"] == wrapper.skipped_steps == 1 and wrapper.applied_steps == 2
    for actual, wanted in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(actual, wanted, rtol=5e-3, atol=5e-4)


def test_num_items_members_of_a_dict_count_their_own_items():
    from engine_opt import OptimWrapperDict

    batches, _ = item_windows(ITEM_SIZES, 1)
    models = {"a": make_model(0), "b": make_model(1)}
    wrappers = OptimWrapperDict(
        a=OptimWrapper(OPTIMIZERS["adam"](models["a"].parameters()), accumulative_counts=2),
        b=OptimWrapper(OPTIMIZERS["sgd_momentum"](models["b"].parameters()), accumulative_counts=3),
    )
    wrappers.initialize_count_status(models["a"], 0, len(batches))
    b_batches = [(x[:1], y[:1]) for x, y in batches]  # member b sees one item of each micro-batch
    for index in range(len(batches)):
        run_items(models["a"], wrappers["a"], batches[index : index + 1])
        run_items(models["b"], wrappers["b"], b_batches[index : index + 1])
        if index == 3:
            state = wrappers.state_dict()  # a: between windows; b: one micro-step into its second window
            assert "accumulated_items" not in state["a"] and state["b"]["accumulated_items"] == 1
    for name, optimizer_name, data, size in (("a", "adam", batches, 2), ("b", "sgd_momentum", b_batches, 3)):
        expected = make_model(0 if name == "a" else 1)
        windows = [data[start : start + size] for start in range(0, len(data), size)]
        plain_item_windows(expected, OPTIMIZERS[optimizer_name](expected.parameters()), windows, Plan())
        for actual, wanted in zip(models[name].parameters(), expected.parameters(), strict=True):
            torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cls_kwargs", [{}, {"dtype": "fp16", "loss_scale": {"init_scale": 64.0}}], ids=["fp32", "fp16"]
)
def test_num_items_resumed_mid_window_ends_bitwise_as_the_uninterrupted_run(cls_kwargs):
    batches, _ = item_windows(ITEM_SIZES, 3)

    def build():
        model = make_model()
        optimizer = OPTIMIZERS["adamw"](model.parameters())
        cls = AmpOptimWrapper if cls_kwargs else OptimWrapper
        wrapper = cls(optimizer=optimizer, accumulative_counts=3, clip_grad={"max_norm": 0.5}, **cls_kwargs)
        wrapper.initialize_count_status(model, 0, len(batches))
        return model, wrapper

    model, wrapper = build()
    run_items(model, wrapper, batches, as_tensor=True)
    stopped_model, stopped = build()
    run_items(stopped_model, stopped, batches[:5], as_tensor=True)  # 2 micro-steps (5 + 7 items) into window 2
    saved = roundtrip({"model": stopped_model.state_dict(), "wrapper": stopped.state_dict()})
    assert saved["wrapper"]["accumulated_items"] == 9
    resumed_model, resumed = build()
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["wrapper"])
    run_items(resumed_model, resumed, batches[5:], as_tensor=True)
    assert_same_model(resumed_model, model)
    assert_same_tensors(resumed.state_dict(), wrapper.state_dict())


def test_num_items_a_window_resumed_keeps_its_mode():
    batches, _ = item_windows(ITEM_SIZES, 3)
    model = make_model()
    with_items = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()), accumulative_counts=3)
    run_items(model, with_items, batches[:1])
    without = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()), accumulative_counts=3)
    run_wrapper(model, without, batches[:1])
    fresh = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()), accumulative_counts=3)
    fresh.load_state_dict(with_items.state_dict())
    with pytest.raises(ValueError, match=r"num_items is None.*earlier micro-steps gave num_items"):
        run_wrapper(model, fresh, batches[1:2])
    fresh.load_state_dict(without.state_dict())
    with pytest.raises(ValueError, match=r"num_items=5 given.*earlier micro-steps gave none"):
        run_items(model, fresh, batches[1:2])


@pytest.mark.parametrize(
    ("items", "error", "message"),
    [
        ({"accumulated_items": 0}, ValueError, r"state_dict\['accumulated_items'\] must be a positive int.*got 0"),
        ({"accumulated_items": "9"}, ValueError, r"state_dict\['accumulated_items'\] must be a positive int.*'9'"),
        ({"accumulated_items": True}, ValueError, r"state_dict\['accumulated_items'\] must be a positive int.*True"),
        ({"rank_accumulated_items": [3]}, ValueError, r"'rank_accumulated_items'\] is saved mid-window only"),
    ],
)
def test_num_items_saved_count_is_checked_before_anything_loads(items, error, message):
    batches, _ = item_windows(ITEM_SIZES, 3)
    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()), accumulative_counts=3)
    run_items(model, wrapper, batches[:1])
    state = {**wrapper.state_dict(), **items}
    fresh = OptimWrapper(OPTIMIZERS["sgd_momentum"](make_model().parameters()), accumulative_counts=3)
    before = fresh.state_dict()
    with pytest.raises(error, match=message):
        fresh.load_state_dict(state)
    assert_same_tensors(fresh.state_dict(), before)
    between = {key: value for key, value in state.items() if key != "accumulated_grads"}
    with pytest.raises(ValueError, match="saved mid-window only"):
        fresh.check_state_dict({**between, "accumulated_items": 3})


@pytest.mark.parametrize(
    ("num_items", "error", "message"),
    [
        (0, ValueError, "num_items must be a positive int .*got 0"),
        (-2, ValueError, "num_items must be a positive int .*got -2"),
        (2.0, TypeError, "num_items must be a positive int or a 0-d integer tensor.*got 2.0 of type float"),
        (True, TypeError, "num_items must be a positive int or a 0-d integer tensor.*got True of type bool"),
        ("5", TypeError, "num_items must be a positive int or a 0-d integer tensor.*got '5' of type str"),
        (torch.tensor(5.0), TypeError, "num_items must be .*got a float32 tensor of shape \\(\\)"),
        (torch.tensor([5]), TypeError, "num_items must be .*got a int64 tensor of shape \\(1,\\)"),
        (torch.tensor(True), TypeError, "num_items must be .*got a bool tensor"),
        (torch.tensor(5, device="meta"), ValueError, "num_items must be .*\\(cpu\\), got a tensor on meta"),
    ],
)
def test_num_items_refused_by_name_value_and_what_is_accepted(num_items, error, message):
    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()), accumulative_counts=2)
    x, y = make_batches(1)[0]
    with pytest.raises(error, match=message):
        wrapper.update_params(loss_fn(model(x), y), num_items=num_items)
    assert wrapper.inner_count == 0 and all(param.grad is None for param in model.parameters())


def test_num_items_mixed_in_one_window_is_refused_both_ways_and_nothing_runs():
    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()), accumulative_counts=2)
    (x, y), (x2, y2) = make_batches(2)
    wrapper.update_params(loss_fn(model(x), y), num_items=5)
    grads = [param.grad.clone() for param in model.parameters()]
    with pytest.raises(ValueError, match="num_items is None, but this accumulation window's earlier micro-steps"):
        wrapper.update_params(loss_fn(model(x2), y2))
    with pytest.raises(ValueError, match="num_items is None"):
        wrapper.backward(loss_fn(model(x2), y2))
    assert wrapper.inner_count == 1
    assert_same_tensors([param.grad for param in model.parameters()], grads)
    wrapper.update_params(loss_fn(model(x2), y2), num_items=5)  # the window ends; the next may go without
    wrapper.update_params(loss_fn(model(x), y))
    with pytest.raises(ValueError, match="num_items=5 given, but this accumulation window's earlier micro-steps"):
        wrapper.update_params(loss_fn(model(x2), y2), num_items=5)


def test_num_items_hooks_before_the_step_see_the_window_mean():
    from engine_opt.optim.hooks import StepEvent

    batches, _ = item_windows([3, 5], 2)
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.0), accumulative_counts=2)
    seen = []
    wrapper.register_step_hook(
        lambda w, event, loss: seen.append([p.grad.clone() for p in model.parameters()]),
        [StepEvent.BEFORE_OPTIM_STEP],
    )
    run_items(model, wrapper, batches)
    expected = make_model()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    from oracle import item_loss_sum

    (item_loss_sum(expected(x), y) / 8).backward()
    for actual, wanted in zip(seen[0], expected.parameters(), strict=True):
        torch.testing.assert_close(actual, wanted.grad, rtol=1e-5, atol=1e-6)


def test_a_window_of_no_items_leaves_the_weights_finite():
    """All padding: a tensor count of 0 (not read on the host) divides zero gradients by 1, not by 0."""
    model = torch.nn.Linear(4, 3)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [param.detach().clone() for param in model.parameters()]
    labels = torch.full((5,), -100)
    loss = F.cross_entropy(model(torch.randn(5, 4)), labels, ignore_index=-100, reduction="sum")
    wrapper.update_params(loss, num_items=(labels != -100).sum())
    for param, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, old)


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


def test_a_window_saved_by_two_ranks_continues_in_one_process_from_the_mean_of_their_sums():
    """DDP averages the ranks' gradients when the window ends: the mean of the saved sums stands for them."""
    batches = make_batches(6)
    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS["adamw"](model.parameters()), accumulative_counts=3)
    run_wrapper(model, wrapper, batches[:1])
    first = [param.grad.clone() for param in model.parameters()]
    wrapper.zero_grad()
    run_wrapper(model, wrapper, batches[1:2])  # the second rank's first micro-step, as if in another process
    second = [param.grad.clone() for param in model.parameters()]
    state = {key: value for key, value in wrapper.state_dict().items() if key != "accumulated_grads"}
    state["rank_accumulated_grads"] = [first, second]
    state["counters"] = {**state["counters"], "inner_count": 1}
    fresh_model = make_model()
    fresh = OptimWrapper(OPTIMIZERS["adamw"](fresh_model.parameters()), accumulative_counts=3)
    fresh.load_state_dict(state)
    for param, a, b in zip(fresh_model.parameters(), first, second, strict=True):
        assert torch.equal(param.grad, (a + b) / 2)
    with pytest.raises(
        ValueError, match=r"saved mid-window with num_items by a run of 2 process\(es\), this run has 1"
    ):
        fresh.load_state_dict({**state, "rank_accumulated_items": [2, 3]})
    with pytest.raises(
        ValueError, match=r"'rank_accumulated_grads'\] must be a list of each rank's gradients, got \[\]"
    ):
        fresh.load_state_dict({**state, "rank_accumulated_grads": []})


def test_the_mean_of_the_ranks_sums_keeps_the_gradients_precision():
    model = make_model(dtype=torch.float64)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    state = wrapper.state_dict() | {
        "counters": {"inner_count": 1, "max_counts": -1, "steps": 0, "accumulative_counts": 2}
    }
    sums = [[torch.full_like(param, value) for param in model.parameters()] for value in (0.1, 0.2 + 1e-12)]
    wrapper.load_state_dict(state | {"rank_accumulated_grads": sums})
    for param, a, b in zip(model.parameters(), *sums, strict=True):
        assert param.grad.dtype == torch.float64 and torch.equal(param.grad, (a + b) / 2)
    bad = [sums[0], [None, *sums[1][1:-1]]]
    with pytest.raises(
        ValueError,
        match=r"\['rank_accumulated_grads'\]\[1\] must be a list with a tensor \(or None\) for each of the 6",
    ):
        wrapper.load_state_dict(state | {"rank_accumulated_grads": bad})
    integers = [sums[0], [grad.long() for grad in sums[1]]]
    with pytest.raises(ValueError, match=r"\['rank_accumulated_grads'\]\[1\]\[0\] is a torch.int64 tensor"):
        wrapper.load_state_dict(state | {"rank_accumulated_grads": integers})
