"""``build_optim_wrapper``: the training strategy as configuration.

A config dict names the wrapper, the optimizer and the wrapper's arguments, so
switching from fp32 to bf16 with accumulation and clipping is a change of
config, not of training code. ``paramwise_cfg`` sets per-parameter learning
rate and weight decay multipliers; parameters that end up with the same
settings share one param group, and frozen parameters are left out.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    >>> wrapper = build_optim_wrapper(model, dict(
    ...     type="AmpOptimWrapper", dtype="bf16", accumulative_counts=4, clip_grad=dict(max_norm=1.0),
    ...     optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05),
    ...     paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0)))
    >>> [(len(g["params"]), g["weight_decay"]) for g in wrapper.param_groups]
    [(1, 0.05), (3, 0.0)]
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import checks
from .amp import AmpOptimWrapper
from .wrapper import OptimWrapper
from .wrapper_dict import OptimWrapperDict

WRAPPERS: dict[str, type[OptimWrapper]] = {"OptimWrapper": OptimWrapper, "AmpOptimWrapper": AmpOptimWrapper}
_PARAMWISE_KEYS = ("bias_lr_mult", "bias_decay_mult", "norm_decay_mult", "custom_keys")


def _norm_layer_types() -> tuple[type[nn.Module], ...]:
    """The norm layers ``norm_decay_mult`` applies to: torch's, and subclasses of its private batch/instance bases.

    The bases (``_BatchNorm``, ``_InstanceNorm``) are private; other libraries'
    norm layers subclass them, as MMEngine counts them. Where a torch release
    lacks one, its public subclasses still count.
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


def _optimizer_names() -> list[str]:
    return sorted(
        name
        for name, value in vars(torch.optim).items()
        if isinstance(value, type) and issubclass(value, torch.optim.Optimizer) and value is not torch.optim.Optimizer
    )


def _optimizer_class(type_: Any) -> type[torch.optim.Optimizer]:
    if isinstance(type_, type) and issubclass(type_, torch.optim.Optimizer):
        return type_
    candidate = getattr(torch.optim, type_, None) if isinstance(type_, str) else None
    if isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer):
        return candidate
    raise ValueError(
        f"optimizer type must be a torch.optim.Optimizer subclass or one of {_optimizer_names()}, got {type_!r}"
    )


def _wrapper_class(type_: Any) -> type[OptimWrapper]:
    if isinstance(type_, type) and issubclass(type_, OptimWrapper):
        return type_
    if isinstance(type_, str) and type_ in WRAPPERS:
        return WRAPPERS[type_]
    raise ValueError(f"optim wrapper type must be one of {list(WRAPPERS)} or an OptimWrapper subclass, got {type_!r}")


def _accepted_args(cls: type, skip: tuple[str, ...]) -> tuple[list[str], dict[str, Any]] | None:
    """Keyword arguments of ``cls`` and their defaults, or ``None`` if it takes ``**kwargs``."""
    names: list[str] = []
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        for parameter in parameters:
            if parameter.name in ("self", *skip) or parameter.kind is parameter.VAR_POSITIONAL:
                continue
            if parameter.kind is parameter.VAR_KEYWORD:
                break
            names.append(parameter.name)
            if parameter.default is not parameter.empty:
                defaults.setdefault(parameter.name, parameter.default)
        else:
            return names, defaults
    return None


