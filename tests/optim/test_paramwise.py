"""paramwise_cfg: every parameter's settings equal MMEngine's own constructor's, on generated configs and models."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from engine_opt import build_optim_wrapper
from engine_opt.optim.paramwise import MODEL_ORDER, ParamwiseRules, vit_layer_id

mmengine_optim = pytest.importorskip("mmengine.optim")

MULTIPLIERS = (
    "bias_lr_mult", "bias_decay_mult", "norm_decay_mult", "dwconv_decay_mult", "flat_decay_mult", "dcn_offset_lr_mult",
)  # fmt: skip
COMPARED = ("lr", "weight_decay", "momentum", "betas", "eps", "nesterov", "dampening")
# a custom key's betas may be a list (a JSON config's): compared as values


class DeformConv2d(nn.Module):
    """Stands for mmcv.ops.DeformConv2d: MMEngine recognises it by class, with a conv_offset child."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.bias = nn.Parameter(torch.randn(4))
        self.conv_offset = nn.Conv2d(4, 18, 3)


@pytest.fixture(autouse=True)
def fake_mmcv(monkeypatch):
    """An ``mmcv.ops`` holding ``DeformConv2d``, so both constructors see a deformable convolution."""
    DeformConv2d.__module__ = "mmcv.ops.deform_conv"
    ops = types.ModuleType("mmcv.ops")
    ops.DeformConv2d = DeformConv2d
    ops.ModulatedDeformConv2d = type("ModulatedDeformConv2d", (nn.Module,), {"__module__": "mmcv.ops"})
    mmcv = types.ModuleType("mmcv")
    mmcv.ops = ops
    monkeypatch.setitem(sys.modules, "mmcv", mmcv)
    monkeypatch.setitem(sys.modules, "mmcv.ops", ops)
    from mmengine.optim.optimizer import default_constructor

    monkeypatch.setattr(default_constructor, "mmcv_full_available", lambda: True)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class ViT(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=4), nn.GroupNorm(2, 4), nn.SyncBatchNorm(4)
        )
        self.dcn = DeformConv2d()
        self.neck = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.InstanceNorm2d(4, affine=True))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 2)


class LanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(6, 2, 12) for _ in range(2))
        self.lm_head = nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: one parameter in two modules
        self.scale = nn.Parameter(torch.ones(6))


class Wrapped(nn.Module):
    """A model held in ``.module``, as DistributedDataParallel holds it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model


MODELS = {
    "vit": ViT,
    "convnet": ConvNet,
    "language": LanguageModel,
    "wrapped": lambda: Wrapped(ViT(depth=2)),
}
KEYS = (".cls_token", "pos_embed", "blocks.0", "blocks.1.attn", "head", "norm", "backbone.2", "bias", "embed", "0", "")


def effective(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, object]]:
    """Each parameter's settings, by identity: what the optimizer steps it with."""
    return {
        id(param): {key: tuple(group[key]) if key == "betas" else group[key] for key in COMPARED if key in group}
        for group in optimizer.param_groups
        for param in group["params"]
    }


@st.composite
def configs(draw):
    optimizer = draw(st.sampled_from(["SGD", "AdamW"]))
    optimizer_cfg = {"type": optimizer, "lr": draw(st.sampled_from([0.1, 0.003]))}
    has_wd = draw(st.booleans())
    if has_wd:
        optimizer_cfg["weight_decay"] = draw(st.sampled_from([0.05, 1e-4]))
    if optimizer == "SGD":
        optimizer_cfg["momentum"] = 0.9
    mults = draw(st.lists(st.sampled_from(MULTIPLIERS), unique=True, max_size=len(MULTIPLIERS)))
    # without weight_decay MMEngine refuses the decay mults, except flat_decay_mult (which it ignores)
    paramwise = {
        key: draw(st.sampled_from([0.0, 0.5, 2.0]))
        for key in mults
        if has_wd or key in ("flat_decay_mult",) or "decay" not in key
    }
    custom = {}
    for key in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=4)):
        options = {}
        if draw(st.booleans()):
            options["lr_mult"] = draw(st.sampled_from([0.0, 0.1, 3.0]))
        if has_wd and draw(st.booleans()):
            options["decay_mult"] = draw(st.sampled_from([0.0, 2.0]))
        if draw(st.booleans()):
            options.update(momentum=0.5) if optimizer == "SGD" else options.update(eps=1e-6, betas=[0.8, 0.9])
        custom[key] = options
    if custom:
        paramwise["custom_keys"] = custom
    paramwise["bypass_duplicate"] = True  # MMEngine refuses tied weights without it
    return {"optimizer": optimizer_cfg, "paramwise_cfg": paramwise}


