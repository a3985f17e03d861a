"""MMEngine's saved scheduler states and per-parameter values, in this package's form.

MMEngine's schedulers save their attributes (``_global_step``,
``_last_value``...), and MMEngine's optimizers built from a
``paramwise_cfg`` hold one param group per parameter (and a base group
last); here the groups are the ones a ``paramwise_cfg`` asks for, recorded
in ``model_order``. These functions translate the one into the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..paramwise import MODEL_ORDER


def from_mmengine(state: Mapping[str, Any], scheduler_type: str, groups: list[dict[str, Any]]) -> Mapping[str, Any]:
    """An MMEngine scheduler's state (its attributes: ``_global_step``, ``_last_value``...) in this package's form.

    ``state`` is returned as it is when it is not MMEngine's. Its config
    entries (``begin``, ``end``, ``gamma``...) are left behind: the resumed
    run's own config applies, as for this package's states.

    Examples:
        >>> saved = {"_global_step": 3, "last_step": 3, "by_epoch": False}
        >>> from_mmengine(saved, "LinearLR", [])
        {'type': 'LinearLR', 'by_epoch': False, 'last_step': 3, 'global_step': 3}
    """
    if "_global_step" not in state or "global_step" in state:
        return state
    keys = {"param_name": "param_name", "by_epoch": "by_epoch", "last_step": "last_step"}
    keys.update(global_step="_global_step", base_values="base_values", last_value="_last_value")
    converted = {ours: state[theirs] for ours, theirs in keys.items() if theirs in state}
    for key in ("base_values", "last_value"):
        if key in converted:
            converted[key] = per_group(f"the saved scheduler state's {key}", converted[key], groups)
    return {"type": scheduler_type, **converted}


def per_group(key: str, values: Any, groups: list[dict[str, Any]]) -> Any:
    """MMEngine's values of one group per parameter (and its base group last) for these groups, by ``model_order``.

    Returned as given where there is nothing to regroup (the check names a
    length that does not fit).
    """
    total = sum(len(group["params"]) for group in groups)
    if not isinstance(values, list) or not all(MODEL_ORDER in group for group in groups):
        return values
    if len(values) not in (total, total + 1):  # one per parameter, and MMEngine's base group (several groups)
        return values
    result = []
    for group in groups:
        order = group[MODEL_ORDER]
        differing = [position for position in order if values[position] != values[order[0]]]
        if differing:
            raise ValueError(
                f"{key} gives parameters {order[0]} and {differing[0]} (in model "
                f"order) different values, but they share a param group here ({group.get('name', 'unnamed')!r}), "
                "built from another paramwise_cfg than these values were written for"
            )
        result.append(values[order[0]])
    return result
