"""``build_param_scheduler``: MMEngine's ``param_scheduler`` config section into scheduler objects."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from .. import checks
from ..wrapper import OptimWrapper
from ..wrapper_dict import OptimWrapperDict
from .base import Optimizer, ParamScheduler, torch_optimizer
from .registry import SCHEDULERS

_METRIC_SCHEDULERS = ("ReduceOnPlateauParamScheduler", "ReduceOnPlateauLR", "ReduceOnPlateauMomentum")


def _scheduler_class(where: str, type_: Any) -> type[ParamScheduler]:
    if isinstance(type_, type) and issubclass(type_, ParamScheduler) and type_ is not ParamScheduler:
        return type_
    if isinstance(type_, str) and type_ in SCHEDULERS:
        return SCHEDULERS[type_]
    if type_ in _METRIC_SCHEDULERS:
        raise ValueError(
            f"{where}['type'] {type_!r} needs a validation metric, which a schedule of updates does not have: "
            "use torch's ReduceLROnPlateau from an evaluation handler"
        )
    raise ValueError(
        f"{where}['type'] must be one of {sorted(SCHEDULERS)} or a ParamScheduler subclass, "
        f"got {checks.describe(type_)}"
    )


def _accepted_args(cls: type[ParamScheduler]) -> list[str]:
    """The config keys ``cls`` takes: its keyword arguments, ``param_name`` unless fixed."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    names = [p.name for p in parameters if p.name not in ("self", "optimizer") and p.kind is not p.VAR_KEYWORD]
    if cls.fixed_param_name is not None:
        names.remove("param_name")
    return names


def _build_one(
    target: Optimizer,
    cfg: Any,
    where: str,
    epoch_length: int | None,
    max_epochs: int | None,
    max_iters: int | None,
) -> ParamScheduler:
    cfg = dict(checks.mapping(where, cfg))  # a copy: the caller's config is never changed
    if "type" not in cfg:
        raise ValueError(f"{where} needs a 'type', e.g. dict(type='LinearLR', end=5), got keys {sorted(cfg)}")
    cls = _scheduler_class(where, cfg.pop("type"))
    convert = checks.flag(f"{where}['convert_to_iter_based']", cfg.pop("convert_to_iter_based", False))
    checks.known_keys(f"{where} ({cls.__name__})", cfg, [*_accepted_args(cls), "type", "convert_to_iter_based"])
    by_epoch = checks.flag(f"{where}['by_epoch']", cfg.get("by_epoch", True))
    if "end" not in cfg:  # the run's length, as MMEngine's runner sets it
        if by_epoch and max_epochs is not None:
            cfg["end"] = max_epochs
        elif not by_epoch and max_iters is not None:
            cfg["end"] = max_iters
        elif not by_epoch and max_epochs is not None:
            if epoch_length is None:
                raise ValueError(
                    f"{where} is iteration-based (by_epoch=False) without an 'end': its default end is "
                    "max_epochs * epoch_length, which needs epoch_length (applied updates per epoch), got None"
                )
            cfg["end"] = max_epochs * epoch_length
    try:
        if convert:
            if not by_epoch:
                raise ValueError(
                    "convert_to_iter_based=True converts an epoch-based schedule, so by_epoch must be True, "
                    "got by_epoch=False"
                )
            if epoch_length is None:
                raise ValueError("convert_to_iter_based=True needs epoch_length (applied updates per epoch), got None")
            return cls.build_iter_from_epoch(target, epoch_length=epoch_length, **cfg)
        return cls(target, **cfg)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None


def _build_list(
    target: Optimizer,
    cfg: Any,
    where: str,
    epoch_length: int | None,
    max_epochs: int | None,
    max_iters: int | None,
) -> list[ParamScheduler]:
    if isinstance(cfg, Mapping):
        items: list[tuple[str, Any]] = [(where, cfg)]
    elif isinstance(cfg, (list, tuple)):
        items = [(f"{where}[{index}]", item) for index, item in enumerate(cfg)]
    else:
        raise TypeError(f"{where} must be a dict or a list of dicts, got {checks.describe(cfg)}")
    schedulers = []
    for item_where, item in items:
        if isinstance(item, ParamScheduler):
            if item.optimizer is not target:
                raise ValueError(f"{item_where} is a scheduler built on another optimizer than its wrapper's")
            schedulers.append(item)
        else:
            schedulers.append(_build_one(target, item, item_where, epoch_length, max_epochs, max_iters))
    return schedulers


