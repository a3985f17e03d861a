"""build_optim_wrapper: configs give the same training as hand-built objects; paramwise grouping; errors."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from engine_opt import AmpOptimWrapper, OptimWrapper, OptimWrapperDict, build_optim_wrapper

from oracle import Plan, assert_same_model, assert_same_tensors, loss_fn, make_batches, make_model, plain_loop


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv1d(2, 4, 3, bias=True), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.tied = self.head  # shared module: its parameters appear once


def test_config_builds_what_the_plain_loop_does():
    cfg = dict(
        type="AmpOptimWrapper",
        optimizer=dict(type="AdamW", lr=1e-2, weight_decay=0.1),
        accumulative_counts=3,
        clip_grad=dict(max_norm=0.05),
        dtype="bfloat16",
    )
    before = copy.deepcopy(cfg)
    batches = make_batches(7)
    expected = make_model()
    expected_optimizer = torch.optim.AdamW(expected.parameters(), lr=1e-2, weight_decay=0.1)
    plain_loop(expected, expected_optimizer, batches, Plan(accumulate=3, clip_norm=0.05, amp_dtype=torch.bfloat16))

    model = make_model()
    wrapper = build_optim_wrapper(model, cfg)
    assert cfg == before
    assert type(wrapper) is AmpOptimWrapper and wrapper.cast_dtype is torch.bfloat16
    wrapper.initialize_count_status(model, 0, 7)
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict(), expected_optimizer.state_dict())


def test_defaults_and_classes():
    model = make_model()
    wrapper = build_optim_wrapper(model, dict(optimizer=dict(type="SGD", lr=0.1)))
    assert type(wrapper) is OptimWrapper and isinstance(wrapper.optimizer, torch.optim.SGD)
    assert len(wrapper.param_groups) == 1 and len(wrapper.param_groups[0]["params"]) == 6
    wrapper = build_optim_wrapper(model, dict(type=AmpOptimWrapper, optimizer=dict(type=torch.optim.RMSprop)))
    assert isinstance(wrapper.optimizer, torch.optim.RMSprop) and wrapper.get_lr() == {"lr": [0.01]}


def groups_by_name(model, wrapper):
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        ({k: v for k, v in g.items() if k in ("lr", "weight_decay", "momentum")}, [names[id(p)] for p in g["params"]])
        for g in wrapper.param_groups
    ]


def test_paramwise_groups_parameters_that_share_settings():
    model = Net()
    paramwise = dict(
        bias_lr_mult=2.0,
        bias_decay_mult=0.0,
        norm_decay_mult=0.5,
        custom_keys={"head": dict(lr_mult=0.1, decay_mult=0.0, momentum=0.5)},
    )
    cfg = dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=1e-2), paramwise_cfg=paramwise)
    before = copy.deepcopy(cfg)
    wrapper = build_optim_wrapper(model, cfg)
    assert cfg == before
    assert groups_by_name(model, wrapper) == [
        ({"lr": 0.1, "weight_decay": 1e-2, "momentum": 0.9}, ["backbone.0.weight"]),
        ({"lr": 0.2, "weight_decay": 0.0, "momentum": 0.9}, ["backbone.0.bias"]),
        ({"lr": 0.1, "weight_decay": 0.005, "momentum": 0.9}, ["backbone.1.weight", "backbone.1.bias"]),
        ({"lr": 0.1 * 0.1, "weight_decay": 0.0, "momentum": 0.5}, ["head.weight", "head.bias"]),
    ]
    assert wrapper.get_lr()["base_lr"] == [0.1]


def test_longest_custom_key_wins_and_default_weight_decay_is_used():
    model = Net()
    cfg = dict(
        optimizer=dict(type="AdamW", lr=1.0),  # AdamW's own default weight_decay (0.01) is the base
        paramwise_cfg=dict(custom_keys={"backbone": dict(lr_mult=0.5), "backbone.1": dict(decay_mult=0.0)}),
    )
    assert groups_by_name(model, build_optim_wrapper(model, cfg)) == [
        ({"lr": 0.5, "weight_decay": 0.01}, ["backbone.0.weight", "backbone.0.bias"]),
        ({"lr": 1.0, "weight_decay": 0.0}, ["backbone.1.weight", "backbone.1.bias"]),
        ({"lr": 1.0, "weight_decay": 0.01}, ["head.weight", "head.bias"]),
    ]


def test_dict_config_builds_one_wrapper_per_submodule():
    gan = nn.ModuleDict({"gen": nn.Linear(2, 2), "disc": nn.Sequential(nn.Linear(2, 1))})
    cfg = {
        "gen": dict(type="AmpOptimWrapper", optimizer=dict(type="Adam", lr=1e-3)),
        "disc": dict(optimizer=dict(type="SGD", lr=0.01), accumulative_counts=2),
    }
    wrappers = build_optim_wrapper(gan, cfg)
    assert isinstance(wrappers, OptimWrapperDict) and list(wrappers) == ["gen", "disc"]
    assert wrappers["gen"].param_groups[0]["params"] == list(gan["gen"].parameters())
    assert wrappers["disc"].param_groups[0]["params"] == list(gan["disc"].parameters())
    assert wrappers.get_lr() == {"gen.lr": [1e-3], "disc.lr": [0.01]}
    with pytest.raises(ValueError, match=r"'critic'.*children: \['gen', 'disc'\]"):
        build_optim_wrapper(gan, {"critic": dict(optimizer=dict(type="SGD", lr=0.1))})


@pytest.mark.parametrize(
    ("cfg", "error", "words"),
    [
        (
            dict(type="ApexWrapper", optimizer=dict(type="SGD", lr=0.1)),
            ValueError,
            ["'ApexWrapper'", "AmpOptimWrapper"],
        ),
        (dict(optimizer=dict(type="Sgd", lr=0.1)), ValueError, ["'Sgd'", "SGD", "AdamW"]),
        (dict(optimizer=dict(type=OptimWrapper)), ValueError, ["optimizer type must be an optimizer", "OptimWrapper"]),
        (dict(optimizer=dict(type="engine_opt.AmpOptimWrapper")), ValueError, ["'engine_opt.AmpOptimWrapper'"]),
        (dict(optimizer=dict(lr=0.1)), ValueError, ["'type'"]),
        (dict(optimizer=dict(type="SGD", lr=0.1, betas=(0.9, 0.99))), ValueError, ["SGD", "betas", "momentum"]),
        (dict(optimizer=dict(type="SGD", lr=0.1), accumulate=2), ValueError, ["accumulate", "accumulative_counts"]),
        (dict(optimizer=dict(type="SGD", lr=0.1), dtype="bf16"), ValueError, ["dtype"]),
        (dict(type="OptimWrapper"), ValueError, ["'optimizer'"]),
        (
            dict(optimizer=dict(type="SGD", lr=0.1), paramwise_cfg=dict(bias_mult=2)),
            ValueError,
            ["bias_mult", "bias_lr_mult"],
        ),
        (
            dict(optimizer=dict(type="SGD", lr=0.1), paramwise_cfg=dict(custom_keys={"0": 0.1})),
            TypeError,
            ["custom_keys"],
        ),
        (dict(optimizer="SGD"), TypeError, ["optimizer", "'SGD'"]),
        (dict(optimizer=dict(type="SGD", lr=0.1), accumulative_counts=0), ValueError, ["accumulative_counts"]),
        ({"gen": 1}, ValueError, ["submodule"]),
        ({}, ValueError, ["cfg"]),
        ([("optimizer", {})], TypeError, ["cfg must be a dict"]),
    ],
)
def test_bad_configs(cfg, error, words):
    with pytest.raises(error) as info:
        build_optim_wrapper(make_model(), cfg)
    for word in words:
        assert word in str(info.value)


def test_lr_mult_needs_a_learning_rate():
    class NoDefault(torch.optim.SGD):
        def __init__(self, params, lr, momentum=0.0):
            super().__init__(params, lr=lr, momentum=momentum)

    with pytest.raises(ValueError, match=r"lr_mult.*no 'lr'"):
        build_optim_wrapper(make_model(), dict(optimizer=dict(type=NoDefault), paramwise_cfg=dict(bias_lr_mult=2)))


def test_model_without_trainable_parameters_and_non_modules():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optim_wrapper(frozen, dict(optimizer=dict(type="SGD", lr=0.1)))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        build_optim_wrapper("model", dict(optimizer=dict(type="SGD", lr=0.1)))


def test_groups_made_from_paramwise_cfg_are_named_after_their_rules():
    model = make_model()  # Linear, LayerNorm, ReLU, Linear
    wrapper = build_optim_wrapper(
        model,
        dict(
            optimizer=dict(type="AdamW", lr=0.01, weight_decay=0.1),
            paramwise_cfg=dict(bias_decay_mult=0.0, norm_decay_mult=0.0, custom_keys={"3.": dict(lr_mult=0.5)}),
        ),
    )
    assert [(group["name"], len(group["params"])) for group in wrapper.param_groups] == [
        ("default", 1),  # 0.weight
        ("bias-norm", 3),  # 0.bias, 1.weight, 1.bias: the same settings, one group
        ("custom-3", 2),  # the custom key 3.
    ]
    assert "name" not in build_optim_wrapper(model, dict(optimizer=dict(type="SGD", lr=0.1))).param_groups[0]


class Lion(torch.optim.Optimizer):
    """An optimizer whose ``__init__`` takes ``**kwargs`` straight to ``Optimizer`` (as many third-party ones do)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, **kwargs})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad.sign(), alpha=-group["lr"])


