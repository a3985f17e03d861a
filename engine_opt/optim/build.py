"""``build_optim_wrapper``: the training strategy as configuration.

A config dict names the wrapper, the optimizer and the wrapper's arguments, so
switching from fp32 to bf16 with accumulation and clipping is a change of
config, not of training code. ``paramwise_cfg`` gives each parameter the lr,
weight decay and options MMEngine's constructor gives it (``paramwise``);
parameters that end up with the same settings share one param group.

Examples:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    >>> wrapper = build_optim_wrapper(model, dict(
    ...     type="AmpOptimWrapper", dtype="bf16", accumulative_counts=4,
    ...     clip_grad=dict(max_norm=1.0),
    ...     optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05),
    ...     paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0)))
    >>> [(len(g["params"]), g["weight_decay"]) for g in wrapper.param_groups]
    [(1, 0.05), (3, 0.0)]
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import checks, distributed
from .amp import AmpOptimWrapper
from .implementation import KEY as IMPLEMENTATION_KEY
from .implementation import Implementation, choose, combined
from .implementation import check as check_implementation
from .paramwise import ParamwiseRules
from .routed import RoutedOptimizer
from .routes import DEFAULT_ROUTE, Route, Routes
from .sharded_muon import ShardedMuon
from .wrapper import OptimWrapper
from .wrapper_dict import OptimWrapperDict

WRAPPERS: dict[str, type[OptimWrapper]] = {"OptimWrapper": OptimWrapper, "AmpOptimWrapper": AmpOptimWrapper}
_ZERO = "ZeroRedundancyOptimizer"
_CONSTRUCTOR = "DefaultOptimWrapperConstructor"
_ZERO_ARGS = ("optimizer_type", "process_group", "parameters_as_bucket_view", "overlap_with_ddp")


def _optimizer_names() -> list[str]:
    return sorted(
        name
        for name, value in vars(torch.optim).items()
        if isinstance(value, type) and issubclass(value, torch.optim.Optimizer) and value is not torch.optim.Optimizer
    )


def import_path(path: str, where: str = "optimizer type") -> Any:
    """The object a dotted path (``'mypkg.optim.Lion'``) names, or ``None`` if there is no such module or name.

    ``where`` names the argument in the error message.

    Raises:
        ValueError: The module exists but fails to import (the error it raised is chained).
    """
    module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute or "" in module_name.split("."):
        return None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            return None  # the path's own module (or a parent) is not there
        raise ValueError(f"{where} {path!r}: importing {module_name} failed: {error}") from error
    except ImportError as error:
        raise ValueError(f"{where} {path!r}: importing {module_name} failed: {error}") from error
    return getattr(module, attribute, None)


def _optimizer_class(type_: Any, where: str = "optimizer type") -> type[torch.optim.Optimizer]:
    """A ``torch.optim.Optimizer`` subclass from a class, a ``torch.optim`` name or a dotted import path."""
    candidate = type_
    if isinstance(type_, str):
        candidate = import_path(type_) if "." in type_ else getattr(torch.optim, type_, None)
    if isinstance(candidate, type) and issubclass(candidate, OptimWrapper):
        raise ValueError(
            f"{where} must be an optimizer, got the wrapper {type_!r}: the wrapper's type goes in the outer config "
            "(dict(type='AmpOptimWrapper', optimizer=dict(type='SGD', ...)))"
        )
    if isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer):
        return candidate
    raise ValueError(
        f"{where} must be a torch.optim.Optimizer subclass, a dotted import path to one ('mypkg.optim.Lion'), "
        f"or one of {_optimizer_names()}, got {type_!r}"
    )


def _wrapper_class(type_: Any) -> type[OptimWrapper]:
    if isinstance(type_, type) and issubclass(type_, OptimWrapper):
        return type_
    if isinstance(type_, str) and type_ in WRAPPERS:
        return WRAPPERS[type_]
    raise ValueError(f"optim wrapper type must be one of {list(WRAPPERS)} or an OptimWrapper subclass, got {type_!r}")


def _accepted_args(cls: type, skip: tuple[str, ...]) -> tuple[list[str], dict[str, Any]] | None:
    """Keyword arguments of ``cls`` and their defaults, or ``None`` if it takes any (``**kwargs``).

    An ``__init__`` with ``**kwargs`` passes them on to its base class's,
    whose arguments count too; ``torch.optim.Optimizer``'s own ``(params,
    defaults)`` is no keyword interface, so an optimizer whose ``**kwargs``
    reach it takes any.
    """
    names: list[str] = []
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is torch.optim.Optimizer:
            return None
        parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
        for parameter in parameters:
            if parameter.name in skip or parameter.kind is parameter.VAR_POSITIONAL:
                continue
            if parameter.kind is parameter.VAR_KEYWORD:
                break
            names.append(parameter.name)
            if parameter.default is not parameter.empty:
                defaults.setdefault(parameter.name, parameter.default)
        else:
            return names, defaults
    return None


def _first_argument(cls: type) -> str:
    """The name of an optimizer's first argument, its parameters (``params``, or another name)."""
    return next(iter(inspect.signature(cls).parameters), "params")


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model.module`` where ``model`` only wraps it (``DistributedDataParallel``, ``DataParallel``), else ``model``.

    MMEngine's constructor takes ``model.module`` whenever there is one; here
    only a wrapper with no parameters of its own is unwrapped, so no
    parameter is lost.

    Examples:
        >>> inner = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(inner)) is inner
        True
    """
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and {id(p) for p in model.parameters()} == {id(p) for p in inner.parameters()}:
        return inner
    return model


def _parameters(
    model: nn.Module,
    paramwise_cfg: Mapping[str, Any] | None,
    base_lr: Any,
    base_wd: Any,
    args: list[str] | None,
    wd_given: bool,
    route: Route | None = None,
) -> list[Any]:
    """The optimizer's parameters: all of them (or ``route``'s) in one group, or groups made by ``paramwise_cfg``."""
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError(f"the model {type(model).__name__} has no trainable parameters")
    if not paramwise_cfg:  # as MMEngine: every parameter, frozen ones too, so unfreezing them later trains them
        if paramwise_cfg is not None:
            checks.mapping("paramwise_cfg", paramwise_cfg)
        return [param for param in model.parameters() if route is None or route.takes(param)]
    # routed: a custom key's options are checked against the optimizers of the routes it reaches (below)
    rules = ParamwiseRules.from_config(paramwise_cfg, base_lr, base_wd, args if route is None else None)
    warn = route is None or route.name == DEFAULT_ROUTE  # once, for the whole model
    if not wd_given and rules.multipliers.pop("flat_decay_mult", None) is not None and warn:
        warnings.warn(
            "paramwise_cfg['flat_decay_mult'] has no effect: the optimizer config sets no 'weight_decay' "
            "(as in MMEngine, 1-D parameters keep the optimizer's default); set one to decay them otherwise",
            UserWarning,
            stacklevel=5 if route is None else 6,  # the caller of build_optim_wrapper
        )
    groups = rules.param_groups(model)
    if route is not None:
        groups = route.share(groups)
        route.check_options(groups, args)
    for key in sorted(set(rules.custom_keys) - rules.matched) if warn else ():
        warnings.warn(
            f"paramwise_cfg['custom_keys'] key {key!r} matches no trainable parameter of {type(model).__name__}",
            UserWarning,
            stacklevel=5 if route is None else 6,  # the caller of build_optim_wrapper
        )
    return groups


def _tensors(params: list[Any]) -> list[torch.Tensor]:
    """The tensors of an optimizer's ``params`` argument: a list of tensors, or of groups with ``'params'``."""
    return [param for item in params for param in (item["params"] if isinstance(item, Mapping) else [item])]


