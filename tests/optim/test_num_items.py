"""Token-weighted accumulation (num_items).

The reference is one plain step per window on its items concatenated (oracle.plain_item_windows). The
wrapper sums the micro-batches' summed-loss gradients and divides them by the window's count: the same
update, summed in another order, so the comparison is within float32 rounding (rtol 1e-5, atol 1e-6, as
tests/test_distributed.py's "sum of halves vs whole"); with autocast, within the autocast dtype's rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
    plain_item_windows,
)

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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_ranks_mean_count_divides_in_the_gradients_dtype(monkeypatch, dtype):
    from engine_opt.optim import distributed, num_items

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda items: torch.tensor(7))  # 7 items over 3 ranks
    grad = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dtype)
    param = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
    param.grad = grad.clone()
    num_items.divide_by_items([param], 2)
    # the oracle: the mean over the ranks' gradients divided by the items per rank, 7 / 3, in the gradients' own
    # precision (at least float32's, as for every other division of a window's gradients)
    precision = torch.promote_types(dtype, torch.float32)
    expected = grad / (torch.tensor(7, dtype=precision) / 3)
    assert torch.equal(param.grad, expected.to(dtype))