@pytest.mark.filterwarnings("ignore:paramwise_cfg\\['custom_keys'\\] key:UserWarning")  # a key may match nothing
@pytest.mark.filterwarnings("ignore:paramwise_cfg\\['flat_decay_mult'\\] has no effect:UserWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(MODELS)), cfg=configs(), paramwise=st.booleans())
def test_every_parameter_gets_mmengines_settings(name, cfg, paramwise):
    if not paramwise:
        cfg = {"optimizer": cfg["optimizer"]}
    torch.manual_seed(0)
    model = MODELS[name]()
    before = copy.deepcopy(cfg)
    theirs = mmengine_optim.build_optim_wrapper(model, copy.deepcopy(cfg)).optimizer
    ours = build_optim_wrapper(model, cfg).optimizer
    assert cfg == before
    assert effective(ours) == effective(theirs)
    # the order MMEngine's groups follow, which model_order records
    order = [p for g in theirs.param_groups for p in g["params"]]
    if paramwise:
        flat = sorted(
            (
                (position, param)
                for g in ours.param_groups
                for position, param in zip(g[MODEL_ORDER], g["params"], strict=True)
            ),
            key=lambda item: item[0],
        )
        assert [param for _, param in flat] == order
    else:
        assert ours.param_groups[0]["params"] == order


def test_bias_decay_reaches_norm_biases_when_norm_decay_mult_is_not_set():
    model = ConvNet()
    cfg = dict(optimizer=dict(type="SGD", lr=0.1, weight_decay=0.01), paramwise_cfg=dict(bias_decay_mult=0.0))
    groups = effective(build_optim_wrapper(model, cfg).optimizer)
    assert groups[id(model.backbone[1].bias)]["weight_decay"] == 0.0  # BatchNorm's bias: a bias, as MMEngine's code
    assert groups[id(model.backbone[1].weight)]["weight_decay"] == 0.01


def test_frozen_parameters_are_kept_without_paramwise_cfg():
    model = ConvNet()
    optimizer = build_optim_wrapper(model, dict(optimizer=dict(type="SGD", lr=0.1))).optimizer
    assert any(param is model.frozen.weight for param in optimizer.param_groups[0]["params"])
    model.frozen.requires_grad_(True)  # unfrozen later: trained
    before = model.frozen.weight.detach().clone()
    model.frozen(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.frozen.weight)


def test_top_level_parameter_is_named_with_a_leading_dot():
    model = ViT()
    cfg = dict(
        optimizer=dict(type="AdamW", lr=1.0, weight_decay=0.1),
        paramwise_cfg=dict(custom_keys={".cls_token": dict(decay_mult=0.0)}),
    )
    groups = effective(build_optim_wrapper(model, cfg).optimizer)
    assert groups[id(model.cls_token)]["weight_decay"] == 0.0
    assert groups[id(model.pos_embed)]["weight_decay"] == 0.1


def test_layer_decay_against_a_table_computed_by_hand():
    model = ViT(depth=3)  # layers: 0 embeddings, 1..3 blocks, 4 head and final norm
    cfg = dict(
        optimizer=dict(type="AdamW", lr=1.0, weight_decay=0.05),
        paramwise_cfg=dict(layer_decay_rate=0.5, custom_keys={"head": dict(lr_mult=0.1)}),
    )
    groups = effective(build_optim_wrapper(model, cfg).optimizer)
    expected = {
        "patch_embed.weight": 0.5**4,
        "cls_token": 0.5**4,
        "pos_embed": 0.5**4,
        "blocks.0.attn.in_proj_weight": 0.5**3,
        "blocks.1.norm1.bias": 0.5**2,
        "blocks.2.mlp.2.weight": 0.5**1,
        "norm.weight": 1.0,
        "head.weight": 0.1,  # a custom key's lr_mult, times the head's scale 1
    }
    params = dict(model.named_parameters())
    assert {name: groups[id(params[name])]["lr"] for name in expected} == expected


def test_layer_decay_with_a_layer_function_and_group_names():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    cfg = dict(
        optimizer=dict(type="SGD", lr=1.0),
        paramwise_cfg=dict(layer_decay_rate=0.1, num_layers=1, layer_id=lambda name, num_layers: int(name[0])),
    )
    groups = build_optim_wrapper(model, cfg).param_groups
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        ("layer_0", pytest.approx(0.01), 2),
        ("layer_1", pytest.approx(0.1), 2),
        ("default", 1.0, 2),
    ]


