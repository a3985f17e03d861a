"""Checks that a state dict fits a torch object, made before anything is loaded.

``load_state_dict`` of a torch optimizer or module changes the object as it
goes; these functions raise a ``ValueError``/``TypeError`` naming the
mismatch and change nothing, so an all-or-nothing load can ask every object
first.

Example:
    >>> import torch
    >>> small, wide = torch.nn.Linear(2, 1), torch.nn.Linear(3, 1)
    >>> check_module_state(small, wide.state_dict())
    Traceback (most recent call last):
    ...
    ValueError: shapes differ: weight: saved (1, 3), model (1, 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import checks

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
    if not isinstance(saved_groups, list) or not all(
        isinstance(group, Mapping) and "params" in group for group in saved_groups
    ):
        raise ValueError("state_dict['param_groups'] must be a list of dicts with a 'params' entry")
    if len(saved_groups) != len(groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param group(s), the optimizer has {len(groups)}")
    saved_sizes = [len(group["params"]) for group in saved_groups]
    sizes = [len(group["params"]) for group in groups]
    if saved_sizes != sizes:
        raise ValueError(f"state_dict param groups hold {saved_sizes} parameters, the optimizer's hold {sizes}")
    params = [param for group in groups for param in group["params"]]
    saved_ids = [index for group in saved_groups for index in group["params"]]
    _check_param_states(state_dict["state"], dict(zip(saved_ids, params, strict=True)))


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
