"""The ``loss_scale`` argument of ``AmpOptimWrapper`` and a saved grad scaler's state, checked before use.

A scale lives in a float32 tensor: ``1e300`` would become ``inf`` (every
step skipped after the first backward overflows), ``1e-50`` would become
``0`` (every gradient zero). Both are refused, with the argument named.

Examples:
    >>> check_loss_scale({"init_scale": 1e300})  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    ValueError: loss_scale['init_scale'] must be > 0 and finite as a float32
    (the scale's dtype), got 1e+300
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from . import checks

SCALER_ARGS = ("init_scale", "growth_factor", "backoff_factor", "growth_interval", "enabled")


def scale(name: str, value: Any) -> float:
    """``value`` if it is a number that stays finite and above 0 as a float32."""
    as_float32 = float(torch.tensor(float(checks.number(name, value)), dtype=torch.float32))
    if not (math.isfinite(as_float32) and as_float32 > 0):
        raise ValueError(f"{name} must be > 0 and finite as a float32 (the scale's dtype), got {value!r}")
    return float(value)


def check_loss_scale(loss_scale: Any) -> None:
    """Raise unless ``loss_scale`` is ``'dynamic'``, a static scale, or a dict of ``GradScaler`` arguments."""
    if isinstance(loss_scale, torch.optim.Optimizer):
        raise TypeError(
            "AmpOptimWrapper got an optimizer as its first positional argument (loss_scale); "
            "pass it by keyword: AmpOptimWrapper(optimizer=optimizer)"
        )
    if isinstance(loss_scale, str) and loss_scale == "dynamic":
        return
    if checks.is_real(loss_scale):
        scale("loss_scale", loss_scale)
        return
    if isinstance(loss_scale, Mapping):
        checks.known_keys("loss_scale", loss_scale, SCALER_ARGS)
        _check_factors("loss_scale", {"growth_factor": 2.0, "backoff_factor": 0.5, **loss_scale})
        scale("loss_scale['init_scale']", loss_scale.get("init_scale", 2.0**16))
        checks.positive_int("loss_scale['growth_interval']", loss_scale.get("growth_interval", 2000))
        return
    raise ValueError(
        f"loss_scale must be 'dynamic', a positive number (static scale) or a dict of "
        f"torch.amp.GradScaler arguments {list(SCALER_ARGS)}, got {checks.describe(loss_scale)}"
    )


def check_scaler_state(where: str, state: Mapping[str, Any], expected_keys: set[str]) -> None:
    """Raise unless ``state`` is a ``GradScaler.state_dict()`` with usable values: a scale that is no nan."""
    if set(state) != expected_keys:
        raise ValueError(f"{where} must have the keys {sorted(expected_keys)}, got {sorted(state)}")
    scale(f"{where}['scale']", state["scale"])
    _check_factors(where, state)
    checks.positive_int(f"{where}['growth_interval']", state["growth_interval"])
    checks.saved_int(f"{where}['_growth_tracker']", state["_growth_tracker"], 0)


def _check_factors(where: str, values: Mapping[str, Any]) -> None:
    growth = float(checks.number(f"{where}['growth_factor']", values["growth_factor"]))
    backoff = float(checks.number(f"{where}['backoff_factor']", values["backoff_factor"]))
    if not (math.isfinite(growth) and growth > 1):
        raise ValueError(f"{where}['growth_factor'] must be > 1, got {growth!r}")
    if not 0 < backoff < 1:
        raise ValueError(f"{where}['backoff_factor'] must be in (0, 1), got {backoff!r}")
