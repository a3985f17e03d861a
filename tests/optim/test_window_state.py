"""The wrapper's saved state and its mid-window state, against the plain loop of tests/support/oracle.py.

Resuming between micro-steps, states of plain optimizers, loads that change nothing when they fail, a
state saved between windows, and a window saved by several ranks (the mean of their sums).
"""

from __future__ import annotations

import copy

import pytest
import torch

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


@pytest.mark.parametrize(("saved", "loaded"), [("AdamW", "Adam"), ("Adam", "AdamW")])
def test_another_optimizers_state_is_refused_by_name_the_wrappers_and_a_plain_ones(saved, loaded):
    model = make_model()
    make = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
    source = OptimWrapper(make[saved](model.parameters(), lr=0.01, weight_decay=0.1))
    source.update_params(loss_fn(model(torch.ones(2, 4)), torch.zeros(2, 2)))
    target = OptimWrapper(make[loaded](model.parameters(), lr=0.01, weight_decay=0.1))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(
        ValueError, match=rf"state_dict is the state of the optimizer {saved}, this wrapper's is {loaded}"
    ):
        target.load_state_dict(source.state_dict())
    plain = {key: value for key, value in source.state_dict().items() if key in ("state", "param_groups")}
    with pytest.raises(ValueError, match=r"has decoupled_weight_decay=.*optimizer with(out)? decoupled weight"):
        target.load_state_dict(plain)  # a plain optimizer's state says it by its flag
    assert_same_tensors(target.state_dict(), before)
    same = OptimWrapper(make[saved](model.parameters(), lr=0.01, weight_decay=0.1))
    same.load_state_dict(source.state_dict())
    assert_same_tensors(same.state_dict(), source.state_dict())


def test_a_zero_redundancy_optimizers_state_records_the_optimizer_inside_it(tmp_path):
    """A consolidated ZeRO(AdamW) state loads into an AdamW wrapper (the same steps), not into an Adam one."""
    from torch import distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = make_model()
        zero = OptimWrapper(ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.01))
        zero.update_params(loss_fn(model(torch.ones(2, 4)), torch.zeros(2, 2)))
        state = zero.state_dict()
    finally:
        dist.destroy_process_group()
    assert state["optimizer_type"] == "AdamW"
    OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.01)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state of the optimizer AdamW, this wrapper's is Adam"):
        OptimWrapper(torch.optim.Adam(model.parameters(), lr=0.01)).load_state_dict(state)


@pytest.mark.parametrize(
    ("entry", "error", "message"),
    [
        ({"optimizer_type": 5}, TypeError, r"\['optimizer_type'\] must be a class name \(a str\), got 5"),
        ({"optimizer_type": b"Adam"}, TypeError, r"must be a class name"),
    ],
)
def test_a_malformed_optimizer_type_is_refused_by_type(entry, error, message):
    model = make_model()
    wrapper = OptimWrapper(torch.optim.Adam(model.parameters(), lr=0.01))
    with pytest.raises(error, match=message):
        wrapper.load_state_dict(wrapper.state_dict() | entry)


def test_nadam_with_another_weight_decay_kind_is_refused_with_what_it_is():
    model = make_model()
    nadam = torch.optim.NAdam(model.parameters(), decoupled_weight_decay=True)
    state = nadam.state_dict()
    with pytest.raises(ValueError, match=r"an optimizer with decoupled weight decay \(AdamW is Adam with it\)"):
        OptimWrapper(torch.optim.NAdam(model.parameters())).load_state_dict(state)
    state["param_groups"][0]["decoupled_weight_decay"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"\['decoupled_weight_decay'\] must be True or False"):
        OptimWrapper(torch.optim.NAdam(model.parameters())).load_state_dict(state)