def _param_groups(
    model: nn.Module,
    paramwise_cfg: Mapping[str, Any] | None,
    base_lr: Any,
    base_wd: Any,
    optimizer_args: list[str] | None,
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by their paramwise settings, in first-seen order."""
    cfg, custom = _parse_paramwise(paramwise_cfg, optimizer_args)
    needs_lr = "bias_lr_mult" in cfg or any("lr_mult" in value for value in custom.values())
    if needs_lr and base_lr is None:
        raise ValueError("paramwise_cfg sets an lr_mult but the optimizer config has no 'lr'")
    rules = _Paramwise(cfg, custom, base_lr, base_wd)
    groups: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}
    labels: dict[tuple[tuple[str, Any], ...], set[str]] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            settings, label = rules.settings(f"{prefix}.{local_name}" if prefix else local_name, local_name, module)
            group_key = tuple(sorted(settings.items(), key=lambda item: item[0]))
            groups.setdefault(group_key, {"params": [], **settings})["params"].append(param)
            labels.setdefault(group_key, set()).add(label)
    if not groups:
        raise ValueError(f"the model {type(model).__name__} has no trainable parameters")
    if paramwise_cfg is not None:  # each group named after the rules that made it, for logs (lr/bias-norm)
        for group_key, group in groups.items():
            group["name"] = "-".join(sorted(labels[group_key]))  # characters every logger takes
    for key in sorted(set(custom) - rules.matched):
        warnings.warn(
            f"paramwise_cfg['custom_keys'] key {key!r} matches no trainable parameter of {type(model).__name__}",
            UserWarning,
            stacklevel=5,  # the caller of build_optim_wrapper
        )
    return list(groups.values())


def _parse_paramwise(
    paramwise_cfg: Mapping[str, Any] | None, optimizer_args: list[str] | None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``paramwise_cfg`` and its ``custom_keys``, checked: known options, multipliers that are numbers >= 0."""
    cfg = dict(checks.mapping("paramwise_cfg", paramwise_cfg)) if paramwise_cfg is not None else {}
    checks.known_keys("paramwise_cfg", cfg, _PARAMWISE_KEYS)
    for key in ("bias_lr_mult", "bias_decay_mult", "norm_decay_mult"):
        if key in cfg:
            _multiplier(f"paramwise_cfg[{key!r}]", cfg[key])
    custom = {}
    for key, options in checks.mapping("paramwise_cfg['custom_keys']", cfg.get("custom_keys", {})).items():
        where = f"paramwise_cfg['custom_keys'][{key!r}]"
        custom[key] = dict(checks.mapping(where, options))
        if optimizer_args is not None:
            checks.known_keys(where, custom[key], ["lr_mult", "decay_mult", *optimizer_args])
        for mult in ("lr_mult", "decay_mult"):
            if mult in custom[key]:
                _multiplier(f"{where}[{mult!r}]", custom[key][mult])
    return cfg, custom


def _multiplier(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {checks.describe(value)}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class _Paramwise:
    """The settings ``paramwise_cfg`` gives one parameter, beyond the optimizer's own."""

    def __init__(self, cfg: dict[str, Any], custom: dict[str, Any], base_lr: Any, base_wd: Any) -> None:
        self.cfg, self.custom, self.base_lr, self.base_wd = cfg, custom, base_lr, base_wd
        self.ordered_keys = sorted(sorted(custom), key=len, reverse=True)  # the longest matching key wins
        self.matched: set[str] = set()

    def settings(self, name: str, local_name: str, module: nn.Module) -> tuple[dict[str, Any], str]:
        """The parameter's settings, and the rule that gave them: a custom key, ``bias``, ``norm`` or ``default``."""
        matched = next((key for key in self.ordered_keys if key in name), None)
        if matched is not None:
            self.matched.add(matched)
            settings, label = self._custom(matched), matched
        else:
            settings = self._by_kind(local_name, module)
            label = "norm" if isinstance(module, _NORM_TYPES) else "bias" if local_name == "bias" else "default"
        for option, base in (("lr", self.base_lr), ("weight_decay", self.base_wd)):
            if option in settings and settings[option] == base:
                del settings[option]
        return settings, label if settings else "default"

    def _custom(self, key: str) -> dict[str, Any]:
        options = dict(self.custom[key])
        lr_mult = options.pop("lr_mult", None)
        decay_mult = options.pop("decay_mult", None)
        settings: dict[str, Any] = {}
        if lr_mult is not None:
            settings["lr"] = self.base_lr * lr_mult
        if decay_mult is not None and self.base_wd is not None:
            settings["weight_decay"] = self.base_wd * decay_mult
        return {**settings, **options}

    def _by_kind(self, local_name: str, module: nn.Module) -> dict[str, Any]:
        cfg, settings = self.cfg, {}
        is_norm = isinstance(module, _NORM_TYPES)
        is_bias = local_name == "bias" and not is_norm
        if is_bias and "bias_lr_mult" in cfg:
            settings["lr"] = self.base_lr * cfg["bias_lr_mult"]
        if self.base_wd is not None:
            if is_norm and "norm_decay_mult" in cfg:
                settings["weight_decay"] = self.base_wd * cfg["norm_decay_mult"]
            elif is_bias and "bias_decay_mult" in cfg:
                settings["weight_decay"] = self.base_wd * cfg["bias_decay_mult"]
        return settings


def _build_optimizer(
    model: nn.Module, optimizer_cfg: Any, paramwise_cfg: Mapping[str, Any] | None
) -> torch.optim.Optimizer:
    optimizer_cfg = dict(checks.mapping("optimizer", optimizer_cfg))
    if "type" not in optimizer_cfg:
        raise ValueError(f"optimizer config needs a 'type', e.g. dict(type='SGD', lr=0.01), got {optimizer_cfg!r}")
    optimizer_cls = _optimizer_class(optimizer_cfg.pop("type"))
    accepted = _accepted_args(optimizer_cls, skip=("params",))
    names, defaults = accepted if accepted is not None else (None, {})
    if names is not None:
        checks.known_keys(f"optimizer {optimizer_cls.__name__}", optimizer_cfg, names)
    base_lr = optimizer_cfg.get("lr", defaults.get("lr"))
    base_wd = optimizer_cfg.get("weight_decay", defaults.get("weight_decay"))
    groups = _param_groups(model, paramwise_cfg, base_lr, base_wd, names)
    return optimizer_cls(groups, **optimizer_cfg)


def _build_one(model: nn.Module, cfg: Mapping[str, Any]) -> OptimWrapper:
    cfg = dict(cfg)
    wrapper_cls = _wrapper_class(cfg.pop("type", "OptimWrapper"))
    if "optimizer" not in cfg:
        raise ValueError(f"optim wrapper config needs an 'optimizer' dict, got keys {sorted(cfg)}")
    optimizer_cfg = cfg.pop("optimizer")
    paramwise_cfg = cfg.pop("paramwise_cfg", None)
    accepted = _accepted_args(wrapper_cls, skip=("optimizer",))
    if accepted is not None:
        checks.known_keys(f"{wrapper_cls.__name__} config", cfg, ["type", "optimizer", "paramwise_cfg", *accepted[0]])
    optimizer = _build_optimizer(model, optimizer_cfg, paramwise_cfg)
    return wrapper_cls(optimizer=optimizer, **cfg)


def build_optim_wrapper(model: nn.Module, cfg: Mapping[str, Any]) -> OptimWrapper | OptimWrapperDict:
    """Build an ``OptimWrapper`` (or an ``OptimWrapperDict``) from a config dict.

    Args:
        model: The model whose trainable parameters are optimized.
        cfg: Either one wrapper config::

                dict(type='AmpOptimWrapper',            # default 'OptimWrapper'
                     optimizer=dict(type='AdamW', lr=1e-3),   # any torch.optim name
                     accumulative_counts=4, clip_grad=dict(max_norm=1.0), dtype='bfloat16',
                     paramwise_cfg=dict(bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.0,
                                        custom_keys={'backbone': dict(lr_mult=0.1, decay_mult=0.0)}))

            or a dict of such configs keyed by submodule names of ``model``
            (``{'gen': dict(...), 'disc': dict(...)}``), which builds an
            ``OptimWrapperDict``. ``cfg`` is not modified.

    Returns:
        The wrapper, or the dict of wrappers.

    Raises:
        ValueError: Unknown types, keys or submodule names (the message names them).
        TypeError: A config that is not a dict.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = checks.mapping("cfg", cfg)
    if "optimizer" in cfg or "type" in cfg:
        return _build_one(model, cfg)
    if not cfg or not all(isinstance(value, Mapping) for value in cfg.values()):
        raise ValueError(
            "cfg must be one wrapper config with an 'optimizer' entry, or a dict of such configs keyed by "
            f"submodule names; got keys {sorted(cfg)}"
        )
    wrappers = {}
    children = [name for name, _ in model.named_children()]
    for name, sub_cfg in cfg.items():
        try:
            submodule = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"cfg names submodule {name!r}, which the model lacks; its children: {children}") from None
        wrappers[name] = _build_one(submodule, sub_cfg)
    return OptimWrapperDict(**wrappers)
