"""Muon for the 2-D hidden weights beside AdamW for the rest, as one wrapper, against the two stepped by hand.

The oracle is the loop people write today: two torch optimizers over a hand-made split of the parameters,
one clip over all of them, both stepped and zeroed at each window's end.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_opt import OptimWrapper, OptimWrapperDict, StepEvent, build_optim_wrapper
from engine_opt.optim import RoutedOptimizer

from oracle import assert_same_model, assert_same_tensors


class Net(nn.Module):
    """Token embedding, two hidden linear layers with a norm, a head: what Muon recipes split."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(12, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8, bias=False))
        self.head = nn.Linear(8, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens)).mean(1))


def batches(n: int = 6):
    generator = torch.Generator().manual_seed(3)
    return [
        (torch.randint(0, 12, (4, 5), generator=generator), torch.randn(4, 2, generator=generator)) for _ in range(n)
    ]


ROUTES = {
    "muon": {
        "ndim": 2,
        "module_types": ["Linear"],
        "exclude_names": ["head"],
        "optimizer": {"type": "Muon", "lr": 0.02},
    }
}
ADAMW = {"type": "AdamW", "lr": 0.01, "weight_decay": 0.01}


def config(**extra):
    return {"optimizer": dict(ADAMW), "routes": copy.deepcopy(ROUTES), **extra}


def by_hand(model):
    """The split written out: Muon over the hidden Linear weights, AdamW over everything else, model order."""
    hidden = [model.body[0].weight, model.body[3].weight]
    rest = [param for param in model.parameters() if all(param is not h for h in hidden)]
    return torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=0.01, weight_decay=0.01)


def hand_loop(model, data, accumulate=1, clip=None):
    muon, adamw = by_hand(model)
    for index, (x, y) in enumerate(data):
        (F.mse_loss(model(x), y) / accumulate).backward()
        if (index + 1) % accumulate == 0:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            muon.step()
            adamw.step()
            muon.zero_grad()
            adamw.zero_grad()
    return muon, adamw


def wrapper_loop(wrapper, model, data):
    for x, y in data:
        with wrapper.optim_context(model):
            loss = F.mse_loss(model(x), y)
        wrapper.update_params(loss)


@pytest.mark.parametrize(("accumulate", "clip"), [(1, None), (2, None), (1, 0.1), (3, 0.1)])
def test_a_routed_wrapper_is_muon_and_adamw_stepped_by_hand_bitwise(accumulate, clip):
    expected, model = Net(), Net()
    muon, adamw = hand_loop(expected, batches(), accumulate, clip)
    cfg = config(accumulative_counts=accumulate, **({} if clip is None else {"clip_grad": {"max_norm": clip}}))
    wrapper = build_optim_wrapper(model, cfg)
    wrapper_loop(wrapper, model, batches())
    assert_same_model(model, expected)
    routed = wrapper.optimizer
    assert isinstance(routed, RoutedOptimizer) and list(routed.optimizers) == ["muon", "default"]
    assert_same_tensors(routed["muon"].state_dict()["state"], muon.state_dict()["state"])
    assert_same_tensors(routed["default"].state_dict()["state"], adamw.state_dict()["state"])
    assert wrapper.applied_steps == 6 // accumulate
    assert cfg["routes"] == ROUTES  # the caller's config untouched


def test_groups_lrs_and_a_schedule_per_optimizer_are_the_members():
    expected, model = Net(), Net()
    muon, adamw = by_hand(expected)
    hand_schedule = torch.optim.lr_scheduler.LambdaLR(muon, lambda step: 1 / (1 + step))
    wrapper = build_optim_wrapper(model, config())
    assert wrapper.get_lr() == {"lr": [0.02, 0.01]}
    schedule = torch.optim.lr_scheduler.LambdaLR(wrapper.optimizer["muon"], lambda step: 1 / (1 + step))
    for x, y in batches():
        F.mse_loss(expected(x), y).backward()
        muon.step()
        adamw.step()
        muon.zero_grad()
        adamw.zero_grad()
        hand_schedule.step()
        wrapper.update_params(F.mse_loss(model(x), y))
        schedule.step()
    assert_same_model(model, expected)
    assert wrapper.get_lr() == {"lr": [muon.param_groups[0]["lr"], 0.01]}
    everything = torch.optim.lr_scheduler.StepLR(wrapper, step_size=1, gamma=0.5)  # a schedule over all groups
    wrapper.update_params(F.mse_loss(model(batches(1)[0][0]), batches(1)[0][1]))
    everything.step()
    assert wrapper.get_lr() == {"lr": [muon.param_groups[0]["lr"] * 0.5, 0.005]}


