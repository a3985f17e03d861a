"""A wrapper's saved state: its counters, and the open accumulation window's gradients and item count.

``OptimWrapper.state_dict()`` is the optimizer's state dict (its keys at the
top level, so it also loads into a plain optimizer) plus these entries:

============================== ===============================================================
``'counters'``                 ``inner_count``, ``max_counts``, ``steps``, ``skipped_steps``,
                               ``accumulative_counts`` (``COUNTER_KEYS``)
``'optimizer_type'``           the optimizer's class name (``'AdamW'``): a state loads into that
                               optimizer's wrapper only
``'accumulated_grads'``        mid-window, one process: the gradients summed so far, one per
                               parameter in group order (``None`` for a parameter without one)
``'rank_accumulated_grads'``   mid-window, several processes: each rank's such list
``'accumulated_items'``        mid-window with ``num_items``: the items counted so far
``'rank_accumulated_items'``   the same, several processes: each rank's count
============================== ===============================================================

The last four are the window's entries (``WINDOW_KEYS``). This module writes,
checks and reads them: the wrapper calls it, and so does anything that takes
a wrapper's state apart (``SpikeGuard``'s rollback loads an earlier
snapshot's optimizer with the counts and the window of now, ``at_position``).

Examples:
    >>> import torch
    >>> param = torch.nn.Parameter(torch.ones(2))
    >>> counters = {"inner_count": 1, "accumulative_counts": 2}
    >>> state = {"counters": counters, **window_entries([torch.ones(2)], None)}
    >>> check(state, [param], accumulative_counts=2)
    >>> sorted(window_of(state)), saved_grads(state)
    (['accumulated_grads'], [tensor([1., 1.])])
    >>> check(state, [param], accumulative_counts=4)  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    ValueError: state_dict was saved mid-window with accumulative_counts=2,
    this wrapper has 4: ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import checks, distributed
from .routed import RoutedOptimizer
from .sharded_muon import ShardedMuon

COUNTER_KEYS = ("inner_count", "max_counts", "steps", "skipped_steps", "accumulative_counts")
"""The keys of ``state_dict['counters']``."""
WINDOW_KEYS = ("accumulated_grads", "accumulated_items", "rank_accumulated_grads", "rank_accumulated_items")
"""The entries a state saved part-way through an accumulation window has (some of them)."""


def window_entries(grads: list[torch.Tensor | None], items: int | None) -> dict[str, Any]:
    """The window's entries of a state saved now: its gradients summed so far and, with ``num_items``, its items.

    In a distributed run each rank's, gathered to every rank (a collective
    call: every rank must make it), since the window's gradients are not yet
    reduced.
    """
    if distributed.world_size() == 1:
        entries: dict[str, Any] = {"accumulated_grads": grads}
        if items is not None:
            entries["accumulated_items"] = items
        return entries
    cpu_grads = [None if grad is None else grad.cpu() for grad in grads]
    gathered = distributed.gather_objects((cpu_grads, items))
    entries = {"rank_accumulated_grads": [rank_grads for rank_grads, _ in gathered]}
    if items is not None:
        entries["rank_accumulated_items"] = [rank_items for _, rank_items in gathered]
    return entries


def window_of(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The window's entries of ``state_dict`` (``{}`` for a state saved between windows)."""
    return {key: state_dict[key] for key in WINDOW_KEYS if key in state_dict}