def test_vit_layer_id():
    assert [vit_layer_id(name, 12) for name in ("pos_embed", "backbone.layers.11.ffn.weight", "fc.weight")] == [
        0,
        12,
        13,
    ]


@pytest.mark.parametrize(
    ("paramwise", "error", "words"),
    [
        (dict(layer_decay_rate=1.5), ValueError, ["layer_decay_rate", "1.5", "(0, 1]"]),
        (dict(num_layers=3), ValueError, ["num_layers", "layer_decay_rate"]),
        (dict(layer_decay_rate=0.5, layer_id="vit"), TypeError, ["layer_id", "'vit'", "callable"]),
        (dict(layer_decay_rate=0.5), ValueError, ["num_layers", "blocks"]),
        (dict(layer_decay_rate=0.5, num_layers=2, layer_id=lambda n, k: 9), ValueError, ["layer_id", "[0, 3]", "9"]),
        (dict(bypass_duplicate=1), TypeError, ["bypass_duplicate", "bool"]),
        (dict(flat_decay_mult=-1), ValueError, ["flat_decay_mult", "-1"]),
        (dict(custom_keys={1: dict(lr_mult=2)}), TypeError, ["custom_keys", "1 of type int"]),
    ],
)
def test_bad_paramwise_options(paramwise, error, words):
    with pytest.raises(error) as info:
        build_optim_wrapper(
            nn.Sequential(nn.Linear(2, 2)), dict(optimizer=dict(type="SGD", lr=0.1), paramwise_cfg=paramwise)
        )
    for word in words:
        assert word in str(info.value)


def test_a_decay_multiplier_needs_a_weight_decay():
    class NoDecay(torch.optim.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, dict(lr=lr))

    with pytest.raises(ValueError, match=r"\['dwconv_decay_mult'\].*no 'weight_decay'"):
        ParamwiseRules.from_config(dict(dwconv_decay_mult=0.0), lr=0.1, weight_decay=None)
    model = nn.Linear(2, 2)
    cfg = dict(optimizer=dict(type=NoDecay), paramwise_cfg=dict(bias_decay_mult=0.0))
    with pytest.raises(ValueError, match="weight_decay"):
        build_optim_wrapper(model, cfg)


def test_layer_decay_counts_frozen_blocks_too():
    model = ViT(depth=4)
    frozen = ViT(depth=4)
    frozen.blocks[3].requires_grad_(False)  # the last block frozen: the layers keep their numbers
    cfg = dict(optimizer=dict(type="AdamW", lr=1.0, weight_decay=0.05), paramwise_cfg=dict(layer_decay_rate=0.5))
    lrs, frozen_lrs = (effective(build_optim_wrapper(m, cfg).optimizer) for m in (model, frozen))
    assert frozen_lrs[id(frozen.cls_token)]["lr"] == lrs[id(model.cls_token)]["lr"] == 0.5**5


def test_mmengines_constructor_key():
    cfg = dict(constructor="DefaultOptimWrapperConstructor", optimizer=dict(type="SGD", lr=0.1))
    assert build_optim_wrapper(nn.Linear(2, 2), cfg).get_lr() == {"lr": [0.1]}
    cfg["constructor"] = "LearningRateDecayOptimWrapperConstructor"
    with pytest.raises(
        ValueError, match=r"'constructor' can only be 'DefaultOptimWrapperConstructor'.*layer_decay_rate"
    ):
        build_optim_wrapper(nn.Linear(2, 2), cfg)


def test_flat_decay_mult_without_weight_decay_is_ignored_as_mmengine_ignores_it():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    cfg = dict(optimizer=dict(type="AdamW", lr=1e-3), paramwise_cfg=dict(flat_decay_mult=0.0))
    with pytest.warns(
        UserWarning, match=r"flat_decay_mult'\] has no effect: the optimizer config sets no 'weight_decay'"
    ):
        ours = build_optim_wrapper(model, cfg).optimizer
    assert effective(ours) == effective(mmengine_optim.build_optim_wrapper(model, copy.deepcopy(cfg)).optimizer)


def test_a_list_option_from_a_json_config():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    cfg = dict(optimizer=dict(type="Adam", lr=1e-3), paramwise_cfg=dict(custom_keys={"1.": dict(betas=[0.8, 0.9])}))
    ours = build_optim_wrapper(model, cfg).optimizer
    assert effective(ours) == effective(mmengine_optim.build_optim_wrapper(model, copy.deepcopy(cfg)).optimizer)
