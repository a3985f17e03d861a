"""``RoutedOptimizer``: several optimizers over disjoint parameters, stepped as one optimizer.

Muon orthogonalises the updates of 2-D hidden weights and is meant for those
only; embeddings, heads, biases and norms go to AdamW. One wrapper drives both
as one update (one accumulation window, one grad scaler, one clip over every
parameter, one state dict) when its optimizer is a ``RoutedOptimizer``, which
``build_optim_wrapper`` makes from ``routes`` (see ``routes``).

The param groups are the members' own dicts, in member order (read anew each
time: a member's ``load_state_dict`` replaces its dicts), so a scheduler
on the wrapper sets every group's lr, and one on a member
(``wrapper.optimizer['muon']``) only that member's. The state dict is
torch's format over all members (indices counted across them), so it loads
into the same routing, as a plain optimizer's does.

Examples:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    >>> muon = torch.optim.Muon([model[0].weight], lr=0.02)
    >>> adamw = torch.optim.AdamW([model[0].bias, *model[1].parameters()], lr=1e-3)
    >>> optimizer = RoutedOptimizer({"muon": muon, "adamw": adamw})
    >>> tuple(len(group["params"]) for group in optimizer.param_groups)
    (1, 3)
    >>> model(torch.ones(2, 4)).sum().backward()
    >>> optimizer.step()
    >>> sorted(len(state) for state in optimizer.state.values())
    [1, 3, 3, 3]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch

from . import checks
from .closure import needs_closure
from .modes import has_modes
from .optimizer_view import OptimizerView


class RoutedState(MutableMapping[torch.Tensor, Any]):
    """The members' ``state`` dicts as one mapping: each parameter's entry is read and written in its member's.

    Args:
        owners: Each parameter's (by ``id``) member.
        states: Each member's ``state`` dict, as it is now (a member's ``load_state_dict`` replaces it:
            ``RoutedOptimizer.state`` makes a new view each time it is read).
    """

    def __init__(self, owners: Mapping[int, torch.optim.Optimizer], states: Mapping[torch.optim.Optimizer, Any]):
        self._owners = owners
        self.states = states

    def _state_of(self, param: torch.Tensor) -> Any:
        owner = self._owners.get(id(param))
        if owner is None:
            raise KeyError(param)
        return self.states[owner]

    def __getitem__(self, param: torch.Tensor) -> Any:
        return self._state_of(param)[param]

    def __setitem__(self, param: torch.Tensor, value: Any) -> None:
        self._state_of(param)[param] = value

    def __delitem__(self, param: torch.Tensor) -> None:
        del self._state_of(param)[param]

    def __contains__(self, param: object) -> bool:
        owner = self._owners.get(id(param))
        return owner is not None and param in self.states[owner]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for state in self.states.values():
            yield from state

    def __len__(self) -> int:
        return sum(len(state) for state in self.states.values())


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
            if not isinstance(name, str) or not name:
                raise TypeError(f"optimizers: a member's name must be a non-empty string, got {name!r}")
            if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(
                optimizer, (RoutedOptimizer, OptimizerView)
            ):
                raise TypeError(
                    f"optimizers[{name!r}] must be a torch.optim.Optimizer (not a wrapper, not a RoutedOptimizer), "
                    f"got {checks.describe(optimizer)}"
                )
            if needs_closure(optimizer) or has_modes(optimizer):
                raise ValueError(
                    f"optimizers[{name!r}]: {type(optimizer).__name__} "
                    + ("takes a closure in its step" if needs_closure(optimizer) else "has train and eval modes")
                    + ", which a routed update does not drive (it steps every member once from the gradients); "
                    "use it as the wrapper's only optimizer"
                )
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) in owners:
                        raise ValueError(f"optimizers[{name!r}] holds a parameter another member holds already")
                    owners[id(param)] = optimizer
        members = dict(optimizers)
        every = [
            param for optimizer in members.values() for group in optimizer.param_groups for param in group["params"]
        ]
        # torch's Optimizer set-up gives the hook tables and the step's hook calls; its groups and state are
        # then replaced by the members' own, so what changes one changes the other
        super().__init__([{"params": every}], {})
        self.optimizers = members
        self._owners = owners

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The members' param groups (their own dicts, as they are now: a member's load replaces them), in order."""
        members = self.__dict__.get("optimizers")
        if members is None:  # torch's set-up, before the members take its place
            return self.__dict__.setdefault("_setup_groups", [])  # type: ignore[no-any-return]
        return [group for optimizer in members.values() for group in optimizer.param_groups]

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        members = self.__dict__.get("optimizers")
        if members is None:
            self.__dict__["_setup_groups"] = groups
            return
        groups = list(groups)
        for optimizer in members.values():
            count = len(optimizer.param_groups)
            optimizer.param_groups, groups = groups[:count], groups[count:]

    @property  # type: ignore[override]
    def state(self) -> RoutedState:
        """The members' state as one mapping, keyed by parameter.

        Setting it sets the members': a ``RoutedState`` read earlier gives
        each member back the dict it had then (what code that sets an
        optimizer's state aside and back, as DCP's loaders do, relies on);
        another mapping is shared out to the members by parameter.
        """
        return RoutedState(self._owners, {optimizer: optimizer.state for optimizer in self.optimizers.values()})

    @state.setter
    def state(self, value: Mapping[torch.Tensor, Any]) -> None:
        if "optimizers" not in self.__dict__:  # torch's set-up gives its own: the members' take its place
            return
        if isinstance(value, RoutedState):
            for optimizer, state in value.states.items():
                optimizer.state = state
            return
        shares: dict[torch.optim.Optimizer, Any] = {
            optimizer: defaultdict(dict) for optimizer in self.optimizers.values()
        }
        for param, entry in value.items():
            owner = self._owners.get(id(param))
            if owner is None:
                raise KeyError("RoutedOptimizer.state: a state entry for a parameter no member holds")
            shares[owner][param] = entry
        for optimizer, state in shares.items():
            optimizer.state = state

    def __getstate__(self) -> dict[str, Any]:
        # all of it: torch's picks defaults, state and param_groups, and the members are what holds them
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # a copy's parameters are new objects: who owns which is counted again
        self._owners = {
            id(param): optimizer
            for optimizer in self.optimizers.values()
            for group in optimizer.param_groups
            for param in group["params"]
        }

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
        """Give each member its groups of ``state_dict``, in order, and the state of their parameters.

        As torch's ``load_state_dict``, a group's parameters are matched by
        position, whatever they are keyed by (indices; DCP's parameter names).
        The caller's dict is not modified.

        Raises:
            ValueError: ``state_dict`` has another number of param groups or parameters than the members.
        """
        checks.mapping("state_dict", state_dict)
        saved_groups, saved_state = list(state_dict["param_groups"]), state_dict["state"]
        sizes = [len(group["params"]) for group in self.param_groups]
        if [len(group["params"]) for group in saved_groups] != sizes:
            raise ValueError(
                f"state_dict's param groups hold {[len(group['params']) for group in saved_groups]} parameters, "
                f"the routed optimizers' {list(self.optimizers)} hold {sizes}"
            )
        shares = []
        for optimizer in self.optimizers.values():
            mine, saved_groups = (
                saved_groups[: len(optimizer.param_groups)],
                saved_groups[len(optimizer.param_groups) :],
            )
            keys = [key for group in mine for key in group["params"]]
            state = {key: saved_state[key] for key in keys if key in saved_state}
            shares.append((optimizer, {"state": state, "param_groups": mine}))
        for optimizer, share in shares:
            optimizer.load_state_dict(share)

    def __repr__(self) -> str:
        members = "".join(
            f"\n  {name}: " + repr(optimizer).replace("\n", "\n  ") for name, optimizer in self.optimizers.items()
        )
        return f"{type(self).__name__}({members}\n)"


__all__ = ["RoutedOptimizer", "RoutedState"]
