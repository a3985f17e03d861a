"""Optimizer states between layouts: MMEngine's one group per parameter, and groups of equal settings.

With a ``paramwise_cfg``, MMEngine's constructor makes one param group per
parameter, in the model's order; ``build_optim_wrapper`` makes one group per
set of equal settings and records in each group's ``model_order`` where its
parameters stand in that order. These two functions carry a state dict from
one layout to the other, so MMEngine's checkpoints resume here and this
project's load into MMEngine.

Examples:
    >>> import torch
    >>> from engine_opt import build_optim_wrapper
    >>> cfg = dict(
    ...     optimizer=dict(type="SGD", lr=0.1, weight_decay=0.01),
    ...     paramwise_cfg=dict(bias_decay_mult=0.0),
    ... )
    >>> wrapper = build_optim_wrapper(torch.nn.Linear(2, 2), cfg)
    >>> per_parameter = in_model_order(wrapper.optimizer.state_dict())
    >>> [(g["params"], g["weight_decay"]) for g in per_parameter["param_groups"]]
    [([0], 0.01), ([1], 0.0)]
    >>> optimizer = wrapper.optimizer
    >>> regrouped(optimizer, per_parameter) == optimizer.state_dict()
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import checks
from .paramwise import MODEL_ORDER
from .state_checks import lists_param_ids

_NOT_SETTINGS = ("params", "name", MODEL_ORDER, "lr_mult", "decay_mult")  # MMEngine copies a custom key's mults


def _settings(group: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key not in _NOT_SETTINGS}


def _same(first: Mapping[str, Any], second: Mapping[str, Any]) -> bool:
    if first.keys() != second.keys():
        return False
    for key, value in first.items():
        other = second[key]
        if isinstance(value, torch.Tensor) or isinstance(other, torch.Tensor):
            if not (isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and torch.equal(value, other)):
                return False
        elif value != other:
            return False
    return True


def regrouped(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state_dict`` in ``optimizer``'s layout, where it was saved one group per parameter in model order.

    Returned as given when the optimizer's groups have no ``model_order``
    (built otherwise than from a ``paramwise_cfg``), when the saved groups
    have the same (saved by such a build), or when it is malformed (the
    load's checks name what is wrong). The groups keep their ``name`` and
    ``model_order``. The caller's dict is not modified.

    Raises:
        ValueError: The state comes from another ``paramwise_cfg`` (or none):
            parameters that share a group here had different settings there,
            groups set apart here had the same, the saved ``model_order``
            differs, or it holds another number of parameters.
    """
    saved = state_dict.get("param_groups")
    groups = optimizer.param_groups
    if not isinstance(saved, list) or not all(lists_param_ids(group) for group in saved):
        return state_dict
    if not all(MODEL_ORDER in group for group in groups):
        return state_dict  # not built from a paramwise_cfg
    if any(MODEL_ORDER in group for group in saved):
        saved_order = [group.get(MODEL_ORDER) for group in saved]
        if saved_order != [group[MODEL_ORDER] for group in groups]:
            raise ValueError(
                f"state_dict's groups hold the parameters at model positions {saved_order}, this optimizer's at "
                f"{[group[MODEL_ORDER] for group in groups]}: it was saved with another model or paramwise_cfg"
            )
        return state_dict  # saved by such a build
    ids = [index for group in saved for index in group["params"]]
    owners = [group for group in saved for _ in group["params"]]
    total = sum(len(group["params"]) for group in groups)
    if len(ids) != total:
        raise ValueError(
            f"state_dict holds {len(ids)} parameter(s) in {len(saved)} group(s), this optimizer {total} in "
            f"{len(groups)}: it comes from another model, or from one with other trainable parameters"
        )
    new_groups = [_one_group(group, ids, owners) for group in groups]
    _check_distinct(new_groups)
    return {**state_dict, "param_groups": new_groups}


def _comparable(group: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """A group's settings as a schedule leaves them comparable: a scheduled value by its ``initial_`` one."""
    settings = _settings(group)
    kept = {key: value for key, value in settings.items() if f"initial_{key}" not in settings}
    return tuple(sorted((key, repr(value)) for key, value in kept.items()))


def _check_distinct(groups: list[dict[str, Any]]) -> None:
    seen: dict[tuple[tuple[str, str], ...], Any] = {}
    for group in groups:
        key = _comparable(group)
        if key in seen:
            raise ValueError(
                f"state_dict gives the param groups {seen[key]!r} and {group.get('name', 'unnamed')!r} the same "
                "settings, which this optimizer's paramwise_cfg sets apart: it was saved with another "
                "paramwise_cfg, or without one"
            )
        seen[key] = group.get("name", "unnamed")


def _one_group(group: Mapping[str, Any], ids: list[Any], owners: list[Mapping[str, Any]]) -> dict[str, Any]:
    order = group[MODEL_ORDER]
    first = _settings(owners[order[0]])
    for position in order[1:]:
        if not _same(_settings(owners[position]), first):
            raise ValueError(
                f"state_dict gives parameters {order[0]} and {position} (in model order) different settings "
                f"({first} and {_settings(owners[position])}), but this optimizer's paramwise_cfg puts them in "
                f"one group ({group.get('name', 'unnamed')!r}): the state was saved with another paramwise_cfg"
            )
    kept = {key: group[key] for key in ("name", MODEL_ORDER) if key in group}
    return {**first, **kept, "params": [ids[position] for position in order]}


def in_model_order(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` (an optimizer's, or a wrapper's) with one param group per parameter, in model order.

    MMEngine's layout for a ``paramwise_cfg``: what its ``OptimWrapper``
    loads. Groups without ``model_order`` keep their order. Keys other than
    ``state`` and ``param_groups`` are kept as they are; the caller's dict is
    not modified.
    """
    state_dict = checks.mapping("state_dict", state_dict)
    groups = state_dict.get("param_groups")
    if not isinstance(state_dict.get("state"), Mapping) or not isinstance(groups, list):
        raise ValueError(f"state_dict must hold 'state' and a 'param_groups' list; got keys {sorted(state_dict)}")
    positions: list[tuple[int, Any, dict[str, Any]]] = []  # (model position, saved id, settings)
    for index, group in enumerate(groups):
        if not lists_param_ids(group):
            raise ValueError(f"state_dict['param_groups'][{index}] must be a dict with a 'params' list of ints")
        order = group.get(MODEL_ORDER, range(len(positions), len(positions) + len(group["params"])))
        if len(order) != len(group["params"]):
            raise ValueError(
                f"state_dict['param_groups'][{index}] has {len(group['params'])} parameter(s) but a model_order "
                f"of {len(order)}"
            )
        positions += [
            (position, index, _settings(group)) for position, index in zip(order, group["params"], strict=True)
        ]
    positions.sort(key=lambda item: item[0])
    new_id = {index: position for position, (_, index, _) in enumerate(positions)}
    state = {new_id[index]: value for index, value in state_dict["state"].items()}
    param_groups = [{**settings, "params": [new_id[index]]} for _, index, settings in positions]
    return {**state_dict, "state": state, "param_groups": param_groups}
