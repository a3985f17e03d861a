"""MMEngine's optimizer checkpoints resume here exactly, and this project's load into MMEngine."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine_opt import build_optim_wrapper
from engine_opt.optim.param_layout import in_model_order, regrouped

mmengine_optim = pytest.importorskip("mmengine.optim")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv1d(2, 4, 3)
        self.norm = nn.BatchNorm1d(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.stem(x)).mean(-1)
        return self.head(self.frozen(h)) * self.scale


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 2, 6, generator=generator), torch.randn(5, 3, generator=generator)) for _ in range(count)]


def train(wrapper, model: nn.Module, data) -> None:
    for x, y in data:
        wrapper.update_params(((model(x) - y) ** 2).mean())


OPTIMIZERS = [
    dict(type="SGD", lr=0.05, momentum=0.9, weight_decay=1e-3),
    dict(type="AdamW", lr=1e-2, weight_decay=0.05, betas=(0.8, 0.95)),
]
PARAMWISE = [
    None,
    dict(bias_lr_mult=2.0, norm_decay_mult=0.0, flat_decay_mult=0.5, custom_keys={"head": dict(lr_mult=0.1)}),
    dict(bias_decay_mult=0.0, custom_keys={".scale": dict(decay_mult=0.0, lr_mult=3.0)}),
]


def config(optimizer, paramwise, accumulate=1, clip=None):
    cfg = dict(optimizer=copy.deepcopy(optimizer), accumulative_counts=accumulate, clip_grad=clip)
    if paramwise is not None:
        cfg["paramwise_cfg"] = copy.deepcopy(paramwise)
    return cfg


@pytest.mark.parametrize("clip", [None, dict(max_norm=0.05)], ids=["", "clipped"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=["sgd", "adamw"])
@pytest.mark.parametrize("paramwise", PARAMWISE, ids=["plain", "paramwise", "custom"])
def test_mmengine_checkpoint_resumes_exactly(optimizer, paramwise, clip):
    data = batches(6)
    theirs_model = Net()
    theirs = mmengine_optim.build_optim_wrapper(theirs_model, config(optimizer, paramwise, 2, clip))
    train(theirs, theirs_model, data[:4])  # two windows
    saved_model = copy.deepcopy(theirs_model.state_dict())
    saved = copy.deepcopy(theirs.state_dict())
    train(theirs, theirs_model, data[4:])  # MMEngine's own continuation

    ours_model = Net()
    ours_model.load_state_dict(saved_model)
    ours = build_optim_wrapper(ours_model, config(optimizer, paramwise, 2, clip))
    before = copy.deepcopy(saved)
    ours.load_state_dict(saved)
    assert str(saved) == str(before)  # the caller's dict is left as it was
    train(ours, ours_model, data[4:])
    for name, value in theirs_model.state_dict().items():
        assert torch.equal(value, ours_model.state_dict()[name]), name


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=["sgd", "adamw"])
@pytest.mark.parametrize("paramwise", PARAMWISE, ids=["plain", "paramwise", "custom"])
def test_our_checkpoint_loads_into_mmengine(optimizer, paramwise):
    data = batches(6)
    ours_model = Net()
    ours = build_optim_wrapper(ours_model, config(optimizer, paramwise))
    train(ours, ours_model, data[:3])
    saved_model = copy.deepcopy(ours_model.state_dict())
    state = copy.deepcopy(ours.state_dict() if paramwise is None else in_model_order(ours.state_dict()))
    train(ours, ours_model, data[3:])

    theirs_model = Net()
    theirs_model.load_state_dict(saved_model)
    theirs = mmengine_optim.build_optim_wrapper(theirs_model, config(optimizer, paramwise))
    theirs.load_state_dict(state)
    train(theirs, theirs_model, data[3:])
    for name, value in theirs_model.state_dict().items():
        assert torch.equal(value, ours_model.state_dict()[name]), name


def test_a_state_saved_with_another_paramwise_cfg_is_refused_and_nothing_changes():
    model = Net()
    theirs = mmengine_optim.build_optim_wrapper(model, config(OPTIMIZERS[0], PARAMWISE[2]))
    train(theirs, model, batches(1))
    ours = build_optim_wrapper(Net(), config(OPTIMIZERS[0], PARAMWISE[1]))
    before = copy.deepcopy(ours.optimizer.state_dict())
    with pytest.raises(ValueError, match=r"parameters .* different settings .*another paramwise_cfg"):
        ours.load_state_dict(theirs.state_dict())
    assert str(ours.optimizer.state_dict()) == str(before)


def test_a_state_of_another_parameter_count_is_refused_naming_the_counts():
    ours = build_optim_wrapper(Net(), config(OPTIMIZERS[0], PARAMWISE[1]))
    mismatched = {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]}  # one parameter: not this model's
    for attempt in (lambda: regrouped(ours.optimizer, mismatched), lambda: ours.load_state_dict(mismatched)):
        with pytest.raises(ValueError, match=r"holds 1 parameter\(s\) in 1 group\(s\), this optimizer 7 in 5"):
            attempt()


@pytest.mark.parametrize("saved_with", [None, dict(norm_decay_mult=1.0)], ids=["no-paramwise", "other-paramwise"])
def test_a_state_that_would_undo_this_paramwise_cfg_is_refused_and_nothing_changes(saved_with):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))

    model = make()
    theirs = mmengine_optim.build_optim_wrapper(model, config(OPTIMIZERS[0], saved_with))
    theirs.update_params(model(torch.randn(4, 3)).square().mean())
    ours = build_optim_wrapper(make(), config(OPTIMIZERS[0], dict(norm_decay_mult=0.0)))
    before = copy.deepcopy(ours.optimizer.state_dict())
    with pytest.raises(ValueError, match=r"the same settings, which this optimizer's paramwise_cfg sets apart"):
        ours.load_state_dict(theirs.state_dict())
    assert str(ours.optimizer.state_dict()) == str(before)


def test_a_saved_model_order_must_be_this_builds():
    ours = build_optim_wrapper(Net(), config(OPTIMIZERS[0], PARAMWISE[1]))
    state = copy.deepcopy(ours.state_dict())
    state["param_groups"][0]["model_order"] = [5]
    with pytest.raises(ValueError, match=r"model positions \[\[5\], .*another model or paramwise_cfg"):
        ours.load_state_dict(state)


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ({"state": {}, "param_groups": [{"params": 0}]}, "each with a 'params' list of parameter ids"),
        ({"state": {}, "param_groups": [{"params": [[0]]}]}, "each with a 'params' list of parameter ids"),
    ],
)
def test_malformed_states_are_named(state, words):
    ours = build_optim_wrapper(Net(), config(OPTIMIZERS[0], PARAMWISE[1]))
    with pytest.raises(ValueError, match=words):
        ours.load_state_dict(state)
    with pytest.raises(ValueError, match="param_groups"):
        in_model_order(state if state["param_groups"][0]["params"] != 0 else {"state": {}})
    with pytest.raises(ValueError, match=r"2 parameter\(s\) but a model_order of 1"):
        in_model_order({"state": {}, "param_groups": [{"params": [0, 1], "model_order": [0]}]})


def test_groups_keep_their_names_when_the_layouts_hold_equal_counts():
    cfg = config(OPTIMIZERS[1], dict(bias_decay_mult=0.0))
    theirs = mmengine_optim.build_optim_wrapper(nn.Linear(2, 2), copy.deepcopy(cfg))  # one group per parameter
    ours = build_optim_wrapper(nn.Linear(2, 2), cfg)  # here too: two groups of one
    ours.load_state_dict(theirs.state_dict())
    assert [(g["name"], g["model_order"], g["weight_decay"]) for g in ours.param_groups] == [
        ("default", [0], 0.05),
        ("bias", [1], 0.0),
    ]