def _build_optimizer(
    model: nn.Module,
    optimizer_cfg: Any,
    paramwise_cfg: Mapping[str, Any] | None,
    route: Route | None = None,
    implementation: str | None = None,
) -> tuple[torch.optim.Optimizer, Implementation | None]:
    """The optimizer a config describes, and what its ``implementation`` (if given) chose."""
    where = "optimizer" if route is None else route.where("optimizer")
    optimizer_cfg = dict(checks.mapping(where, optimizer_cfg))
    if "type" not in optimizer_cfg:
        raise ValueError(f"{where} config needs a 'type', e.g. dict(type='SGD', lr=0.01), got {optimizer_cfg!r}")
    type_ = optimizer_cfg.pop("type")
    zero = type_ == _ZERO or (isinstance(type_, str) and type_.endswith(f"distributed.optim.{_ZERO}"))
    if zero and route is not None:
        raise ValueError(f"{where}: {_ZERO} cannot be routed: it shards one optimizer's state over the ranks")
    zero_args = {key: optimizer_cfg.pop(key) for key in _ZERO_ARGS if key in optimizer_cfg} if zero else {}
    if zero and "optimizer_type" not in zero_args:
        raise ValueError(f"optimizer {_ZERO} needs 'optimizer_type', the optimizer each rank runs (e.g. 'AdamW')")
    optimizer_cls = (
        _optimizer_class(zero_args.pop("optimizer_type"), "optimizer_type")
        if zero
        else _optimizer_class(type_, f"{where} type")
    )
    accepted = _accepted_args(optimizer_cls, skip=(_first_argument(optimizer_cls),))
    names, defaults = accepted if accepted is not None else (None, {})
    if names is not None:
        checks.known_keys(f"{where} {optimizer_cls.__name__}", optimizer_cfg, names)
    base_lr = optimizer_cfg.get("lr", defaults.get("lr"))
    base_wd = optimizer_cfg.get("weight_decay", defaults.get("weight_decay"))
    wd_given = "weight_decay" in optimizer_cfg
    params = _parameters(unwrap_model(model), paramwise_cfg, base_lr, base_wd, names, wd_given, route)
    if optimizer_cls is torch.optim.Muon and distributed.any_sharded(_tensors(params)):
        optimizer_cls = ShardedMuon  # torch's Muon takes no DTensor: each matrix orthogonalised whole, on its owner
    choice = None
    if implementation is not None:
        # a trained module with sparse=True (Embedding, EmbeddingBag) makes sparse gradients
        sparse = any(
            getattr(module, "sparse", False) is True and any(p.requires_grad for p in module.parameters())
            for module in model.modules()
        )
        choice, kwargs = choose(implementation, optimizer_cls, _tensors(params), optimizer_cfg, where, sparse)
        optimizer_cfg.update(kwargs)
    if route is not None:
        return route.build(optimizer_cls, params, optimizer_cfg), choice
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_cls, **zero_args, **optimizer_cfg), choice
    return optimizer_cls(params, **optimizer_cfg), choice


