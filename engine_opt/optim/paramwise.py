"""``paramwise_cfg``: each parameter's lr, weight decay and options, as MMEngine's constructor gives them.

The rules are those of MMEngine's ``DefaultOptimWrapperConstructor``, taken
from its code parameter by parameter: a matching ``custom_keys`` entry (the
longest, then the first alphabetically) overrides every other rule; else
``bias_lr_mult`` (biases outside norm layers and deformable convolutions),
``dcn_offset_lr_mult``, and the first weight decay rule that applies of
``norm_decay_mult``, ``bias_decay_mult``, ``dwconv_decay_mult`` and
``flat_decay_mult`` (1-D parameters). Names are matched as
``f'{module_prefix}.{param_name}'``, so a top-level parameter is ``'.pos_embed'``.
``layer_decay_rate`` adds layer-wise learning-rate decay for fine-tuning.

Parameters given equal settings share one param group (a foreach or fused
step runs per group), named after the rules that made it; each group's
``model_order`` lists its parameters' positions in the model, the order in
which MMEngine makes one group per parameter, so its checkpoints load.

Examples:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4))
    >>> paramwise_cfg = dict(dwconv_decay_mult=0.0, norm_decay_mult=0.5)
    >>> rules = ParamwiseRules.from_config(paramwise_cfg, lr=0.1, weight_decay=1e-4)
    >>> groups = rules.param_groups(model)
    >>> [(g["name"], g["weight_decay"], g["model_order"]) for g in groups]
    [('dwconv', 0.0, [0, 1]), ('norm', 5e-05, [2, 3])]
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import checks

MODEL_ORDER = "model_order"
"""The param-group key listing a group's parameters' positions in the model's parameter order."""

_MULTIPLIERS = (
    "bias_lr_mult", "bias_decay_mult", "norm_decay_mult", "dwconv_decay_mult", "flat_decay_mult", "dcn_offset_lr_mult",
)  # fmt: skip
_DECAY_MULTIPLIERS = ("bias_decay_mult", "norm_decay_mult", "dwconv_decay_mult", "flat_decay_mult")
PARAMWISE_KEYS = (*_MULTIPLIERS, "bypass_duplicate", "custom_keys", "layer_decay_rate", "num_layers", "layer_id")
_DCN_TYPES = ("DeformConv2d", "ModulatedDeformConv2d")
_EMBEDDINGS = ("cls_token", "pos_embed", "mask_token", "dist_token", "register_tokens", "patch_embed")


def _norm_layer_types() -> tuple[type[nn.Module], ...]:
    """The norm layers ``norm_decay_mult`` applies to: torch's, and subclasses of its private batch/instance bases.

    The bases (``_BatchNorm``, ``_InstanceNorm``) are private; other libraries'
    norm layers subclass them, as MMEngine counts them. Where a torch release
    lacks one, its public subclasses still count. ``RMSNorm`` counts too,
    where MMEngine leaves it out.
    """
    public = (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
        nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
        *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
    )  # fmt: skip
    private_bases = [
        getattr(module, name)
        for module, name in ((nn.modules.batchnorm, "_BatchNorm"), (nn.modules.instancenorm, "_InstanceNorm"))
        if isinstance(getattr(module, name, None), type)
    ]
    return (*public, *private_bases)


_NORM_TYPES = _norm_layer_types()


def _is_dcn(module: nn.Module) -> bool:
    """An MMCV deformable convolution (``mmcv.ops.DeformConv2d`` or ``ModulatedDeformConv2d``), as MMEngine checks."""
    return any(
        klass.__name__ in _DCN_TYPES and klass.__module__.split(".")[0] == "mmcv" for klass in type(module).__mro__
    )


def vit_layer_id(name: str, num_layers: int) -> int:
    """A parameter's layer in a ViT-like model: 0 for embeddings, ``i + 1`` in block ``i``, else ``num_layers + 1``.

    Embeddings are names with a part ``cls_token``, ``pos_embed``,
    ``mask_token``, ``dist_token``, ``register_tokens`` or ``patch_embed``;
    a block is a part ``layers`` or ``blocks`` followed by its index; the
    first of either found wins. Everything else (final norm, head) is on top.

    Examples:
        >>> names = (".cls_token", "backbone.blocks.3.attn.qkv.weight", "head.bias")
        >>> [vit_layer_id(name, 12) for name in names]
        [0, 4, 13]
    """
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part in _EMBEDDINGS:
            return 0
        if part in ("layers", "blocks") and index + 1 < len(parts) and parts[index + 1].isdigit():
            return int(parts[index + 1]) + 1
    return num_layers + 1


