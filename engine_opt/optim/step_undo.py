"""``StepUndo``: take back an optimizer step on the device where a flag says so, without reading the flag.

An optimizer cannot be told to skip its step by a tensor it does not read
(only the fused ones take a ``found_inf``). So the parameters the step will
change and their optimizer state are copied before it, and put back after it
with ``torch.where(flag, before, after)``: for a false flag the step stands,
for a true one it never happened, and the host waits for neither. A state
tensor the step updated in place is written back in place; one it replaced
is replaced by the result. What the device cannot choose between (state the
step creates or removes, values that are not tensors, tensors nested in
containers) is put back on the host, the only case that reads the flag. A
``ZeroRedundancyOptimizer``'s state is its local optimizer's.

Examples:
    >>> import torch
    >>> param = torch.nn.Parameter(torch.ones(2))
    >>> optimizer = torch.optim.SGD([param], lr=0.5, momentum=0.9)
    >>> param.grad = torch.ones(2)
    >>> undo = StepUndo(optimizer)
    >>> optimizer.step()
    >>> undo.where(torch.tensor(True))
    >>> param.tolist(), optimizer.state[param]  # as if the step had not run
    ([1.0, 1.0], {})
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .distributed import state_holder


class StepUndo:
    """The tensors one ``optimizer.step()`` changes, saved before it, to be put back after it where a flag is true.

    Args:
        optimizer: The optimizer about to step; its parameters with a gradient are saved, with their state,
            and what its param groups hold besides the parameters (where schedule-free, Prodigy or
            D-Adaptation keep state).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        holder = state_holder(optimizer)
        self.state = holder.state
        self.groups = [
            (group, {key: _saved(value) for key, value in group.items() if key != "params"})
            for group in holder.param_groups
        ]
        self.params: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.states: dict[torch.Tensor, dict[str, Any]] = {}  # each parameter's state entries, as before the step
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.params.append((param, param.detach().clone()))
                # LBFGS keeps its whole state under its first parameter, which may have no gradient (frozen)
                if param.grad is not None or param in self.state:
                    self.states[param] = {key: _saved(value) for key, value in self.state.get(param, {}).items()}

    def where(self, flag: torch.Tensor) -> None:
        """After the step: put back every saved value where ``flag`` (a one-element bool tensor) is true."""
        flag = flag.reshape(())
        with torch.no_grad():
            for param, before in self.params:
                param.copy_(torch.where(flag.to(param.device), before, param))
            on_host = [
                entries for param, entries in self.states.items() if not _choose(self._live(param), entries, flag)
            ]
            on_host += [saved for group, saved in self.groups if not _choose(group, saved, flag, exact_keys=False)]
        if on_host and bool(flag):  # rare: what the device cannot choose between
            for param, entries in self.states.items():
                self._restore(param, entries)
            for group, saved in self.groups:
                group.update(_values(saved))

    def _live(self, param: torch.Tensor) -> dict[str, Any]:
        return self.state.get(param, {})  # type: ignore[no-any-return]

    def _restore(self, param: torch.Tensor, entries: dict[str, Any]) -> None:
        if entries:
            self.state[param] = _values(entries)
        else:
            self.state.pop(param, None)


def _choose(live: dict[str, Any], entries: dict[str, Any], flag: torch.Tensor, exact_keys: bool = True) -> bool:
    """Put back ``entries``' tensors in ``live`` on the device where ``flag``; False if any is left for the host."""
    if exact_keys and live.keys() != entries.keys():  # the step created or removed state
        return False
    for key, (original, before) in entries.items():
        after = live.get(key)
        if before is None:  # not a tensor: the host restores it, if the step changed it
            if not exact_keys and (after is original or _equal(after, original)):
                continue
            return False
        if not isinstance(after, torch.Tensor) or after.shape != before.shape or after.dtype != before.dtype:
            return False
        chosen = torch.where(flag.to(after.device), before, after)
        if after is original:
            after.copy_(chosen)
        else:  # the step replaced the tensor
            live[key] = chosen
    return True


def _equal(value: Any, other: Any) -> bool:
    try:
        return bool(value == other)
    except (RuntimeError, TypeError, ValueError):  # containers of tensors: compared no further
        return False


def _values(entries: dict[str, Any]) -> dict[str, Any]:
    """The saved values: a tensor's clone, anything else's deep copy."""
    return {key: original if before is None else before for key, (original, before) in entries.items()}


def _saved(value: Any) -> tuple[Any, torch.Tensor | None]:
    """``(value, a clone of it)`` for a tensor; ``(a deep copy, None)`` for anything else (restored on the host)."""
    if isinstance(value, torch.Tensor):
        return value, value.detach().clone()
    return copy.deepcopy(value), None


__all__ = ["StepUndo"]
