"""``OptimState``: what a trainer tells its handlers about the optimizer side, typed.

A trainer built by ``create_trainer`` keeps one ``OptimState`` at
``engine.state.optim``: every member, and while an ``OptimEvents`` event is
handled, which member it is about. Its ``engine.state`` also counts the
optimizer events (``optim_backwards``, ``optim_steps``, ``optim_updates``,
``optim_skipped``), as sums of the wrappers' own counters.

Examples:
    >>> import torch
    >>> from engine_opt import OptimWrapper
    >>> model = torch.nn.Linear(1, 1)
    >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    >>> state = TrainerState(OptimState(members={None: wrapper}))
    >>> state.optim_updates, state.optim.name
    (0, None)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from ignite.engine import Engine, State

from ..optim import checks
from ..optim.hooks import StepEvent
from ..optim.wrapper import OptimWrapper


@dataclass
class OptimState:
    """The optimizer side of a trainer's state.

    Attributes:
        members: Every wrapper by name (``None`` for a single wrapper).
        name: The member whose event is being handled.
        wrapper: That member's wrapper (``None`` outside optimizer events).
        loss: At ``BACKWARD_COMPLETED``, the loss given to ``backward``; else ``None``.
        event: The wrapper step event being handled (``None`` outside optimizer events).
    """

    members: dict[str | None, OptimWrapper]
    name: str | None = None
    wrapper: OptimWrapper | None = None
    loss: torch.Tensor | None = field(default=None, repr=False)
    event: StepEvent | None = None

    def member(self) -> tuple[str | None, OptimWrapper]:
        """``(name, wrapper)`` of the event being handled.

        Raises:
            RuntimeError: When no optimizer event is being handled.
        """
        if self.wrapper is None:
            raise RuntimeError("no optimizer event is being handled: read the member from an OptimEvents handler")
        return self.name, self.wrapper


class TrainerState(State):
    """Ignite's ``State`` plus ``optim`` and the optimizer event counters, read from the wrappers."""

    def __init__(self, optim: OptimState) -> None:
        self.optim = optim  # before State.__init__, which reads the counters
        super().__init__()

    @property
    def optim_backwards(self) -> int:
        """Backward passes (micro-steps) of all members."""
        return sum(wrapper.inner_count for wrapper in self.optim.members.values())

    @property
    def optim_steps(self) -> int:
        """Windows that reached the optimizer step, applied or not (the one being stepped included)."""
        return sum(wrapper.step_count for wrapper in self.optim.members.values())

    @property
    def optim_updates(self) -> int:
        """Updates applied. Reading it waits for the device under a float16 scaler."""
        return sum(wrapper.applied_steps for wrapper in self.optim.members.values())

    @property
    def optim_skipped(self) -> int:
        """Updates skipped. Reading it waits for the device under a float16 scaler."""
        return sum(wrapper.skipped_steps for wrapper in self.optim.members.values())


def optim_state(engine: Engine) -> OptimState:
    """The ``OptimState`` of a trainer built by ``create_trainer``.

    Raises:
        TypeError: ``engine`` was not built by ``create_trainer``.
    """
    optim = getattr(engine.state, "optim", None)
    if not isinstance(optim, OptimState):
        raise TypeError(
            f"this handler needs a trainer built by engine_opt.create_trainer, got {checks.describe(engine)}"
        )
    return optim


def check_engine_state(engine: Engine, state_dict: Any) -> None:
    """Raise if ``engine.load_state_dict(state_dict)`` would refuse it or load nonsense; change nothing.

    The rules of Ignite's ``Engine.load_state_dict``, checked up front:
    ``epoch_length``, one of ``iteration``/``epoch``, one of
    ``max_epochs``/``max_iters``, the engine's ``state_dict_user_keys``;
    counts are ints, none negative, and the run's end is not behind its position.

    Examples:
        >>> saved = {"iteration": -1, "epoch_length": 4, "max_epochs": 2}
        >>> check_engine_state(Engine(lambda e, b: None), saved)
        Traceback (most recent call last):
        ...
        ValueError: the saved trainer state's 'iteration' must be an int >= 0, got -1
    """
    saved = checks.mapping("the saved trainer state", state_dict)
    where = "the saved trainer state"
    positions = [key for key in ("iteration", "epoch") if key in saved]
    ends = [key for key in ("max_epochs", "max_iters") if key in saved]
    missing = [key for key in ("epoch_length", *engine.state_dict_user_keys) if key not in saved]
    if len(positions) != 1 or len(ends) != 1 or missing:
        raise ValueError(
            f"{where} needs 'epoch_length', one of 'iteration'/'epoch' and one of 'max_epochs'/'max_iters'"
            f"{f' and the user keys {engine.state_dict_user_keys}' if engine.state_dict_user_keys else ''}; "
            f"got keys {sorted(saved)}"
        )
    position = _count(where, positions[0], saved[positions[0]], minimum=0)
    epoch_length = None if saved["epoch_length"] is None else _count(where, "epoch_length", saved["epoch_length"], 1)
    end = None if saved[ends[0]] is None else _count(where, ends[0], saved[ends[0]], minimum=1)
    if epoch_length is None and position > 0:  # Ignite derives the other count from it
        raise ValueError(f"{where} gives {positions[0]!r} {position} without an 'epoch_length'")
    if end is None:
        return
    iteration = position if positions[0] == "iteration" else position * (epoch_length or 0)
    epoch = position if positions[0] == "epoch" else iteration // epoch_length if epoch_length else 0
    done = epoch if ends[0] == "max_epochs" else iteration
    if end < done:
        raise ValueError(f"{where} has {ends[0]} = {end}, behind its position ({done})")


def _count(where: str, key: str, value: Any, minimum: int) -> int:
    if not checks.is_int(value) or value < minimum:
        got = value if isinstance(value, int) else checks.describe(value, 40)
        raise ValueError(f"{where}'s {key!r} must be an int >= {minimum}, got {got}")
    return value