def _build_one(model: nn.Module, cfg: Mapping[str, Any]) -> OptimWrapper:
    cfg = dict(cfg)
    constructor = cfg.pop("constructor", _CONSTRUCTOR)
    if constructor != _CONSTRUCTOR:
        raise ValueError(
            f"optim wrapper config 'constructor' can only be {_CONSTRUCTOR!r} (the rules paramwise_cfg follows), got "
            f"{constructor!r}; for layer-wise lr decay (LearningRateDecayOptimWrapperConstructor) set "
            "paramwise_cfg=dict(layer_decay_rate=...)"
        )
    wrapper_cls = _wrapper_class(cfg.pop("type", "OptimWrapper"))
    if "optimizer" not in cfg:
        raise ValueError(f"optim wrapper config needs an 'optimizer' dict, got keys {sorted(cfg)}")
    optimizer_cfg = cfg.pop("optimizer")
    paramwise_cfg = cfg.pop("paramwise_cfg", None)
    routes_cfg = cfg.pop("routes", None)
    implementation = cfg.pop(IMPLEMENTATION_KEY, None)
    accepted = _accepted_args(wrapper_cls, skip=("optimizer",))
    if accepted is not None:
        known = ["type", "optimizer", "paramwise_cfg", "routes", IMPLEMENTATION_KEY, *accepted[0]]
        checks.known_keys(f"{wrapper_cls.__name__} config", cfg, known)
    if implementation is not None:
        check_implementation(implementation)  # before anything is built
    if routes_cfg is None:
        optimizer, choice = _build_optimizer(model, optimizer_cfg, paramwise_cfg, implementation=implementation)
    else:
        optimizer, choice = _build_routed(model, routes_cfg, optimizer_cfg, paramwise_cfg, implementation)
    wrapper = wrapper_cls(optimizer=optimizer, **cfg)
    if choice is not None:
        wrapper.implementation = choice
    return wrapper


