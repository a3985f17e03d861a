"""check_module_state / check_optimizer_state: refuse before loading what torch would refuse, and change nothing.

The oracle is torch's own ``load_state_dict`` on a copy: on generated pairs of
optimizers, whatever torch refuses is refused by the check first, and whatever
the check accepts, torch loads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from engine_opt import OptimWrapper
from engine_opt.optim.state_checks import check_module_state, check_optimizer_state

from oracle import assert_same_tensors, make_model


def optimizer_for(group_sizes, shapes_seed, kind):
    generator = torch.Generator().manual_seed(shapes_seed)
    groups = []
    for size in group_sizes:
        shapes = [tuple(int(d) for d in torch.randint(1, 4, (2,), generator=generator)) for _ in range(size)]
        groups.append({"params": [torch.zeros(shape, requires_grad=True) for shape in shapes]})
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9) if kind == "sgd" else torch.optim.AdamW(groups, lr=0.1)
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.ones_like(param)
    optimizer.step()
    return optimizer


groups = st.lists(st.integers(1, 3), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(saved_groups=groups, target_groups=groups, seed=st.integers(0, 3), kind=st.sampled_from(["sgd", "adamw"]))
def test_what_torch_refuses_is_refused_first_and_what_passes_loads(saved_groups, target_groups, seed, kind):
    saved = optimizer_for(saved_groups, seed, kind).state_dict()
    target = optimizer_for(target_groups, 0, kind)
    before = copy.deepcopy(target.state_dict())
    try:
        check_optimizer_state(target, saved)
    except ValueError:
        assert_same_tensors(target.state_dict(), before)  # the check changed nothing
        return
    copy.deepcopy(target).load_state_dict(saved)  # accepted by the check: torch loads it
    shapes_match = [p.shape for g in target.param_groups for p in g["params"]] == [
        p.shape for g in optimizer_for(saved_groups, seed, kind).param_groups for p in g["params"]
    ]
    assert shapes_match, "a state whose buffers have other shapes than the parameters was accepted"


def test_a_state_for_other_shapes_is_refused_naming_the_buffer():
    saved = optimizer_for([2], 1, "adamw").state_dict()
    target = optimizer_for([2], 2, "adamw")
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\]\['exp_avg'\] has shape"):
        check_optimizer_state(target, saved)


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        ({"lr": 0.1}, r"lacks the optimizer key\(s\) \['state', 'param_groups'\]"),
        ({"state": {}, "param_groups": "x"}, r"must be a list of dicts, each with a 'params' list of parameter ids"),
        ({"state": [], "param_groups": []}, r"state_dict\['state'\] must be a dict"),
    ],
)
def test_malformed_optimizer_states(saved, message):
    with pytest.raises((TypeError, ValueError), match=message):
        check_optimizer_state(optimizer_for([1], 0, "sgd"), saved)


def test_module_states_must_have_the_same_keys_and_shapes():
    model = make_model()
    check_module_state(model, make_model(seed=5).state_dict())
    with pytest.raises(ValueError, match=r"the model lacks \['extra'\] and the checkpoint lacks \['3.bias'\]"):
        check_module_state(model, {**{k: v for k, v in model.state_dict().items() if k != "3.bias"}, "extra": 1})
    wide = nn.Sequential(nn.Linear(4, 9), nn.LayerNorm(9), nn.ReLU(), nn.Linear(9, 2))
    with pytest.raises(ValueError, match=r"shapes differ: 0.weight: saved \(9, 4\), model \(8, 4\)"):
        check_module_state(model, wide.state_dict())


def test_a_data_parallel_module_is_checked_as_the_module_it_wraps():
    model = make_model()
    saved = make_model(seed=2).state_dict()  # the wrapped module's keys (as Ignite's Checkpoint saves them)
    check_module_state(nn.DataParallel(model), saved)
    model.load_state_dict(saved)  # torch's own load of the module it wraps takes what the check accepted
    assert_same_tensors(model.state_dict(), saved)
    wide = nn.Sequential(nn.Linear(4, 9), nn.LayerNorm(9), nn.ReLU(), nn.Linear(9, 2))
    with pytest.raises(ValueError, match=r"shapes differ: 0.weight: saved \(9, 4\), model \(8, 4\)"):
        check_module_state(nn.DataParallel(model), wide.state_dict())
    with pytest.raises(ValueError, match=r"the model lacks \['module.0.bias'"):  # the DataParallel's own keys
        check_module_state(nn.DataParallel(model), nn.DataParallel(make_model()).state_dict())
    assert_same_tensors(model.state_dict(), saved)  # the refusals changed nothing


def test_a_state_saved_before_a_schedule_was_added_loads():
    from engine_opt.optim.schedulers import build_param_scheduler

    model = torch.nn.Linear(2, 2)
    saved = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)).state_dict()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    build_param_scheduler(
        wrapper,
        [dict(type="LinearMomentum", start_factor=0.5, end=3), dict(type="OneCycleLR", eta_max=1.0, total_steps=5)],
    )
    wrapper.load_state_dict(
        saved
    )  # the groups' initial_momentum, max_lr, min_lr are the schedule's, not the optimizer's
    assert wrapper.param_groups[0]["momentum"] == 0.9