def build_param_scheduler(
    optim_wrapper: OptimWrapper | OptimWrapperDict | torch.optim.Optimizer,
    cfg: Any,
    *,
    epoch_length: int | None = None,
    max_epochs: int | None = None,
    max_iters: int | None = None,
) -> list[ParamScheduler] | dict[str, list[ParamScheduler]]:
    """Build schedulers from MMEngine's ``param_scheduler`` config, as its runner does.

    Each config is built in order, so a chain (a warmup, then a decay) is
    built as MMEngine builds it. A config that fails leaves the param groups
    as they were.

    Args:
        optim_wrapper: The wrapper (or a torch optimizer), or an
            ``OptimWrapperDict``.
        cfg: One scheduler config, e.g. ``dict(type='CosineAnnealingLR',
            T_max=100, eta_min=1e-5, begin=0, end=100, by_epoch=True,
            convert_to_iter_based=False)``, or a list of them. With an
            ``OptimWrapperDict``, either that (every member gets its own
            schedulers from it) or a dict keyed by member names, each value a
            config or a list; a member left out gets none. Built schedulers
            may stand in for configs. ``cfg`` is not modified.
        epoch_length: Applied updates per epoch (with accumulation, batches
            per epoch / ``accumulative_counts``): needed by
            ``convert_to_iter_based=True``.
        max_epochs: The default ``end`` of an epoch-based config without one
            (and, times ``epoch_length``, of an iteration-based one).
        max_iters: The default ``end`` of an iteration-based config without
            one: applied updates in the run.

    Returns:
        The schedulers in config order, or for an ``OptimWrapperDict`` a
        dict of such lists keyed by member name.

    Raises:
        TypeError, ValueError: An unknown type, key or member name, a value
            of the wrong type or out of range, ``end <= begin``, a missing
            ``epoch_length``: the message names the config entry, the value
            received and what is accepted.

    Examples:
        >>> import torch
        >>> from engine_opt import OptimWrapper
        >>> model = torch.nn.Linear(2, 1)
        >>> wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3))
        >>> configs = [
        ...     dict(type="LinearLR", start_factor=0.1, end=500, by_epoch=False),
        ...     dict(type="CosineAnnealingLR", begin=1, convert_to_iter_based=True),
        ...     dict(type="CosineAnnealingMomentum", eta_min=0.85),
        ... ]
        >>> schedulers = build_param_scheduler(
        ...     wrapper, configs, epoch_length=500, max_epochs=12
        ... )
        >>> for scheduler in schedulers:
        ...     print(scheduler)
        LinearLR('lr', begin=0, end=500, by iter)
        CosineAnnealingLR('lr', begin=500, end=6000, by iter)
        CosineAnnealingMomentum('momentum', begin=0, end=12, by epoch)
    """
    for name, value in (("epoch_length", epoch_length), ("max_epochs", max_epochs), ("max_iters", max_iters)):
        if value is not None:
            checks.positive_int(name, value)
    lengths = (epoch_length, max_epochs, max_iters)
    if isinstance(optim_wrapper, OptimWrapperDict):
        targets = list(optim_wrapper.items())
    elif isinstance(optim_wrapper, (OptimWrapper, torch.optim.Optimizer)):
        targets = []
    else:
        raise TypeError(
            "optim_wrapper must be an OptimWrapper, an OptimWrapperDict or a torch.optim.Optimizer, "
            f"got {checks.describe(optim_wrapper)}"
        )
    groups = [
        group
        for target in ([wrapper for _, wrapper in targets] if targets else [optim_wrapper])
        for group in torch_optimizer(target).param_groups
    ]
    snapshot = [{key: value for key, value in group.items() if key != "params"} for group in groups]
    try:
        if not isinstance(optim_wrapper, OptimWrapperDict):
            if isinstance(cfg, Mapping) and "type" not in cfg:
                raise ValueError(
                    f"param_scheduler needs a 'type', e.g. dict(type='LinearLR', end=5), got keys {sorted(cfg)} "
                    "(a dict keyed by member names is for an OptimWrapperDict)"
                )
            return _build_list(optim_wrapper, cfg, "param_scheduler", *lengths)
        if isinstance(cfg, Mapping) and "type" not in cfg:
            unknown = [name for name in cfg if name not in optim_wrapper]
            if unknown:
                raise ValueError(
                    f"param_scheduler names member(s) {unknown}, which the OptimWrapperDict lacks; "
                    f"its members: {list(optim_wrapper)}"
                )
            return {
                name: _build_list(wrapper, cfg[name], f"param_scheduler[{name!r}]", *lengths) if name in cfg else []
                for name, wrapper in targets
            }
        return {name: _build_list(wrapper, cfg, "param_scheduler", *lengths) for name, wrapper in targets}
    except BaseException:
        for group, saved in zip(groups, snapshot, strict=True):
            for key in [key for key in group if key != "params" and key not in saved]:
                del group[key]
            group.update(saved)
        raise