def at_position(earlier: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer of ``earlier`` (a state saved before) at the position of ``now`` (the state saved now).

    The optimizer's state and param groups are ``earlier``'s; the counters
    (micro-steps, steps, skipped steps, run length) and the open window are
    ``now``'s: what a rollback loads, so that the counts go on. A copy:
    neither argument is changed.

    Examples:
        >>> earlier = {"state": {}, "param_groups": [],
        ...            "counters": {"inner_count": 4, "steps": 2},
        ...            "accumulated_grads": [None]}
        >>> now = {"state": {}, "param_groups": [],
        ...        "counters": {"inner_count": 9, "steps": 7}}
        >>> at_position(earlier, now)
        {'state': {}, 'param_groups': [], 'counters': {'inner_count': 9, 'steps': 7}}
    """
    moved = {key: value for key, value in earlier.items() if key not in WINDOW_KEYS}
    moved["counters"] = dict(now.get("counters", {}))
    moved.update(window_of(now))
    return moved


def saved_grads(state_dict: Mapping[str, Any]) -> list[torch.Tensor | None] | None:
    """The gradients summed so far in the saved window, for this rank (``None`` between windows).

    Saved by as many processes: this rank's. Saved by another number: the
    mean of the saved ranks' sums, on every rank, since DDP and FSDP2
    average the ranks' gradients when the window ends (and the rest of the
    window's global batches average alike at any number of processes).
    """
    by_rank = state_dict.get("rank_accumulated_grads")
    if by_rank is None:
        grads: list[torch.Tensor | None] | None = state_dict.get("accumulated_grads")
        return grads
    if len(by_rank) == distributed.world_size():
        own: list[torch.Tensor | None] = by_rank[distributed.rank()]
        return own
    return [_mean([grads[index] for grads in by_rank]) for index in range(len(by_rank[0]))]


def _mean(grads: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The mean of the ranks' sums of one parameter (a rank without a gradient summed zero).

    Summed in the gradients' dtype, at least float32's precision.
    """
    present = [grad for grad in grads if grad is not None]
    if not present:
        return None
    dtype = present[0].dtype
    total = torch.stack(present).to(torch.promote_types(dtype, torch.float32)).sum(0)
    return total.div(len(grads)).to(dtype)


def saved_items(state_dict: Mapping[str, Any]) -> int | None:
    """The items counted so far in the saved window (``num_items``), this rank's in a distributed run."""
    by_rank = state_dict.get("rank_accumulated_items")
    return state_dict.get("accumulated_items") if by_rank is None else by_rank[distributed.rank()]


def optimizer_type(optimizer: torch.optim.Optimizer) -> str:
    """What ``'optimizer_type'`` records: the optimizer's class name (a ``ZeroRedundancyOptimizer``'s inner one's).

    A ``RoutedOptimizer``'s names its members: ``'RoutedOptimizer(muon=Muon, default=AdamW)'``; a
    ``ShardedMuon``'s is ``'Muon'``, whose state it keeps (so either resumes the other).
    """
    holder = distributed.state_holder(optimizer)
    if isinstance(holder, RoutedOptimizer):
        members = ", ".join(f"{name}={optimizer_type(member)}" for name, member in holder.optimizers.items())
        return f"{type(holder).__name__}({members})"
    return "Muon" if isinstance(holder, ShardedMuon) else type(holder).__name__


def check_optimizer_type(state_dict: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Raise a ``ValueError`` if ``state_dict`` is the state of another class of optimizer than ``optimizer``.

    A state without ``'optimizer_type'`` (a plain optimizer's, an earlier
    release's) passes: its param groups are checked instead.

    Examples:
        >>> import torch
        >>> adam = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        >>> check_optimizer_type({"optimizer_type": "AdamW"}, adam)
        Traceback (most recent call last):
        ...
        ValueError: state_dict is the state of the optimizer AdamW, this wrapper's ...
    """
    saved, current = state_dict.get("optimizer_type"), optimizer_type(optimizer)
    if saved is not None and not isinstance(saved, str):
        raise TypeError(f"state_dict['optimizer_type'] must be a class name (a str), got {checks.describe(saved, 40)}")
    if saved is not None and saved != current:
        raise ValueError(
            f"state_dict is the state of the optimizer {saved!s:.80}, this wrapper's is {current}: one optimizer's "
            f"state would step another wrongly; resume it with {saved!s:.80}, or start anew"
        )


def check(state_dict: Mapping[str, Any], params: Sequence[torch.Tensor], accumulative_counts: int) -> None:
    """Raise ``ValueError``/``TypeError`` unless the counters and window of ``state_dict`` fit; change nothing.

    Args:
        state_dict: A wrapper's state dict (its optimizer part is checked elsewhere).
        params: The wrapper's parameters, in group order.
        accumulative_counts: The wrapper's window size: a window saved with
            another size was divided by it, and is refused.
    """
    if "counters" in state_dict:
        check_counters(checks.mapping("state_dict['counters']", state_dict["counters"]))
    _check_grads_by_rank(state_dict, params, accumulative_counts)
    _check_items(state_dict)


def check_counters(counters: Mapping[str, Any]) -> None:
    """Ints that a run could have reached: none negative, no more skipped steps than steps.

    Examples:
        >>> check_counters({"steps": 2, "skipped_steps": 3})
        Traceback (most recent call last):
        ...
        ValueError: state_dict['counters'] has more skipped steps (3) than steps (2)
    """
    checks.known_keys("state_dict['counters']", counters, COUNTER_KEYS)
    for key, value in counters.items():
        if not checks.is_int(value):
            raise TypeError(f"state_dict['counters'][{key!r}] must be an int, got {value!r}")
        minimum = 1 if key in ("max_counts", "accumulative_counts") else 0
        if value < minimum and not (key == "max_counts" and value == -1):
            accepted = "-1 (unknown) or >= 1" if key == "max_counts" else f">= {minimum}"
            raise ValueError(f"state_dict['counters'][{key!r}] must be {accepted}, got {value}")
    if counters.get("skipped_steps", 0) > counters.get("steps", counters.get("skipped_steps", 0)):
        raise ValueError(
            f"state_dict['counters'] has more skipped steps ({counters['skipped_steps']}) than steps "
            f"({counters['steps']})"
        )


def _check_grads_by_rank(state_dict: Mapping[str, Any], params: Sequence[torch.Tensor], window: int) -> None:
    by_rank = state_dict.get("rank_accumulated_grads")
    if by_rank is not None and (not isinstance(by_rank, list) or not by_rank):
        raise ValueError(
            f"state_dict['rank_accumulated_grads'] must be a list of each rank's gradients, got "
            f"{checks.describe(by_rank)}"
        )
    if "accumulated_grads" not in state_dict and by_rank is None:
        return
    world = distributed.world_size()
    saved_world = 1 if by_rank is None else len(by_rank)
    if saved_world != world and ("accumulated_items" in state_dict or "rank_accumulated_items" in state_dict):
        raise ValueError(
            f"state_dict was saved mid-window with num_items by a run of {saved_world} process(es), this run "
            f"has {world}: the window's item counts belong to the ranks that saved them; resume it with as "
            "many processes, or from a checkpoint between windows"
        )
    saved_window = state_dict.get("counters", {}).get("accumulative_counts", window)
    if saved_window != window:
        raise ValueError(
            f"state_dict was saved mid-window with accumulative_counts={saved_window}, this wrapper has "
            f"{window}: the window's gradients were divided by the other size; resume with "
            "the same accumulation, or from a checkpoint between windows"
        )
    if by_rank is None:
        _check_grads("state_dict['accumulated_grads']", state_dict.get("accumulated_grads"), params)
    for rank, grads in enumerate(by_rank or []):
        _check_grads(f"state_dict['rank_accumulated_grads'][{rank}]", grads, params)


def _check_grads(where: str, grads: Any, params: Sequence[torch.Tensor]) -> None:
    if not isinstance(grads, list) or len(grads) != len(params):
        raise ValueError(
            f"{where} must be a list with a tensor (or None) for each of the {len(params)} parameters, got "
            f"{checks.describe(grads)}"
        )
    for index, (grad, param) in enumerate(zip(grads, params, strict=True)):
        if grad is not None and (not isinstance(grad, torch.Tensor) or grad.shape != param.shape):
            shape = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
            raise ValueError(f"{where}[{index}] has shape {shape}, the parameter has shape {tuple(param.shape)}")
        if grad is not None and not (grad.is_complex() if param.is_complex() else grad.is_floating_point()):
            raise ValueError(
                f"{where}[{index}] is a {grad.dtype} tensor, the parameter a {param.dtype} one: gradients are "
                "floating-point (complex for a complex parameter)"
            )


def _check_items(state_dict: Mapping[str, Any]) -> None:
    """A window's item count (``num_items``) is saved mid-window only, beside its gradients."""
    for key, grads_key in (
        ("accumulated_items", "accumulated_grads"),
        ("rank_accumulated_items", "rank_accumulated_grads"),
    ):
        if key in state_dict and grads_key not in state_dict:
            raise ValueError(f"state_dict[{key!r}] is saved mid-window only, beside {grads_key!r}, which it lacks")
    by_rank = state_dict.get("rank_accumulated_items")
    if by_rank is not None:
        world = distributed.world_size()
        if not isinstance(by_rank, list) or len(by_rank) != world:
            raise ValueError(f"state_dict['rank_accumulated_items'] must be a list of {world} positive ints")
        for index, items in enumerate(by_rank):
            _check_item_count(f"state_dict['rank_accumulated_items'][{index}]", items)
    elif "accumulated_items" in state_dict:
        _check_item_count("state_dict['accumulated_items']", state_dict["accumulated_items"])


def _check_item_count(key: str, value: Any) -> None:
    """A saved item count: a positive int."""
    if not checks.is_int(value) or value <= 0:
        raise ValueError(f"{key} must be a positive int (the items counted so far in the window), got {value!r}")