def _block_count(names: Sequence[str]) -> int | None:
    """The number of blocks ``vit_layer_id`` finds among ``names``: the highest block index plus one."""
    found = [vit_layer_id(name, -2) for name in names]
    indices = [layer - 1 for layer in found if layer > 0]
    return max(indices) + 1 if indices else None


@dataclass
class LayerDecay:
    """Layer-wise learning-rate decay: a parameter of layer ``i`` learns at ``rate ** (num_layers + 1 - i)``.

    Layer 0 holds the embeddings, layers 1..``num_layers`` the blocks, layer
    ``num_layers + 1`` the head (scale 1), as timm's ``layer_decay`` counts.
    """

    rate: float
    num_layers: int | None
    layer_id: Callable[[str, int], int] = vit_layer_id

    def scales(self, names: Sequence[str], every_name: Sequence[str]) -> list[tuple[int, float]]:
        """Each name's layer and lr scale; ``every_name`` (frozen parameters' too) counts the blocks."""
        num_layers = self.num_layers
        if num_layers is None:
            num_layers = _block_count(every_name)
            if num_layers is None:
                raise ValueError(
                    "paramwise_cfg['layer_decay_rate'] needs paramwise_cfg['num_layers']: no parameter name has a "
                    "'layers.<i>' or 'blocks.<i>' part to count the blocks by"
                )
        result = []
        for name in names:
            layer = self.layer_id(name, num_layers)
            if not checks.is_int(layer) or not 0 <= layer <= num_layers + 1:
                raise ValueError(
                    f"paramwise_cfg['layer_id'] must give an int in [0, {num_layers + 1}], got "
                    f"{checks.describe(layer)} for parameter {name!r}"
                )
            result.append((layer, self.rate ** (num_layers + 1 - layer)))
        return result


