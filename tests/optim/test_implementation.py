"""The ``implementation`` key: torch's foreach/fused arguments set, or picked by 'auto', against torch's own loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine_opt import build_optim_wrapper
from engine_opt.optim.implementation import FASTEST, Implementation

from helpers import run_wrapper
from oracle import Plan, assert_same_model, make_batches, make_model, plain_loop

CONFIGS = {
    "sgd_momentum": {"type": "SGD", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "adam": {"type": "Adam", "lr": 0.01},
    "adamw": {"type": "AdamW", "lr": 0.01, "weight_decay": 0.1},
}
ARGUMENTS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
STEPS = 8


def torch_optimizer(name: str, params, **arguments) -> torch.optim.Optimizer:
    cfg = dict(CONFIGS[name])
    return getattr(torch.optim, cfg.pop("type"))(params, **cfg, **arguments)


def trained(name: str, implementation: str | None, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = make_model(dtype=dtype)
    cfg = {"optimizer": dict(CONFIGS[name])}
    if implementation is not None:
        cfg["implementation"] = implementation
    run_wrapper(model, build_optim_wrapper(model, cfg), make_batches(STEPS, dtype=dtype))
    return model


def oracle(name: str, dtype: torch.dtype = torch.float32, **arguments) -> nn.Module:
    """torch's loop, written out, with the optimizer built with ``arguments``."""
    model = make_model(dtype=dtype)
    plain_loop(model, torch_optimizer(name, model.parameters(), **arguments), make_batches(STEPS, dtype=dtype), Plan())
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("implementation", sorted(ARGUMENTS))
def test_each_implementation_trains_as_torchs_loop_with_its_argument(name, implementation):
    assert_same_model(trained(name, implementation), oracle(name, **ARGUMENTS[implementation]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_foreach_is_bitwise_the_for_loop_and_fused_within_a_few_units_in_the_last_place(name):
    """Measured bound of the fused kernel against torch's default loop: 2 ulp of the largest weight in 8 steps."""
    expected = oracle(name)  # torch's default on the CPU: the for-loop
    assert_same_model(trained(name, "foreach"), expected)
    assert_same_model(trained(name, "for-loop"), expected)
    fused = trained(name, "fused")
    for actual, wanted in zip(fused.parameters(), expected.parameters(), strict=True):
        bound = 2 * torch.finfo(torch.float32).eps * wanted.abs().max()
        assert (actual - wanted).abs().max() <= bound


def test_without_the_key_torchs_default_stays_and_auto_picks_fused_on_the_cpu():
    model = make_model()
    cfg = {"optimizer": dict(CONFIGS["adamw"])}
    plain = build_optim_wrapper(model, cfg)
    assert (plain.optimizer.defaults["foreach"], plain.optimizer.defaults["fused"]) == (None, None)
    assert plain.implementation is None and "implementation" not in repr(plain)
    assert build_optim_wrapper(model, {**cfg, "implementation": None}).optimizer.defaults["fused"] is None
    auto = build_optim_wrapper(model, {**cfg, "implementation": "auto"})
    assert auto.optimizer.defaults["fused"] is True
    assert auto.implementation == Implementation("auto", "fused")
    assert "implementation='fused' (auto)" in repr(auto)
    assert "implementation" not in cfg  # the caller's dict as it was
    assert_same_model(trained("adamw", "auto"), oracle("adamw", fused=True))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_auto_follows_the_table_for_float32_bfloat16_and_leaves_float64_to_torch(name):
    picks = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        wrapper = build_optim_wrapper(make_model(dtype=dtype), {"optimizer": CONFIGS[name], "implementation": "auto"})
        picks[dtype] = wrapper.implementation.chosen, wrapper.optimizer.defaults["fused"]
        assert picks[dtype][0] == FASTEST.get((CONFIGS[name]["type"], "cpu", dtype), "default")
    assert picks == {torch.float32: ("fused", True), torch.bfloat16: ("fused", True), torch.float64: ("default", None)}


def test_auto_leaves_an_optimizer_the_table_does_not_list_as_torch_builds_it():
    wrapper = build_optim_wrapper(
        make_model(), {"optimizer": {"type": "RMSprop", "lr": 0.01}, "implementation": "auto"}
    )
    assert wrapper.implementation == Implementation("auto", "default")
    assert wrapper.optimizer.defaults["foreach"] is None and "fused" not in wrapper.optimizer.defaults


def test_routed_optimizers_each_get_their_own_pick():
    model = make_model()
    routes = {"muon": {"names": ["0.weight"], "ndim": 2, "optimizer": {"type": "Muon", "lr": 0.02}}}
    cfg = {"optimizer": dict(CONFIGS["adamw"]), "routes": routes, "implementation": "auto"}
    wrapper = build_optim_wrapper(model, cfg)
    assert wrapper.implementation == Implementation("auto", "muon: default, default: fused")
    assert wrapper.optimizer.optimizers["default"].defaults["fused"] is True


@pytest.mark.parametrize(
    ("optimizer", "implementation", "error", "words"),
    [
        (CONFIGS["adamw"], "fast", ValueError, ["'implementation'", "'fast'", "'auto'", "'for-loop'", "'fused'"]),
        (CONFIGS["adamw"], "Fused", ValueError, ["'implementation'", "'Fused'"]),
        ({"type": "LBFGS"}, "fused", ValueError, ["implementation='fused'", "LBFGS", "'fused'"]),
        ({"type": "LBFGS"}, "foreach", ValueError, ["implementation='foreach'", "LBFGS", "leave the key out"]),
        ({"type": "RMSprop", "lr": 0.1}, "fused", ValueError, ["RMSprop", "'fused'", "'foreach'"]),
        ({**CONFIGS["adamw"], "foreach": True}, "fused", ValueError, ["implementation='fused'", "foreach=True"]),
        ({**CONFIGS["adamw"], "fused": True}, "for-loop", ValueError, ["implementation='for-loop'", "fused=True"]),
        ({**CONFIGS["adamw"], "fused": True}, "auto", ValueError, ["implementation='auto'", "'fused': True"]),
        ({**CONFIGS["adamw"], "differentiable": True}, "fused", ValueError, ["differentiable"]),
    ],
)
def test_refusals_name_the_key_the_value_and_what_works(optimizer, implementation, error, words):
    cfg = {"optimizer": optimizer, "implementation": implementation}
    given = copy.deepcopy(cfg)
    with pytest.raises(error) as caught:
        build_optim_wrapper(make_model(), cfg)
    assert all(word in str(caught.value) for word in words), str(caught.value)
    assert cfg == given


def test_a_config_that_agrees_with_the_choice_is_taken():
    cfg = {"optimizer": {**CONFIGS["adamw"], "fused": True, "foreach": False}, "implementation": "fused"}
    assert build_optim_wrapper(make_model(), cfg).optimizer.defaults["fused"] is True


def test_fused_refuses_parameters_without_a_fused_kernel():
    model = nn.Module()
    model.weight = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"implementation='fused'.*complex64 on cpu has no fused kernel"):
        build_optim_wrapper(model, {"optimizer": CONFIGS["adamw"], "implementation": "fused"})


@pytest.mark.parametrize(("implementation", "saved_with"), [("auto", None), ("for-loop", "fused")])
def test_a_loaded_state_keeps_the_configs_implementation(implementation, saved_with):
    """torch's load takes the saved groups' flags; the config's choice stays, and the run steps as it chose."""
    saved_cfg = {"optimizer": {"type": "AdamW", "lr": 0.01}}
    if saved_with is not None:
        saved_cfg["implementation"] = saved_with
    batches = make_batches(2)
    saved = build_optim_wrapper(make_model(), saved_cfg)
    run_wrapper(make_model(), saved, batches)
    cfg = {"optimizer": {"type": "AdamW", "lr": 0.01}, "implementation": implementation}
    model = make_model()
    wrapper = build_optim_wrapper(model, cfg)
    flags = [(group["foreach"], group["fused"]) for group in wrapper.param_groups]
    wrapper.load_state_dict(saved.state_dict())
    assert [(group["foreach"], group["fused"]) for group in wrapper.param_groups] == flags
    assert bool(flags[0][1]) is (implementation == "auto")  # fused under auto on the CPU


def test_a_folded_clip_steps_after_loading_a_state_saved_unfused():
    cfg = {"optimizer": {"type": "AdamW", "lr": 0.01}, "clip_grad": {"max_norm": 0.1, "fold_into_step": True}}
    saved = build_optim_wrapper(make_model(), {"optimizer": {"type": "AdamW", "lr": 0.01}})
    run_wrapper(make_model(), saved, make_batches(2))
    model = make_model()
    wrapper = build_optim_wrapper(model, {**cfg, "implementation": "auto"})
    wrapper.load_state_dict(saved.state_dict())
    run_wrapper(model, wrapper, make_batches(2))
    assert wrapper.applied_steps == 2 + 2


def test_sparse_gradients_keep_torchs_default_under_auto_and_refuse_fused():
    model = nn.Embedding(10, 3, sparse=True)
    cfg = {"optimizer": {"type": "SGD", "lr": 0.1}}
    wrapper = build_optim_wrapper(model, {**cfg, "implementation": "auto"})
    assert wrapper.implementation == Implementation("auto", "default")
    wrapper.update_params(model(torch.tensor([1, 2])).sum())  # a fused SGD raises on sparse gradients
    assert wrapper.applied_steps == 1
    with pytest.raises(ValueError, match=r"implementation='fused': .*sparse gradients .* 'foreach' or 'for-loop'"):
        build_optim_wrapper(model, {**cfg, "implementation": "fused"})


def test_frozen_parameters_decide_nothing():
    model = nn.Sequential(nn.Linear(2, 2).half(), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    model.register_parameter("step_count", nn.Parameter(torch.zeros((), dtype=torch.long), requires_grad=False))
    cfg = {"optimizer": {"type": "AdamW"}}
    assert build_optim_wrapper(model, {**cfg, "implementation": "auto"}).implementation.chosen == "fused"
    assert build_optim_wrapper(model, {**cfg, "implementation": "fused"}).implementation.chosen == "fused"


def test_a_value_of_another_type_is_a_type_error_and_a_dicts_top_level_key_is_named():
    with pytest.raises(TypeError, match=r"'implementation' must be a str, one of \['auto', .*got True"):
        build_optim_wrapper(make_model(), {"optimizer": {"type": "SGD", "lr": 0.1}, "implementation": True})
    model = nn.ModuleDict({"gen": nn.Linear(2, 2), "disc": nn.Linear(2, 1)})
    one = {"optimizer": {"type": "SGD", "lr": 0.1}}
    with pytest.raises(ValueError, match=r"'implementation' goes in each member's config .* beside \['disc', 'gen'\]"):
        build_optim_wrapper(model, {"gen": one, "disc": one, "implementation": "auto"})


def test_a_frozen_sparse_embedding_makes_no_sparse_gradients():
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    cfg = {"optimizer": {"type": "SGD", "lr": 0.1}, "implementation": "fused"}
    assert build_optim_wrapper(model, cfg).implementation.chosen == "fused"
