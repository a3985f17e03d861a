"""The wrapper as a torch Optimizer: torch's and MMEngine's schedulers on it match a plain optimizer.

Also base_lr as MMEngine derives it, copies of a wrapper, and hooks registered on a copy. Ignite's
schedulers on the wrapper are tested with the trainer, in tests/engine/test_ignite_schedulers.py.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from engine_opt import OptimWrapper

from helpers import momentum_sgd, record_lrs, roundtrip, run_wrapper
from oracle import assert_same_model, assert_same_tensors, loss_fn, make_batches, make_model

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


def scheduler_warnings(caught):
    return [str(w.message) for w in caught if "optimizer.step()" in str(w.message)]


def test_the_wrapper_is_a_torch_optimizer_with_live_views():
    model = make_model()
    optimizer = momentum_sgd(model)
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
    wrapper = OptimWrapper(momentum_sgd(model), accumulative_counts=2)
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
    optimizer = momentum_sgd(expected)
    expected_scheduler = TORCH_SCHEDULES[schedule](optimizer)
    expected_lrs = record_lrs(optimizer)
    for idx, (x, y) in enumerate(batches):
        (loss_fn(expected(x), y) / accumulate).backward()
        if (idx + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
            expected_scheduler.step()

    model = make_model()
    wrapper = OptimWrapper(momentum_sgd(model), accumulative_counts=accumulate)
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
    wrapper = OptimWrapper(momentum_sgd(model), accumulative_counts=2)
    scheduler = torch.optim.lr_scheduler.StepLR(wrapper, step_size=1)
    with pytest.warns(UserWarning, match=r"lr_scheduler.step\(\)` before `optimizer.step\(\)"):
        for x, y in make_batches(2):
            wrapper.update_params(loss_fn(model(x), y))
            scheduler.step()


def test_a_scheduler_and_the_wrapper_resume_mid_window_exactly():
    batches = make_batches(7)
    expected = make_model()
    expected_wrapper = OptimWrapper(momentum_sgd(expected), accumulative_counts=2)
    expected_scheduler = TORCH_SCHEDULES["cosine"](expected_wrapper)
    for x, y in batches:
        expected_wrapper.update_params(loss_fn(expected(x), y))
        if expected_wrapper.should_update():
            expected_scheduler.step()

    model = make_model()
    wrapper = OptimWrapper(momentum_sgd(model), accumulative_counts=2)
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
    wrapper = OptimWrapper(momentum_sgd(model), accumulative_counts=2)
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
    optimizer = momentum_sgd(expected)
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
    wrapper = OptimWrapper(momentum_sgd(model), accumulative_counts=accumulate)
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
    assert OptimWrapper(momentum_sgd(model)).clip_grad_kwargs is None
    assert OptimWrapper(momentum_sgd(model), clip_grad={"type": "value", "clip_value": 0.5}).clip_grad_kwargs == {
        "clip_value": 0.5
    }
    mmengine_optim = pytest.importorskip("mmengine.optim")
    assert mmengine_optim.OptimWrapper(momentum_sgd(model)).clip_grad_kwargs is None


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