def test_optimizer_taking_kwargs_gets_its_options():
    model = nn.Linear(2, 2)
    cfg = dict(
        optimizer=dict(type=Lion, lr=0.02, betas=(0.8, 0.9), weight_decay=0.1),
        paramwise_cfg=dict(bias_lr_mult=2.0, bias_decay_mult=0.0),
    )
    groups = build_optim_wrapper(model, cfg).param_groups
    assert [(g["lr"], g["betas"], g["weight_decay"]) for g in groups] == [
        (0.02, (0.8, 0.9), 0.1),
        (0.04, (0.8, 0.9), 0.0),
    ]


def test_dotted_import_path_as_type(monkeypatch):
    import sys
    import types

    package, module = types.ModuleType("mypkg"), types.ModuleType("mypkg.optim")
    module.Lion = Lion
    monkeypatch.setitem(sys.modules, "mypkg", package)
    monkeypatch.setitem(sys.modules, "mypkg.optim", module)
    wrapper = build_optim_wrapper(make_model(), dict(optimizer=dict(type="mypkg.optim.Lion", lr=0.5)))
    assert type(wrapper.optimizer) is Lion and wrapper.get_lr() == {"lr": [0.5]}
    assert type(build_optim_wrapper(make_model(), dict(optimizer=dict(type="torch.optim.NAdam"))).optimizer) is (
        torch.optim.NAdam
    )
    for missing in ("mypkg.optim.Lamb", "nopkg.optim.Lion", "mypkg.optim"):
        with pytest.raises(ValueError, match=rf"optimizer type must be .*dotted import path.*got '{missing}'"):
            build_optim_wrapper(make_model(), dict(optimizer=dict(type=missing)))