def test_a_checkpoint_mid_window_resumes_bitwise():
    expected, model = Net(), Net()
    hand_loop(expected, batches(), accumulate=2, clip=0.1)
    cfg = config(accumulative_counts=2, clip_grad={"max_norm": 0.1})
    wrapper = build_optim_wrapper(model, cfg)
    wrapper_loop(wrapper, model, batches()[:3])
    state = copy.deepcopy(wrapper.state_dict())
    assert state["optimizer_type"] == "RoutedOptimizer(muon=Muon, default=AdamW)"
    resumed = Net(seed=9)
    resumed.load_state_dict(model.state_dict())
    again = build_optim_wrapper(resumed, cfg)
    again.load_state_dict(state)
    wrapper_loop(again, resumed, batches()[3:])
    assert_same_model(resumed, expected)


def test_after_a_load_the_groups_are_the_members_new_ones():
    model = Net()
    wrapper = build_optim_wrapper(model, config())
    wrapper.load_state_dict(copy.deepcopy(build_optim_wrapper(Net(), config()).state_dict()))
    schedule = torch.optim.lr_scheduler.StepLR(wrapper, step_size=1, gamma=0.5)
    wrapper.update_params(F.mse_loss(model(batches(1)[0][0]), batches(1)[0][1]))
    schedule.step()
    routed = wrapper.optimizer
    assert [routed["muon"].param_groups[0]["lr"], routed["default"].param_groups[0]["lr"]] == [0.01, 0.005]
    assert all(
        a is b
        for a, b in zip(routed.param_groups, routed["muon"].param_groups + routed["default"].param_groups, strict=True)
    )


def test_another_optimizers_state_is_refused_and_loses_nothing():
    model = Net()
    wrapper = build_optim_wrapper(model, config())
    wrapper_loop(wrapper, model, batches(2))
    before = copy.deepcopy(wrapper.state_dict())
    plain = OptimWrapper(torch.optim.AdamW(Net().parameters(), lr=0.01))
    with pytest.raises(ValueError, match=r"the optimizer AdamW, this wrapper's is RoutedOptimizer\(muon=Muon"):
        wrapper.load_state_dict(plain.state_dict())
    assert_same_tensors(wrapper.state_dict(), before)


def test_paramwise_cfg_applies_within_each_route_from_its_own_optimizers_lr_and_decay():
    model = Net()
    wrapper = build_optim_wrapper(model, config(paramwise_cfg={"bias_lr_mult": 2.0, "norm_decay_mult": 0.0}))
    groups = {
        group["name"]: (len(group["params"]), group["lr"], group["weight_decay"]) for group in wrapper.param_groups
    }
    assert groups == {
        "muon/default": (2, 0.02, 0.1),  # Muon's own lr, and its default weight decay
        "default/default": (2, 0.01, 0.01),  # the embedding and the head's weight
        "default/bias": (2, 0.02, 0.01),  # AdamW's lr doubled
        "default/norm": (2, 0.01, 0.0),
    }


