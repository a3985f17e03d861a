"""``StepUndo``: take back an optimizer step on the device where a flag says so, without reading the flag.

An optimizer cannot be told to skip its step by a tensor it does not read
(only the fused ones take a ``found_inf``). So the parameters the step will
change and their optimizer state are copied before it, and put back after it
with ``torch.where(flag, before, after)``: for a false flag the step stands,
for a true one it never happened, and the host waits for neither. What the
device cannot put back (state a step creates, values kept as Python numbers)
is handled on the host, the only case that reads the flag.

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

from typing import Any

import torch


class StepUndo:
    """The tensors one ``optimizer.step()`` changes, saved before it, to be put back after it where a flag is true.

    Args:
        optimizer: The optimizer about to step; its parameters with a gradient are saved, with their state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.fresh: list[torch.Tensor] = []  # parameters without optimizer state yet (the step may create it)
        self.host_values: list[tuple[dict[str, Any], str, Any]] = []  # state values that are not tensors
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._save(param)

    def _save(self, param: torch.Tensor) -> None:
        self.saved.append((param, param.detach().clone()))
        state = self.optimizer.state.get(param)
        if not state:
            self.fresh.append(param)
            return
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                self.saved.append((value, value.detach().clone()))
            else:
                self.host_values.append((state, key, value))

    def where(self, flag: torch.Tensor) -> None:
        """After the step: put every saved tensor back where ``flag`` (a one-element bool tensor) is true."""
        with torch.no_grad():
            for live, before in self.saved:
                live.copy_(torch.where(flag.to(live.device), before, live))
        created = [param for param in self.fresh if self.optimizer.state.get(param)]
        if (created or self.host_values) and bool(flag):  # rare: what the device cannot restore
            for param in created:
                self.optimizer.state.pop(param, None)
            for state, key, value in self.host_values:
                state[key] = value


__all__ = ["StepUndo"]