def test_zero_redundancy_optimizer_in_mmengines_form():
    import torch.distributed as dist

    batches = make_batches(4)
    expected = make_model()
    expected_optimizer = torch.optim.AdamW(expected.parameters(), lr=1e-2, weight_decay=0.1)
    plain_loop(expected, expected_optimizer, batches, Plan(accumulate=1))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = make_model()
        cfg = dict(optimizer=dict(type="ZeroRedundancyOptimizer", optimizer_type="AdamW", lr=1e-2, weight_decay=0.1))
        wrapper = build_optim_wrapper(model, cfg)
        assert isinstance(wrapper.optimizer, torch.distributed.optim.ZeroRedundancyOptimizer)
        assert type(wrapper.optimizer.optim) is torch.optim.AdamW
        for x, y in batches:
            wrapper.update_params(loss_fn(model(x), y))
        assert_same_model(model, expected)
        with pytest.raises(ValueError, match="optimizer_type"):
            build_optim_wrapper(model, dict(optimizer=dict(type="ZeroRedundancyOptimizer", lr=0.1)))
        with pytest.raises(ValueError, match=r"optimizer_type must be .*got 'Adamw'"):
            build_optim_wrapper(model, dict(optimizer=dict(type="ZeroRedundancyOptimizer", optimizer_type="Adamw")))
        with pytest.raises(ValueError, match=r"AdamW got unknown key\(s\) \['momentum'\]"):
            cfg = dict(type="ZeroRedundancyOptimizer", optimizer_type="AdamW", momentum=0.9)
            build_optim_wrapper(model, dict(optimizer=cfg))
    finally:
        dist.destroy_process_group()


def test_a_dotted_path_whose_module_fails_to_import_says_why(tmp_path, monkeypatch):
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "optim.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"importing brokenpkg.optim failed: No module named 'a_dependency_that_is_n"):
        build_optim_wrapper(make_model(), dict(optimizer=dict(type="brokenpkg.optim.Lion")))
    for odd in (".SGD", "SGD.", "a..b"):
        with pytest.raises(ValueError, match=rf"dotted import path.*got '{re.escape(odd)}'"):
            build_optim_wrapper(make_model(), dict(optimizer=dict(type=odd)))
