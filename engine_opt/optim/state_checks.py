"""Checks that a state dict fits a torch object, made before anything is loaded.

``load_state_dict`` of a torch optimizer or module changes the object as it
goes; these functions raise a ``ValueError``/``TypeError`` naming the
mismatch and change nothing, so an all-or-nothing load can ask every object
first.

Examples:
    >>> import torch
    >>> small, wide = torch.nn.Linear(2, 1), torch.nn.Linear(3, 1)
    >>> check_module_state(small, wide.state_dict())
    Traceback (most recent call last):
    ...
    ValueError: shapes differ: weight: saved (1, 3), model (1, 2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import checks
from .paramwise import MODEL_ORDER

# Optimizer state buffers shaped like their parameter (torch.optim's SGD, Adam(W), RMSprop, Adagrad, ...).
_ELEMENTWISE_STATE = frozenset(
    ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta", "sum", "prev", "ax")
)


def check_module_state(module: nn.Module, state_dict: Any) -> None:
    """Raise unless ``state_dict`` has exactly ``module``'s keys, with its shapes.

    A ``DataParallel``/``DistributedDataParallel`` is checked as the module
    it wraps (Ignite's ``Checkpoint`` saves and loads that one).
    """
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        module = module.module
    saved = checks.mapping("the saved model state", state_dict)
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the model lacks {unexpected} and the checkpoint lacks {missing}")
    shapes = [
        f"{key}: saved {tuple(saved[key].shape)}, model {tuple(value.shape)}"
        for key, value in expected.items()
        if isinstance(saved[key], torch.Tensor) and saved[key].shape != value.shape
    ]
    if shapes:
        raise ValueError(f"shapes differ: {'; '.join(shapes)}")
    dtypes = [
        f"{key}: saved {_dtype(saved[key])}, model {_dtype(value)}"
        for key, value in expected.items()
        if isinstance(value, torch.Tensor)
        and not (isinstance(saved[key], torch.Tensor) and saved[key].dtype == value.dtype)
    ]
    if dtypes:
        raise ValueError(f"dtypes differ (loading would convert them silently): {'; '.join(dtypes)}")


def check_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: Any) -> None:
    """Raise unless ``state_dict`` (an ``Optimizer.state_dict()``) fits ``optimizer``'s param groups.

    Extra top-level keys (a wrapper's ``counters``...) are left to the caller.
    """
    state_dict = checks.mapping("state_dict", state_dict)
    missing = [key for key in ("state", "param_groups") if key not in state_dict]
    if missing:
        raise ValueError(
            f"state_dict lacks the optimizer key(s) {missing}; got keys {sorted(state_dict)}. "
            "Pass what OptimWrapper.state_dict() or Optimizer.state_dict() returned."
        )
    checks.mapping("state_dict['state']", state_dict["state"])
    saved_groups = state_dict["param_groups"]
    groups = optimizer.param_groups
    if not isinstance(saved_groups, list) or not all(lists_param_ids(group) for group in saved_groups):
        raise ValueError(
            "state_dict['param_groups'] must be a list of dicts, each with a 'params' list of parameter ids (ints)"
        )
    if len(saved_groups) != len(groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param group(s), the optimizer has {len(groups)}")
    saved_sizes = [len(group["params"]) for group in saved_groups]
    sizes = [len(group["params"]) for group in groups]
    if saved_sizes != sizes:
        raise ValueError(f"state_dict param groups hold {saved_sizes} parameters, the optimizer's hold {sizes}")
    for index, (saved_group, group) in enumerate(zip(saved_groups, groups, strict=True)):
        _check_hyperparameters(f"state_dict['param_groups'][{index}]", saved_group, group, type(optimizer).__name__)
    params = [param for group in groups for param in group["params"]]
    saved_ids = [index for group in saved_groups for index in group["params"]]
    _check_param_states(state_dict["state"], dict(zip(saved_ids, params, strict=True)))


def _check_hyperparameters(where: str, saved: Mapping[str, Any], group: Mapping[str, Any], optimizer: str) -> None:
    """The group's numeric hyperparameters (``lr``, ``momentum``, ``betas``...) must be there, and finite.

    Flags (``foreach``, ``maximize``...) may be missing: torch fills those a
    state saved by an older release lacks. A missing number means another
    optimizer's state (AdamW's has no ``momentum`` for SGD to read).
    """
    numeric = [
        key for key, value in group.items() if not _scheduled_or_built(key) and _is_number(value, allow_nonfinite=True)
    ]
    missing = [key for key in numeric if key not in saved]
    if missing:
        raise ValueError(
            f"{where} lacks {missing}, which {optimizer} needs: the state comes from another optimizer "
            f"(its group holds {sorted(key for key in saved if key != 'params')})"
        )
    for key in numeric:
        if not _is_number(saved[key]):
            raise ValueError(f"{where}[{key!r}] must be a finite number, got {checks.describe(saved[key], 40)}")
    # Adam and AdamW hold the same keys: this flag, which a load would copy, is what tells their steps apart
    flag = "decoupled_weight_decay"
    if flag in saved and flag in group:
        if not isinstance(saved[flag], bool):
            raise ValueError(f"{where}[{flag!r}] must be True or False, got {checks.describe(saved[flag], 40)}")
        if saved[flag] != bool(group[flag]):
            kind = "with" if saved[flag] else "without"
            raise ValueError(
                f"{where} has {flag}={saved[flag]}, {optimizer}'s group {group[flag]}: the state is of an optimizer "
                f"{kind} decoupled weight decay (AdamW is Adam with it), and loading it would make this one step "
                "as that one; resume with the optimizer and setting that saved it"
            )


def lists_param_ids(group: Any) -> bool:
    """A saved param group with a list of parameter ids (ints), as ``Optimizer.state_dict()`` writes them."""
    if not isinstance(group, Mapping) or not isinstance(group.get("params"), (list, tuple)):
        return False
    return all(checks.is_int(index) for index in group["params"])


def _scheduled_or_built(key: str) -> bool:
    """Group entries a schedule (``initial_lr``, OneCycle's ``max_lr``...) or the build adds: not the optimizer's."""
    return key in ("params", "max_lr", "min_lr", MODEL_ORDER) or key.startswith("initial_")


def _is_number(value: Any, allow_nonfinite: bool = False) -> bool:
    """A real number, a tensor of them, or a tuple/list of them (``betas``); finite unless allowed otherwise."""
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_number(item, allow_nonfinite) for item in value)
    if isinstance(value, torch.Tensor):
        real = value.dtype != torch.bool and not value.dtype.is_complex
        return real and (allow_nonfinite or bool(torch.isfinite(value).all()))
    return checks.is_real(value) and (allow_nonfinite or math.isfinite(value))


_NON_NEGATIVE = ("lr", "weight_decay", "momentum", "dampening", "eps")


def check_hyperparameters(optimizer: torch.optim.Optimizer) -> None:
    """Raise unless every param group's numbers are finite, and its lr, weight decay, momentum... not negative.

    torch checks an optimizer's defaults, not the groups given their own
    values (``paramwise_cfg``'s ``custom_keys``), nor nan or inf.

    Examples:
        >>> param = torch.zeros(1, requires_grad=True)
        >>> groups = [{"params": [param], "lr": float("inf")}]
        >>> check_hyperparameters(torch.optim.SGD(groups, lr=0.1))
        Traceback (most recent call last):
        ...
        ValueError: SGD param group 0's 'lr' must be a finite number, got inf
    """
    name = type(optimizer).__name__
    for index, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key == "params" or not _is_number(value, allow_nonfinite=True):
                continue
            if not _is_number(value):
                raise ValueError(f"{name} param group {index}'s {key!r} must be a finite number, got {value!r}")
            if key in _NON_NEGATIVE and not isinstance(value, torch.Tensor) and value < 0:
                raise ValueError(f"{name} param group {index}'s {key!r} must be >= 0, got {value!r}")


def check_structure(current: Any, saved: Any, where: str, *, require_keys: bool = False) -> None:
    """Raise unless ``saved`` has the shape of ``current`` (a state dict the object gives now).

    Mappings are compared key by key (with ``require_keys``, every current key
    must be saved: some loaders need them all), lists and tuples by length,
    numbers must be numbers (not nan), tensors of the same shape and dtype.
    Keys only one side has are otherwise left alone: releases add and drop some.

    Examples:
        >>> reference = {"last_epoch": 3, "base_lrs": [0.1]}
        >>> check_structure(reference, {"last_epoch": 5, "base_lrs": []}, "scheduler")
        Traceback (most recent call last):
        ...
        ValueError: scheduler['base_lrs'] must be a list of 1, got [] of type list
    """
    if isinstance(current, Mapping):
        saved = checks.mapping(where, saved)
        missing = [key for key in current if key not in saved] if require_keys else []
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        for key in current.keys() & saved.keys():
            check_structure(current[key], saved[key], f"{where}[{key!r}]", require_keys=require_keys)
    elif isinstance(current, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(current):
            raise ValueError(f"{where} must be a list of {len(current)}, got {checks.describe(saved, 40)}")
        for index, (now, then) in enumerate(zip(current, saved, strict=True)):
            check_structure(now, then, f"{where}[{index}]", require_keys=require_keys)
    elif isinstance(current, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or (saved.shape, saved.dtype) != (current.shape, current.dtype):
            raise ValueError(f"{where} must be a {_dtype(current)} tensor of shape {tuple(current.shape)}")
    elif _is_number(current, allow_nonfinite=True) and not _is_number(saved, allow_nonfinite=True):
        raise ValueError(f"{where} must be a number, got {checks.describe(saved, 40)}")
    elif isinstance(saved, float) and math.isnan(saved):
        raise ValueError(f"{where} must be a number, got nan")


def _dtype(value: Any) -> str:
    return str(value.dtype).removeprefix("torch.") if isinstance(value, torch.Tensor) else type(value).__name__


def _check_param_states(states: Mapping[Any, Any], params: Mapping[Any, torch.Tensor]) -> None:
    """Each per-parameter state must belong to a parameter, and its element-wise buffers match its shape."""
    for index, state in states.items():
        if index not in params:
            raise ValueError(f"state_dict['state'] has an entry for parameter {index!r}, which no param group lists")
        if not isinstance(state, Mapping):
            raise ValueError(f"state_dict['state'][{index!r}] must be a dict, got {checks.describe(state)}")
        shape = params[index].shape
        for key, value in state.items():
            if key in _ELEMENTWISE_STATE and isinstance(value, torch.Tensor) and value.shape != shape:
                raise ValueError(
                    f"state_dict['state'][{index!r}][{key!r}] has shape {tuple(value.shape)}, the parameter "
                    f"has shape {tuple(shape)}: the optimizer state comes from another model"
                )
