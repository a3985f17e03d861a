"""``OptimWrapperDict``: several named wrappers handled as one object.

It reads like a read-only mapping of names to wrappers, and saves, loads and
reports all of them at once. Updating is done on one member, since only the
caller knows which loss belongs to which optimizer.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> gen, disc = nn.Linear(1, 1), nn.Linear(1, 1)
    >>> wrappers = OptimWrapperDict(
    ...     gen=OptimWrapper(torch.optim.SGD(gen.parameters(), lr=0.01)),
    ...     disc=OptimWrapper(torch.optim.Adam(disc.parameters(), lr=0.001)))
    >>> wrappers.get_lr()
    {'gen.lr': [0.01], 'disc.lr': [0.001]}
    >>> list(wrappers), len(wrappers), "gen" in wrappers
    (['gen', 'disc'], 2, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import Any, NoReturn

from torch import nn

from . import checks
from .wrapper import OptimWrapper


def members(optim_wrapper: OptimWrapper | OptimWrapperDict) -> list[tuple[str | None, OptimWrapper]]:
    """``(name, wrapper)`` of every member; a single wrapper is the one member named ``None``.

    Every handler goes through this, so one name convention holds everywhere.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1)
        >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> [name for name, _ in members(wrapper)]
        [None]
        >>> [name for name, _ in members(OptimWrapperDict(gen=wrapper))]
        ['gen']
    """
    if isinstance(optim_wrapper, OptimWrapperDict):
        return list(optim_wrapper.items())
    return [(None, optim_wrapper)]


def _claim_parameters(name: str, wrapper: OptimWrapper, owners: dict[int, tuple[str, int]]) -> None:
    """Record ``wrapper``'s parameters as ``name``'s; refuse one that another member already updates."""
    params = [param for group in wrapper.param_groups for param in group["params"]]
    for index, param in enumerate(params):
        if id(param) in owners:
            other, other_index = owners[id(param)]
            raise ValueError(
                f"OptimWrapperDict members {other!r} and {name!r} both optimize one parameter (shape "
                f"{tuple(param.shape)}: parameter {other_index} of {other!r}, parameter {index} of {name!r}); "
                "each would step it with its own gradients and state: give each parameter to one member"
            )
        owners[id(param)] = (name, index)


def member_prefix(name: str | None) -> str:
    """``'{name}.'``, the prefix of a member's keys and tags (``''`` for a single wrapper).

    Examples:
        >>> member_prefix("gen"), member_prefix(None)
        ('gen.', '')
    """
    return "" if name is None else f"{name}."


def member_tag(name: str | None) -> str:
    """``'{name}/'``, the prefix of a member's tags in loggers, one level of TensorBoard's tree (``''`` alone).

    Examples:
        >>> member_tag("gen"), member_tag(None)
        ('gen/', '')
    """
    return "" if name is None else f"{name}/"


class OptimWrapperDict:
    """A read-only, ordered collection of named ``OptimWrapper`` objects.

    Deliberately not a ``collections.abc.Mapping`` subclass: Ignite's
    ``Checkpoint`` recurses into mappings, whereas this object must be saved
    and loaded as one through its own ``state_dict``/``load_state_dict``.

    Args:
        **optim_wrappers: The wrappers, by name.
    """

    def __init__(self, **optim_wrappers: OptimWrapper) -> None:
        if not optim_wrappers:
            raise ValueError("OptimWrapperDict needs at least one wrapper, e.g. OptimWrapperDict(gen=..., disc=...)")
        owners: dict[int, tuple[str, int]] = {}  # id of a wrapper or a parameter: its member (and position)
        for name, wrapper in optim_wrappers.items():
            if not isinstance(wrapper, OptimWrapper):
                raise TypeError(
                    f"OptimWrapperDict argument {name!r} must be an OptimWrapper, got {checks.describe(wrapper)}"
                )
            if id(wrapper) in owners:
                raise ValueError(f"OptimWrapperDict got one wrapper twice, as {owners[id(wrapper)][0]!r} and {name!r}")
            owners[id(wrapper)] = (name, -1)
            _claim_parameters(name, wrapper, owners)
        self.optim_wrappers: dict[str, OptimWrapper] = dict(optim_wrappers)
        self._open_member: str | None = None  # the member whose optim_context(member=...) is open

    # ------------------------------------------------------------------ mapping

    def __getitem__(self, name: str) -> OptimWrapper:
        try:
            return self.optim_wrappers[name]
        except KeyError:
            raise KeyError(f"no optimizer wrapper named {name!r}; known names: {list(self.optim_wrappers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.optim_wrappers)

    def __len__(self) -> int:
        return len(self.optim_wrappers)

    def __contains__(self, name: object) -> bool:
        return name in self.optim_wrappers

    def keys(self) -> KeysView[str]:
        """The names of the wrappers."""
        return self.optim_wrappers.keys()

    def values(self) -> ValuesView[OptimWrapper]:
        """The wrappers."""
        return self.optim_wrappers.values()

    def items(self) -> ItemsView[str, OptimWrapper]:
        """``(name, wrapper)`` pairs."""
        return self.optim_wrappers.items()

    # ------------------------------------------------------------------ all members

    def zero_grad(self, **kwargs: Any) -> None:
        """Run ``zero_grad(**kwargs)`` on every wrapper."""
        for wrapper in self.optim_wrappers.values():
            wrapper.zero_grad(**kwargs)

    def train(self) -> None:
        """Each member's ``train()`` (schedule-free optimizers' train mode)."""
        for wrapper in self.optim_wrappers.values():
            wrapper.train()

    def eval(self) -> None:
        """Each member's ``eval()`` (schedule-free optimizers' eval mode)."""
        for wrapper in self.optim_wrappers.values():
            wrapper.eval()

    def initialize_count_status(self, model: nn.Module, init_counts: int, max_counts: int) -> None:
        """Run ``initialize_count_status`` on every wrapper."""
        for wrapper in self.optim_wrappers.values():
            wrapper.initialize_count_status(model, init_counts, max_counts)

    @property
    def in_window(self) -> bool:
        """Whether any member is part-way through an accumulation window."""
        return any(wrapper.in_window for wrapper in self.optim_wrappers.values())

    @property
    def param_groups(self) -> dict[str, list[dict[str, Any]]]:
        """Each wrapper's live ``param_groups`` by name, as MMEngine's: ``{'gen': [...], 'disc': [...]}``.

        A dict, so the collection is no ``torch.optim.Optimizer``: build a
        scheduler on one member, ``optim_wrapper['gen']``.

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(1, 1)
            >>> gen = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
            >>> groups = OptimWrapperDict(gen=gen).param_groups
            >>> list(groups), groups["gen"] is gen.optimizer.param_groups
            (['gen'], True)
        """
        return {name: wrapper.param_groups for name, wrapper in self.optim_wrappers.items()}

    def get_lr(self) -> dict[str, list[Any]]:
        """Learning rates with the wrapper's name as prefix: ``{'gen.lr': [...], ...}``."""
        return {f"{name}.{key}": value for name, w in self.items() for key, value in w.get_lr().items()}

    def get_momentum(self) -> dict[str, list[Any]]:
        """Momentum with the wrapper's name as prefix: ``{'gen.momentum': [...], ...}``."""
        return {f"{name}.{key}": value for name, w in self.items() for key, value in w.get_momentum().items()}

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """``{name: wrapper.state_dict()}``."""
        return {name: wrapper.state_dict() for name, wrapper in self.optim_wrappers.items()}

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise unless ``state_dict`` has every member's name, and every member's state fits; change nothing.

        Raises:
            ValueError: Names are missing or extra, or a member's state does not fit.
        """
        state_dict = checks.mapping("state_dict", state_dict)
        missing = [name for name in self.optim_wrappers if name not in state_dict]
        extra = [name for name in state_dict if name not in self.optim_wrappers]
        if missing or extra:
            raise ValueError(
                f"state_dict names do not match OptimWrapperDict: missing {missing}, unexpected {extra}; "
                f"expected {list(self.optim_wrappers)}"
            )
        for name, wrapper in self.optim_wrappers.items():
            try:
                wrapper.check_state_dict(state_dict[name])
            except (TypeError, ValueError) as error:
                raise type(error)(f"state_dict[{name!r}]: {error}") from error

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load ``{name: wrapper_state}``; every member is checked before any is loaded.

        Raises:
            ValueError: Names are missing or extra, or a member's state does not fit.
        """
        self.check_state_dict(state_dict)
        for name, wrapper in self.optim_wrappers.items():
            wrapper.load_state_dict(state_dict[name])

    # ------------------------------------------------------------------ one member only

    def _one_member(self, method: str, hint: str = "") -> NoReturn:
        first = next(iter(self.optim_wrappers))
        raise NotImplementedError(
            f"OptimWrapperDict.{method}() is ambiguous: call it on one member, "
            f"e.g. optim_wrapper[{first!r}].{method}(...){' ' + hint if hint else ''}; "
            f"members: {list(self.optim_wrappers)}"
        )

    def update_params(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Not available on the dict: call ``update_params`` on one member."""
        self._one_member("update_params")

    def backward(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Not available on the dict: call ``backward`` on one member."""
        self._one_member("backward")

    def step(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Not available on the dict: call ``step`` on one member."""
        self._one_member("step")

    def optim_context(self, model: nn.Module, *, member: str | None = None) -> contextlib.AbstractContextManager[None]:
        """Context for one micro-step of ``member``: its own ``optim_context``, the other members frozen.

        Inside, ``self[member].optim_context(model)`` applies (autocast, DDP
        ``no_sync`` / FSDP2 gradient sync mid-window) and every parameter of
        the *other* members has ``requires_grad=False``, so the forward pass
        builds no gradient path to them: the backward that follows (in or
        after the block) adds nothing to their accumulation windows, as
        Lightning's ``toggle_optimizer`` does. On exit, however the block
        ends, each of those parameters gets back the flag it had on entry
        (one the user had frozen stays frozen). Only the optimizers'
        parameters are touched, so ``model`` may be the member's own network
        (or its DDP/FSDP2 wrapper). Without ``member`` it raises, as
        MMEngine's ``OptimWrapperDict.optim_context`` does.

        Under DDP, a module whose parameters are frozen this way must not run
        its forward through its ``DistributedDataParallel`` wrapper with
        gradient sync on (its reducer would wait for gradients that never
        come): call the bare module, as the GAN example does, or build that
        DDP with ``find_unused_parameters=True``; ``static_graph=True`` is
        wrong for it (the set of parameters used changes from pass to pass).
        Under FSDP2, which copies the flag to a parameter's gathered copy
        only when it gathers it, shard each network with an explicit
        ``fully_shard(..., reshard_after_forward=True)`` (a root module
        otherwise keeps its parameters gathered, with their old flags).

        Args:
            model: The module the member's forward runs through (DDP/FSDP2 wrapped or not).
            member: The name of the member that updates from this pass.

        Raises:
            NotImplementedError: ``member`` is not given.
            KeyError: ``member`` is not a member's name.
            RuntimeError: On entry, when an ``optim_context(member=...)`` of this dict is already open.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> gen, disc = nn.Linear(1, 1), nn.Linear(1, 1)
            >>> wrappers = OptimWrapperDict(
            ...     gen=OptimWrapper(torch.optim.SGD(gen.parameters(), lr=0.1)),
            ...     disc=OptimWrapper(torch.optim.SGD(disc.parameters(), lr=0.1)))
            >>> with wrappers.optim_context(gen, member="gen"):
            ...     loss = disc(gen(torch.ones(1, 1))).sum()
            >>> wrappers["gen"].update_params(loss)
            >>> applied = wrappers["gen"].applied_steps
            >>> disc.weight.grad is None, disc.weight.requires_grad, applied
            (True, True, 1)
        """
        if member is None:
            self._one_member("optim_context", hint="or pass member=NAME")
        if member not in self.optim_wrappers:
            raise KeyError(f"optim_context: member={member!r} is not a member; members: {list(self.optim_wrappers)}")
        return self._member_context(member, model)

    @contextlib.contextmanager
    def _member_context(self, member: str, model: nn.Module) -> Iterator[None]:
        if self._open_member is not None:
            raise RuntimeError(
                f"optim_context(member={member!r}) opened inside optim_context(member={self._open_member!r}) "
                "of the same OptimWrapperDict: close one member's context before opening another's"
            )
        frozen = [
            param
            for name, wrapper in self.optim_wrappers.items()
            if name != member
            for group in wrapper.param_groups
            for param in group["params"]
        ]
        flags = [param.requires_grad for param in frozen]
        self._open_member = member
        try:
            for param in frozen:
                param.requires_grad_(False)
            with self.optim_wrappers[member].optim_context(model):
                yield
        finally:
            for param, flag in zip(frozen, flags, strict=True):
                param.requires_grad_(flag)
            self._open_member = None

    def scale_loss(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Not available on the dict: call ``scale_loss`` on one member (each has its own window)."""
        self._one_member("scale_loss")

    def should_update(self) -> NoReturn:
        """Not available on the dict: ask one member."""
        self._one_member("should_update")

    def should_sync(self) -> NoReturn:
        """Not available on the dict: ask one member."""
        self._one_member("should_sync")

    def __repr__(self) -> str:
        members = "".join(f"  {name}: {wrapper!r}".replace("\n", "\n  ") + ",\n" for name, wrapper in self.items())
        return f"{type(self).__name__}(\n{members})"