def test_one_overflowing_member_skips_the_whole_update():
    model = Net()
    cfg = {**config(), "type": "AmpOptimWrapper", "dtype": "fp16", "loss_scale": {"init_scale": 256.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16 autocast on CPU may warn, depending on the build
        wrapper = build_optim_wrapper(model, cfg)
    before = copy.deepcopy(model.state_dict())
    x, y = batches(1)[0]
    loss = F.mse_loss(model(x), y) + model.body[0].weight.sum() * torch.inf  # only Muon's gradient overflows
    wrapper.update_params(loss)
    assert (wrapper.skipped_steps, wrapper.loss_scaler.get_scale()) == (1, 128.0)
    assert_same_tensors(dict(model.state_dict()), before)  # AdamW did not step either


def test_a_routed_member_of_an_optimizer_dict():
    model = nn.ModuleDict({"gen": Net(), "disc": nn.Linear(2, 1)})
    wrappers = build_optim_wrapper(model, {"gen": config(), "disc": {"optimizer": {"type": "SGD", "lr": 0.1}}})
    assert isinstance(wrappers, OptimWrapperDict) and isinstance(wrappers["gen"].optimizer, RoutedOptimizer)
    x, y = batches(1)[0]
    wrappers["gen"].update_params(F.mse_loss(model["gen"](x), y))
    assert wrappers["gen"].applied_steps == 1


@pytest.mark.parametrize(
    ("routes", "match"),
    [
        ({}, "routes must name at least one route"),
        ({"default": {"optimizer": {"type": "Muon"}}}, "not 'default'"),
        ({"muon": {"ndim": 2}}, r"routes\['muon'\] needs an 'optimizer' config"),
        ({"muon": {"ndim": "2", "optimizer": {"type": "Muon"}}}, r"routes\['muon'\]\['ndim'\] must be an int"),
        ({"muon": {"dims": 2, "optimizer": {"type": "Muon"}}}, r"routes\['muon'\] got unknown key\(s\) \['dims'\]"),
        (
            {"muon": {"names": ["nothing"], "optimizer": {"type": "Muon"}}},
            r"routes\['muon'\] takes no parameter of Net",
        ),
        (
            {"muon": {"names": "body", "optimizer": {"type": "Muon"}}},
            r"routes\['muon'\]\['optimizer'\] Muon: Muon only supports 2D",
        ),
        ({"muon": {"ndim": 2, "optimizer": {"type": "Moon"}}}, r"routes\['muon'\]\['optimizer'\] type must be"),
        (
            {"muon": {"ndim": 2, "optimizer": {"type": "Muon", "beta": 1}}},
            r"routes\['muon'\]\['optimizer'\] Muon got unknown key",
        ),
        ({"muon": {"names": ["body."], "optimizer": {"type": "Muon"}}}, r"'body.' is no name pattern"),
        ({"muon": {"names": [""], "optimizer": {"type": "Muon"}}}, r"\['names'\] must be a name pattern or a list"),
        (
            {"muon": {"ndim": 2, "module_types": [3], "optimizer": {"type": "Muon"}}},
            r"\['module_types'\] must be module class names",
        ),
        (
            {"zero": {"ndim": 2, "optimizer": {"type": "ZeroRedundancyOptimizer", "optimizer_type": "SGD"}}},
            "ZeroRedundancyOptimizer cannot be routed",
        ),
    ],
)
def test_bad_routes_are_refused_by_name(routes, match):
    with pytest.raises(ValueError, match=match):
        build_optim_wrapper(Net(), {"optimizer": dict(ADAMW), "routes": routes})


def test_name_patterns_match_whole_dotted_parts_only():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(13)])
    cfg = {
        "optimizer": {"type": "SGD", "lr": 0.1},
        "routes": {"muon": {"names": ["2.weight"], "optimizer": {"type": "Muon"}}},
    }
    routed = build_optim_wrapper(model, cfg).optimizer["muon"]
    assert [param for group in routed.param_groups for param in group["params"]] == [model[2].weight]  # not 12's
    cfg["routes"]["muon"] = {"ndim": 2, "exclude_names": ["1", "1"], "optimizer": {"type": "Muon"}}
    routed = build_optim_wrapper(model, cfg).optimizer["muon"]
    assert len(routed.param_groups[0]["params"]) == 12  # every weight but 1's: 10, 11, 12 stay


def test_a_copy_routes_its_own_parameters():
    model = Net()
    wrapper = build_optim_wrapper(model, config())
    wrapper_loop(wrapper, model, batches(2))
    for copied_model, copied in (copy.deepcopy((model, wrapper)), pickle.loads(pickle.dumps((model, wrapper)))):
        param = copied_model.embed.weight
        assert param in copied.optimizer.state and copied.optimizer.state[param]["step"] == 2
        copied.register_step_hook(
            lambda w, e, loss: w.cancel_step(when=torch.tensor(True)), [StepEvent.BEFORE_OPTIM_STEP]
        )
        copied.update_params(F.mse_loss(copied_model(batches(1)[0][0]), batches(1)[0][1]))
        assert copied.optimizer.state[param]["step"] == 2  # the cancelled step's state put back