@dataclass
class ParamwiseRules:
    """``paramwise_cfg``, checked, with the optimizer's base lr and weight decay."""

    multipliers: dict[str, float]
    custom_keys: dict[str, dict[str, Any]]
    lr: Any
    weight_decay: Any
    layer_decay: LayerDecay | None = None
    matched: set[str] = field(default_factory=set)

    @classmethod
    def from_config(
        cls,
        paramwise_cfg: Mapping[str, Any],
        lr: Any,
        weight_decay: Any,
        optimizer_args: Sequence[str] | None = None,
    ) -> ParamwiseRules:
        """Check ``paramwise_cfg`` and keep its rules.

        Args:
            paramwise_cfg: MMEngine's keys (see the module docstring), plus
                ``layer_decay_rate`` (in (0, 1]), ``num_layers`` (counted from
                the names when left out) and ``layer_id`` (a callable
                ``(name, num_layers) -> int``; ``vit_layer_id`` by default).
            lr: The optimizer's base learning rate (its config's, else its default).
            weight_decay: Its base weight decay, likewise; ``None`` if it has none.
            optimizer_args: The optimizer's keyword arguments, which a custom
                key may set; ``None`` accepts any.
        """
        cfg = checks.mapping("paramwise_cfg", paramwise_cfg)
        checks.known_keys("paramwise_cfg", cfg, PARAMWISE_KEYS)
        multipliers = {key: _multiplier(f"paramwise_cfg[{key!r}]", cfg[key]) for key in _MULTIPLIERS if key in cfg}
        custom = {
            key: _custom_options(key, options, optimizer_args)
            for key, options in checks.mapping("paramwise_cfg['custom_keys']", cfg.get("custom_keys", {})).items()
        }
        bypass = cfg.get("bypass_duplicate", False)
        if not isinstance(bypass, bool):
            raise TypeError(f"paramwise_cfg['bypass_duplicate'] must be a bool, got {checks.describe(bypass)}")
        rules = cls(multipliers, custom, lr, weight_decay, _layer_decay(cfg))
        rules._check_bases()
        return rules

    def _check_bases(self) -> None:
        uses_lr = any(key.endswith("lr_mult") for key in self.multipliers) or bool(self.custom_keys)
        if uses_lr and self.layer_decay is None and not checks.is_real(self.lr):
            raise ValueError(f"paramwise_cfg sets an lr_mult but the optimizer config has no 'lr' (got {self.lr!r})")
        if self.layer_decay is not None and not checks.is_real(self.lr):
            raise ValueError(f"paramwise_cfg['layer_decay_rate'] needs the optimizer's 'lr', got {self.lr!r}")
        decays = [key for key in _DECAY_MULTIPLIERS if key in self.multipliers]
        decays += [f"custom_keys[{key!r}]" for key, options in self.custom_keys.items() if "decay_mult" in options]
        if decays and not checks.is_real(self.weight_decay):
            raise ValueError(f"paramwise_cfg sets {decays} but the optimizer has no 'weight_decay' to multiply")

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The model's trainable parameters in groups of equal settings, first seen first.

        Frozen parameters are left out, as MMEngine leaves them out when a
        ``paramwise_cfg`` is given; a parameter met twice is taken once.
        """
        entries = []  # (name, param, settings, labels)
        seen: set[int] = set()
        for prefix, module, dcn_parent in _walk(model):
            for local_name, param in module.named_parameters(recurse=False):
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                settings, labels = self._settings(f"{prefix}.{local_name}", local_name, param, module, dcn_parent)
                entries.append((f"{prefix}.{local_name}" if prefix else local_name, param, settings, labels))
        if self.layer_decay is not None:
            every_name = [name for name, _ in model.named_parameters()]  # frozen blocks count too
            scales = self.layer_decay.scales([name for name, *_ in entries], every_name)
            for (_, _, settings, labels), (layer, scale) in zip(entries, scales, strict=True):
                settings["lr"] = settings.get("lr", self.lr) * scale
                labels.add(f"layer_{layer}")
        return self._grouped(entries)

    def _settings(
        self, name: str, local_name: str, param: torch.Tensor, module: nn.Module, dcn_parent: bool
    ) -> tuple[dict[str, Any], set[str]]:
        """One parameter's settings beyond the optimizer's defaults, and the rules that gave them."""
        key = next((key for key in sorted(sorted(self.custom_keys), key=len, reverse=True) if key in name), None)
        if key is not None:
            self.matched.add(key)
            return self._custom(key), {_custom_label(key)}
        settings: dict[str, Any] = {}
        labels: set[str] = set()
        mult = self.multipliers
        is_norm = isinstance(module, _NORM_TYPES)
        is_bias = local_name == "bias"
        if is_bias and not (is_norm or dcn_parent) and "bias_lr_mult" in mult:
            settings["lr"], labels = self.lr * mult["bias_lr_mult"], {"bias"}
        is_offset = dcn_parent and "conv_offset" in name.rsplit(".", 1)[0] and isinstance(module, nn.Conv2d)
        if is_offset and "dcn_offset_lr_mult" in mult:
            settings["lr"], labels = self.lr * mult["dcn_offset_lr_mult"], {"dcn_offset"}
        rule = self._decay_rule(param, module, is_norm, is_bias and not dcn_parent, dcn_parent)
        if rule is not None and self.weight_decay is not None:
            settings["weight_decay"] = self.weight_decay * mult[f"{rule}_decay_mult"]
            labels.add(rule)
        return settings, labels

    def _decay_rule(
        self, param: torch.Tensor, module: nn.Module, is_norm: bool, is_bias: bool, dcn_parent: bool
    ) -> str | None:
        """The first weight decay rule that applies: ``norm``, ``bias``, ``dwconv``, ``flat``, or none."""
        mult = self.multipliers
        is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
        for rule, applies in (
            ("norm", is_norm),
            ("bias", is_bias),
            ("dwconv", is_dwconv),
            ("flat", param.ndim == 1 and not dcn_parent),
        ):
            if applies and f"{rule}_decay_mult" in mult:
                return rule
        return None

    def _custom(self, key: str) -> dict[str, Any]:
        options = dict(self.custom_keys[key])
        settings: dict[str, Any] = {"lr": self.lr * options.pop("lr_mult", 1.0)}
        decay_mult = options.pop("decay_mult", 1.0)
        if self.weight_decay is not None:
            settings["weight_decay"] = self.weight_decay * decay_mult
        return {**settings, **options}

    def _grouped(self, entries: Sequence[tuple[str, torch.Tensor, dict[str, Any], set[str]]]) -> list[dict[str, Any]]:
        groups: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}
        labels: dict[tuple[tuple[str, Any], ...], set[str]] = {}
        for position, (_, param, settings, param_labels) in enumerate(entries):
            for option, base in (("lr", self.lr), ("weight_decay", self.weight_decay)):
                if option in settings and settings[option] == base:
                    del settings[option]
            key = tuple(sorted(((option, _frozen(value)) for option, value in settings.items()), key=_first))
            group = groups.setdefault(key, {"params": [], **settings, MODEL_ORDER: []})
            group["params"].append(param)
            group[MODEL_ORDER].append(position)
            labels.setdefault(key, set()).update(param_labels if settings else {"default"})
        for key, group in groups.items():  # named after its rules, in characters every logger takes
            group["name"] = "-".join(sorted(labels[key]))
        return list(groups.values())


def _custom_label(key: str) -> str:
    """A custom key's group label: ``'custom-3'`` for ``'3.'``, in the characters every logger's tags take."""
    return "custom-" + re.sub(r"[^\w.-]", "_", key.strip("."))


def _walk(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """Every module with its name and whether its parent is a deformable convolution, parents first."""
    result = []
    pending: list[tuple[str, nn.Module, bool]] = [("", model, False)]
    visited: set[int] = set()
    while pending:
        prefix, module, dcn_parent = pending.pop()
        if id(module) in visited:
            continue
        visited.add(id(module))
        result.append((prefix, module, dcn_parent))
        children = [
            (f"{prefix}.{name}" if prefix else name, child, _is_dcn(module)) for name, child in module.named_children()
        ]
        pending.extend(reversed(children))
    return result


def _first(item: tuple[Any, Any]) -> Any:
    return item[0]


def _frozen(value: Any) -> Any:
    """``value`` as a hashable key: lists (a config read from JSON writes betas as one) as tuples, tensors by value."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, Mapping):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.flatten().tolist()), str(value.dtype))
    return value


