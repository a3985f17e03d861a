"""``RoutedOptimizer``: several optimizers over disjoint parameters, stepped as one optimizer.

Muon orthogonalises the updates of 2-D hidden weights and is meant for those
only; embeddings, heads, biases and norms go to AdamW. One wrapper drives both
as one update (one accumulation window, one grad scaler, one clip over every
parameter, one state dict) when its optimizer is a ``RoutedOptimizer``, which
``build_optim_wrapper`` makes from ``routes`` (see ``routes``).

The param groups are the members' own dicts, in member order, so a scheduler
on the wrapper sets every group's lr, and one on a member
(``wrapper.optimizer['muon']``) only that member's. The state dict is
torch's format over all members (indices counted across them), so it loads
into the same routing, as a plain optimizer's does.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    >>> muon = torch.optim.Muon([model[0].weight], lr=0.02)
    >>> adamw = torch.optim.AdamW([model[0].bias, *model[1].parameters()], lr=1e-3)
    >>> optimizer = RoutedOptimizer({"muon": muon, "adamw": adamw})
    >>> [len(group["params"]) for group in optimizer.param_groups]
    [1, 3]
    >>> model(torch.ones(2, 4)).sum().backward()
    >>> optimizer.step()
    >>> sorted(len(state) for state in optimizer.state.values())
    [1, 3, 3, 3]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import torch

from . import checks


class RoutedState(MutableMapping[torch.Tensor, Any]):
    """The members' ``state`` as one mapping: each parameter's entry is read and written in its member's."""

    def __init__(self, owners: Mapping[int, torch.optim.Optimizer], optimizers: Sequence[torch.optim.Optimizer]):
        self._owners = owners
        self._optimizers = optimizers

    def _state_of(self, param: torch.Tensor) -> Any:
        owner = self._owners.get(id(param))
        if owner is None:
            raise KeyError(param)
        return owner.state

    def __getitem__(self, param: torch.Tensor) -> Any:
        return self._state_of(param)[param]

    def __setitem__(self, param: torch.Tensor, value: Any) -> None:
        self._state_of(param)[param] = value

    def __delitem__(self, param: torch.Tensor) -> None:
        del self._state_of(param)[param]

    def __contains__(self, param: object) -> bool:
        owner = self._owners.get(id(param))
        return owner is not None and param in owner.state

    def __iter__(self) -> Iterator[torch.Tensor]:
        for optimizer in self._optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self._optimizers)


class RoutedOptimizer(torch.optim.Optimizer):
    """Optimizers over disjoint sets of parameters, stepped, zeroed, saved and loaded as one.

    Args:
        optimizers: The members by name (route names: ``'muon'``, ``'adamw'``),
            in the order they step. No parameter may be in two.

    Attributes:
        optimizers: The members by name; also ``routed[name]``.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        checks.mapping("optimizers", optimizers)
        if not optimizers:
            raise ValueError("optimizers must name at least one optimizer, got none")
        owners: dict[int, torch.optim.Optimizer] = {}
        for name, optimizer in optimizers.items():
            if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, RoutedOptimizer):
                raise TypeError(
                    f"optimizers[{name!r}] must be a torch.optim.Optimizer, got {checks.describe(optimizer)}"
                )
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) in owners:
                        raise ValueError(f"optimizers[{name!r}] holds a parameter another member holds already")
                    owners[id(param)] = optimizer
        members = dict(optimizers)
        groups = [group for optimizer in members.values() for group in optimizer.param_groups]
        # torch's Optimizer set-up gives the hook tables and the step's hook calls; its groups and state are
        # then replaced by the members' own, so what changes one changes the other
        super().__init__([{"params": [param for group in groups for param in group["params"]]}], {})
        self.optimizers = members
        self.param_groups = groups
        self.state = RoutedState(owners, list(members.values()))  # type: ignore[assignment]

    def __getitem__(self, name: str) -> torch.optim.Optimizer:
        return self.optimizers[name]

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """Step every member, in order. A closure is refused: each member would evaluate it again."""
        if closure is not None:
            raise TypeError("RoutedOptimizer.step takes no closure: its members step from the gradients they hold")
        for optimizer in self.optimizers.values():
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "optimizers"):  # after torch's set-up: a group must go to a member
            raise ValueError(
                "RoutedOptimizer.add_param_group: add the group to the member that is to optimize it, "
                "routed[name].add_param_group(...), and build the RoutedOptimizer again"
            )
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """torch's format over all members: their groups in order, parameters counted across them."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for optimizer in self.optimizers.values():
            saved = optimizer.state_dict()
            state.update({offset + index: entry for index, entry in saved["state"].items()})
            groups += [
                {**group, "params": [offset + index for index in group["params"]]} for group in saved["param_groups"]
            ]
            offset += sum(len(group["params"]) for group in optimizer.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Give each member its share of ``state_dict`` (what ``state_dict()`` returned; the caller's is not modified).

        Raises:
            ValueError: ``state_dict`` has another number of param groups or parameters than the members.
        """
        checks.mapping("state_dict", state_dict)
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, the routed optimizers "
                f"{list(self.optimizers)} have {len(self.param_groups)}"
            )
        shares = []
        offset = 0
        for optimizer in self.optimizers.values():
            count = len(optimizer.param_groups)
            mine, saved_groups = saved_groups[:count], saved_groups[count:]
            size = sum(len(group["params"]) for group in optimizer.param_groups)
            if [len(group["params"]) for group in mine] != [len(group["params"]) for group in optimizer.param_groups]:
                raise ValueError(
                    "state_dict's param groups hold other numbers of parameters than the routed optimizers'"
                )
            groups = [{**group, "params": [index - offset for index in group["params"]]} for group in mine]
            state = {
                index - offset: entry for index, entry in state_dict["state"].items() if offset <= index < offset + size
            }
            shares.append((optimizer, {"state": state, "param_groups": groups}))
            offset += size
        for optimizer, share in shares:
            optimizer.load_state_dict(share)

    def __repr__(self) -> str:
        members = "".join(
            f"\n  {name}: " + repr(optimizer).replace("\n", "\n  ") for name, optimizer in self.optimizers.items()
        )
        return f"{type(self).__name__}({members}\n)"


__all__ = ["RoutedOptimizer", "RoutedState"]