def test_frozen_parameters_with_paramwise_cfg():
    model = Net()
    model.embed.requires_grad_(False)
    model.head.requires_grad_(False)
    for norm in (model.body[1],):
        norm.requires_grad_(False)
    model.body[0].bias.requires_grad_(False)
    wrapper = build_optim_wrapper(model, config(paramwise_cfg={"bias_lr_mult": 2.0}))  # the rest: all frozen
    assert list(wrapper.optimizer.optimizers) == ["muon"]
    model.body[0].weight.requires_grad_(False)
    model.body[3].weight.requires_grad_(False)
    model.embed.requires_grad_(True)
    with pytest.raises(ValueError, match=r"routes\['muon'\] takes only frozen parameters"):
        build_optim_wrapper(model, config(paramwise_cfg={"bias_lr_mult": 2.0}))


def test_flat_decay_mult_follows_each_routes_own_weight_decay_rule():
    cfg = {
        "optimizer": {"type": "AdamW", "lr": 0.01},  # no weight_decay given: flat_decay_mult has no effect here
        "routes": {"r": {"names": ["body"], "optimizer": {"type": "AdamW", "lr": 0.01}}},
        "paramwise_cfg": {"flat_decay_mult": 0.0},
    }
    with pytest.warns(UserWarning, match="flat_decay_mult'] has no effect"):
        wrapper = build_optim_wrapper(Net(), cfg)
    assert {group["weight_decay"] for group in wrapper.param_groups} == {0.01}  # AdamW's default, everywhere


def test_custom_keys_options_are_checked_against_the_routes_they_reach():
    cfg = config(paramwise_cfg={"custom_keys": {"head": {"betas": (0.9, 0.95)}, "body.0.weight": {"ns_steps": 3}}})
    wrapper = build_optim_wrapper(Net(), cfg)  # head: AdamW's betas; body.0.weight: Muon's ns_steps
    options = {group["name"]: group for group in wrapper.param_groups}
    assert options["muon/custom-body.0.weight"]["ns_steps"] == 3
    assert options["default/custom-head"]["betas"] == (0.9, 0.95)
    cfg["paramwise_cfg"]["custom_keys"]["body.3"] = {"betas": (0.9, 0.9)}  # a Muon weight given AdamW's option
    with pytest.raises(ValueError, match=r"gives \['betas'\] to parameters of the route 'muon'"):
        build_optim_wrapper(Net(), cfg)


def test_members_a_routed_update_cannot_drive_are_refused():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"optimizers\['rest'\]: LBFGS takes a closure in its step"):
        RoutedOptimizer({"muon": torch.optim.Muon([a]), "rest": torch.optim.LBFGS([b])})
    with pytest.raises(TypeError, match="not a wrapper"):
        RoutedOptimizer({"rest": OptimWrapper(torch.optim.SGD([b], lr=0.1))})


def test_a_sharded_muons_state_is_muons():
    from engine_opt.optim import ShardedMuon

    a = nn.Parameter(torch.ones(2, 2))
    a.grad = torch.ones(2, 2)
    sharded = OptimWrapper(ShardedMuon([a], lr=0.02))
    sharded.update_params((a * 2).sum())
    plain = OptimWrapper(torch.optim.Muon([a], lr=0.02))
    plain.load_state_dict(sharded.state_dict())
    assert sharded.state_dict()["optimizer_type"] == "Muon"


def test_the_routed_optimizer_refuses_what_would_break_its_routing():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    routed = RoutedOptimizer({"muon": torch.optim.Muon([a]), "rest": torch.optim.SGD([b], lr=0.1)})
    with pytest.raises(ValueError, match="add the group to the member"):
        routed.add_param_group({"params": [nn.Parameter(torch.ones(1))]})
    with pytest.raises(TypeError, match="takes no closure"):
        routed.step(lambda: 0.0)
    with pytest.raises(ValueError, match="holds a parameter another member holds"):
        RoutedOptimizer({"one": torch.optim.SGD([b], lr=0.1), "two": torch.optim.SGD([b], lr=0.1)})
    with pytest.raises(TypeError, match=r"optimizers\['x'\] must be a torch.optim.Optimizer"):
        RoutedOptimizer({"x": "SGD"})
