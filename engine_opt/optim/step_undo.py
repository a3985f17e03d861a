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

Example:
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
        optimizer: The optimizer about to step; its parameters with a gradient are saved, with their state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.state = state_holder(optimizer).state
        self.params: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.states: dict[torch.Tensor, dict[str, Any]] = {}  # each parameter's state entries, as before the step
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.params.append((param, param.detach().clone()))
                    self.states[param] = {key: _saved(value) for key, value in self.state.get(param, {}).items()}

    def where(self, flag: torch.Tensor) -> None:
        """After the step: put back every saved value where ``flag`` (a one-element bool tensor) is true."""
        with torch.no_grad():
            for param, before in self.params:
                param.copy_(torch.where(flag.to(param.device), before, param))
            on_host = [
                param for param, entries in self.states.items() if not self._undo_on_device(param, entries, flag)
            ]
        if on_host and bool(flag):  # rare: what the device cannot choose between
            for param in on_host:
                self._restore(param, self.states[param])

    def _undo_on_device(self, param: torch.Tensor, entries: dict[str, Any], flag: torch.Tensor) -> bool:
        """Choose ``param``'s state tensors on the device; False if anything is left for the host."""
        live = self.state.get(param, {})
        if live.keys() != entries.keys():  # the step created or removed state
            return False
        for key, (original, before) in entries.items():
            if before is None:
                return False
            after = live[key]
            if not isinstance(after, torch.Tensor) or after.shape != before.shape:
                return False
            chosen = torch.where(flag.to(after.device), before, after)
            if after is original:
                after.copy_(chosen)
            else:  # the step replaced the tensor
                live[key] = chosen
        return True

    def _restore(self, param: torch.Tensor, entries: dict[str, Any]) -> None:
        restored = {key: original if before is None else before for key, (original, before) in entries.items()}
        if restored:
            self.state[param] = restored
        else:
            self.state.pop(param, None)


def _saved(value: Any) -> tuple[Any, torch.Tensor | None]:
    """``(value, a clone of it)`` for a tensor; ``(a deep copy, None)`` for anything else (restored on the host)."""
    if isinstance(value, torch.Tensor):
        return value, value.detach().clone()
    return copy.deepcopy(value), None


__all__ = ["StepUndo"]