def _build_routed(
    model: nn.Module,
    routes_cfg: Any,
    optimizer_cfg: Any,
    paramwise_cfg: Mapping[str, Any] | None,
    implementation: str | None = None,
) -> tuple[RoutedOptimizer, Implementation | None]:
    """A ``RoutedOptimizer``: each route's optimizer over the parameters it takes first, ``optimizer`` over the rest.

    ``implementation`` applies to each route's optimizer (``'auto'``: each its own pick).
    """
    routes = Routes.parse(unwrap_model(model), routes_cfg, optimizer_cfg)
    optimizers = {}
    choices: dict[str, Implementation] = {}
    for route in routes:
        # paramwise_cfg leaves frozen parameters out (without it they stay, so unfreezing them trains them)
        if paramwise_cfg and not route.trainable and route.name != DEFAULT_ROUTE:
            raise ValueError(f"routes[{route.name!r}] takes only frozen parameters (requires_grad=False)")
        if route.params and (route.trainable or not paramwise_cfg):
            optimizer, choice = _build_optimizer(model, route.optimizer_cfg, paramwise_cfg, route, implementation)
            optimizers[route.name] = optimizer
            if choice is not None:
                choices[route.name] = choice
    routed = RoutedOptimizer(optimizers)
    return routed, (None if implementation is None else combined(implementation, choices))


def build_optim_wrapper(model: nn.Module, cfg: Mapping[str, Any]) -> OptimWrapper | OptimWrapperDict:
    """Build an ``OptimWrapper`` (or an ``OptimWrapperDict``) from a config dict.

    Args:
        model: The model whose trainable parameters are optimized.
        cfg: Either one wrapper config::

                dict(type='AmpOptimWrapper',            # default 'OptimWrapper'
                     optimizer=dict(type='AdamW', lr=1e-3),
                     accumulative_counts=4, clip_grad=dict(max_norm=1.0), dtype='bfloat16',
                     paramwise_cfg=dict(bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.0,
                                        custom_keys={'backbone': dict(lr_mult=0.1, decay_mult=0.0)}))

            or a dict of such configs keyed by submodule names of ``model``
            (``{'gen': dict(...), 'disc': dict(...)}``), which builds an
            ``OptimWrapperDict``. The optimizer's ``type`` is a ``torch.optim``
            name, a dotted import path (``'mypkg.optim.Lion'``), an optimizer
            class, or ``'ZeroRedundancyOptimizer'`` with ``optimizer_type``
            naming the optimizer each rank runs. ``paramwise_cfg`` takes
            MMEngine's keys and layer-wise lr decay (``paramwise``).
            ``routes`` sends parameters by rule to other optimizers, as one
            ``RoutedOptimizer`` (``routes``: Muon beside AdamW; ``'Muon'``
            over FSDP2-sharded parameters builds a ``ShardedMuon``), and
            ``sam=dict(rho=..., adaptive=...)`` makes each update SAM's two
            passes (``OptimWrapper``'s ``sam``). ``implementation``
            (``'auto'``, ``'for-loop'``, ``'foreach'``, ``'fused'``) sets
            torch's ``foreach``/``fused`` arguments of the optimizer
            (``implementation``; without it, torch's default), and the
            wrapper's ``implementation`` says what it chose. A model
            that only wraps ``.module`` (``DistributedDataParallel``) is
            unwrapped first. ``cfg`` is not modified.

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
    if IMPLEMENTATION_KEY in cfg:  # beside members: where a single wrapper's config would have it
        raise ValueError(
            f"cfg {IMPLEMENTATION_KEY!r} goes in each member's config of a dict of wrapper configs "
            f"({{'gen': dict(optimizer=..., {IMPLEMENTATION_KEY}=...), ...}}), "
            f"got it beside {sorted(set(cfg) - {IMPLEMENTATION_KEY})}"
        )
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