def _multiplier(name: str, value: Any) -> float:
    if not checks.is_real(value):
        raise TypeError(f"{name} must be a number >= 0, got {checks.describe(value)}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _custom_options(key: Any, options: Any, optimizer_args: Sequence[str] | None) -> dict[str, Any]:
    where = f"paramwise_cfg['custom_keys'][{key!r}]"
    if not isinstance(key, str):
        raise TypeError(f"paramwise_cfg['custom_keys'] keys must be strings, got {checks.describe(key)}")
    result = dict(checks.mapping(where, options))
    if optimizer_args is not None:
        checks.known_keys(where, result, ["lr_mult", "decay_mult", *optimizer_args])
    for mult in ("lr_mult", "decay_mult"):
        if mult in result:
            result[mult] = _multiplier(f"{where}[{mult!r}]", result[mult])
    return result


def _layer_decay(cfg: Mapping[str, Any]) -> LayerDecay | None:
    if "layer_decay_rate" not in cfg:
        unused = [key for key in ("num_layers", "layer_id") if key in cfg]
        if unused:
            raise ValueError(f"paramwise_cfg sets {unused} but no 'layer_decay_rate' for them to serve")
        return None
    rate = cfg["layer_decay_rate"]
    if not checks.is_real(rate) or not 0 < rate <= 1:
        raise ValueError(f"paramwise_cfg['layer_decay_rate'] must be a number in (0, 1], got {checks.describe(rate)}")
    num_layers = cfg.get("num_layers")
    if num_layers is not None:
        checks.positive_int("paramwise_cfg['num_layers']", num_layers)
    layer_id = cfg.get("layer_id", vit_layer_id)
    if not callable(layer_id):
        raise TypeError(
            f"paramwise_cfg['layer_id'] must be a callable (name, num_layers) -> int, got {checks.describe(layer_id)}"
        )
    return LayerDecay(float(rate), num_layers, layer_id)


def params_in_model_order(groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    """The groups' parameters in the model's order where the build recorded it (``model_order``), else group order.

    A total gradient norm sums its parts in this order: the model's order
    is MMEngine's, so a clipped update equals its bitwise.

    Examples:
        >>> first, second = torch.zeros(1), torch.zeros(2)
        >>> groups = [
        ...     {"params": [second], MODEL_ORDER: [1]},
        ...     {"params": [first], MODEL_ORDER: [0]},
        ... ]
        >>> params_in_model_order(groups)[0] is first
        True
    """
    if MODEL_ORDER not in groups[0] or not all(MODEL_ORDER in group for group in groups):
        return [param for group in groups for param in group["params"]]  # nothing was built from a paramwise_cfg
    placed = [pair for group in groups for pair in zip(group[MODEL_ORDER], group["params"], strict=True)]
    return [param for _, param in sorted(placed, key=_first)]
