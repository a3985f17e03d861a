"""``ParamScheduler``: the base of the schedulers, MMEngine's ``_ParamScheduler``: counting, chaining, state.

A scheduler sets ``param_name`` in every param group of the optimizer. Its
subclasses (``formulas``) compute the values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from .. import checks
from ..wrapper import OptimWrapper
from .mmengine_state import from_mmengine

INF = int(1e9)
"""MMEngine's default ``end``: a step never reached."""

Optimizer = OptimWrapper | torch.optim.Optimizer


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    if isinstance(optimizer, OptimWrapper):
        return optimizer.optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    raise TypeError(f"optimizer must be an OptimWrapper or a torch.optim.Optimizer, got {checks.describe(optimizer)}")


class ParamScheduler:
    """The base of the schedulers: MMEngine's ``_ParamScheduler``.

    A scheduler sets ``param_name`` in every param group of the optimizer.
    Building it records each group's value as ``initial_<param_name>`` (unless
    an earlier scheduler did), which is the base value, and takes the first
    step, which sets the value of step 0. Each later ``step()`` counts one
    step; while ``begin <= step < end`` it sets the next value, computed from
    the current one (so schedulers chain: one after another, or together).

    Subclasses set their own attributes, call ``super().__init__`` and then
    ``self._start()``; they compute values in ``_get_value``.

    Args:
        optimizer: An ``OptimWrapper`` (the usual target) or a torch optimizer.
        param_name: The param group key to schedule (``'lr'``, ``'momentum'``,
            ``'weight_decay'``...); fixed, and not given, for the ``*LR`` and
            ``*Momentum`` classes.
        begin: The first step the schedule sets a value at.
        end: The step it stops at (excluded); ``INF`` by default.
        by_epoch: Whether a step is an epoch (``True``, MMEngine's default)
            or an iteration, i.e. here an applied update.

    Raises:
        TypeError, ValueError: An argument of the wrong type or out of range
            (the message names it); nothing is changed.
    """

    fixed_param_name: ClassVar[str | None] = None
    """The parameter a ``*LR`` or ``*Momentum`` class schedules."""
    schedules_momentum: ClassVar[bool] = False
    """Whether this class schedules momentum, or ``betas[0]`` where the optimizer has no momentum."""
    epoch_args: ClassVar[tuple[str, ...]] = ()
    """Arguments counted in steps that ``build_iter_from_epoch`` multiplies by ``epoch_length``."""

    def __init__(
        self,
        optimizer: Optimizer,
        param_name: str | None = None,
        *,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
    ) -> None:
        name = type(self).__name__
        self.optimizer = optimizer
        self._optimizer = torch_optimizer(optimizer)
        defaults = self._optimizer.defaults
        if self.fixed_param_name is not None:
            if param_name is not None:
                raise TypeError(
                    f"{name} schedules {self.fixed_param_name!r} and takes no param_name, got {param_name!r}"
                )
            param_name = self.fixed_param_name
        elif not isinstance(param_name, str):
            raise TypeError(
                f"{name} needs param_name, a param group key such as 'lr', got {checks.describe(param_name)}"
            )
        self.use_betas = False
        if self.schedules_momentum and "momentum" not in defaults:
            if "betas" not in defaults:
                raise ValueError(
                    f"{name} needs an optimizer with momentum or betas; {type(self._optimizer).__name__} "
                    f"has neither (its defaults: {sorted(defaults)})"
                )
            self.use_betas = True
        self.param_name: str = param_name
        key = "betas" if self.use_betas else param_name
        for index, group in enumerate(self._groups):
            if key not in group:
                raise ValueError(
                    f"{name}: param_groups[{index}] has no {key!r} to schedule; it holds "
                    f"{sorted(k for k in group if k != 'params')}"
                )
            value = group[key][0] if self.use_betas else group[key]
            if not checks.is_real(value):
                raise TypeError(
                    f"{name}: param_groups[{index}][{key!r}] must be a Python number to schedule, "
                    f"got {checks.describe(value)}"
                )
        self.begin = checks.int_at_least(f"{name} begin", begin, 0)
        self.end = checks.int_at_least(f"{name} end", end, 1)
        if self.end <= self.begin:
            raise ValueError(f"{name} end must be larger than begin, got begin={begin!r}, end={end!r}")
        self.by_epoch = checks.flag(f"{name} by_epoch", by_epoch)
        self.last_step = -1
        self._global_step = -1
        self.base_values: list[Any] = []
        self._last_value: list[Any] = []

    @classmethod
    def build_iter_from_epoch(cls, optimizer: Optimizer, *, epoch_length: int, **kwargs: Any) -> ParamScheduler:
        """Build an iteration-based scheduler from an epoch-based config, as MMEngine does.

        ``begin``, ``end`` (unless ``INF``) and the class's ``epoch_args``
        (``step_size``, ``milestones``, ``T_max``, ``total_steps``,
        ``periods``) are multiplied by ``epoch_length``; ``begin`` and ``end``
        are then truncated to ints.

        Raises:
            ValueError: ``by_epoch=False`` given, or a bad ``epoch_length``.
        """
        epoch_length = checks.positive_int("epoch_length", epoch_length)
        if kwargs.get("by_epoch", True) is not True:
            raise ValueError(
                f"{cls.__name__}: only an epoch-based config (by_epoch=True) converts to iteration-based, "
                f"got by_epoch={kwargs['by_epoch']!r}"
            )
        kwargs["by_epoch"] = False
        begin = checks.real(f"{cls.__name__} begin", kwargs.get("begin", 0))
        kwargs["begin"] = int(begin * epoch_length)
        end = kwargs.get("end", INF)
        if end != INF:
            kwargs["end"] = int(checks.real(f"{cls.__name__} end", end) * epoch_length)
        for arg in cls.epoch_args:
            value = kwargs.get(arg)
            if isinstance(value, (list, tuple)):
                kwargs[arg] = [item * epoch_length for item in value]
            elif value is not None:
                kwargs[arg] = value * epoch_length
        return cls(optimizer, **kwargs)

    def _start(self) -> None:
        """Record the base values and take the first step (called last by each subclass's ``__init__``)."""
        if self.use_betas:
            for group in self._groups:
                group["momentum"] = group["betas"][0]
        self._prepare_groups()
        for group in self._groups:
            group.setdefault(f"initial_{self.param_name}", group[self.param_name])
        self.base_values = [group[f"initial_{self.param_name}"] for group in self._groups]
        self.step()

    @property
    def _groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups, read each time: loading its state replaces them."""
        return self._optimizer.param_groups

    def _prepare_groups(self) -> None:
        """Entries a subclass adds to the groups before the base values are read."""

    @property
    def global_step(self) -> int:
        """Steps taken since the first (0 after building, MMEngine's ``_global_step``)."""
        return self._global_step

    def _current(self) -> list[Any]:
        return [group[self.param_name] for group in self._groups]

    def _get_value(self) -> list[Any]:
        """The values of step ``last_step``, computed from the current ones."""
        raise NotImplementedError

    def step(self) -> None:
        """Count one step; inside ``[begin, end)``, set the next value in every group."""
        self._global_step += 1
        if self.begin <= self._global_step < self.end:
            self.last_step += 1
            for group, value in zip(self._groups, self._get_value(), strict=True):
                group[self.param_name] = value
        if self.use_betas:
            for group in self._groups:
                group["betas"] = (group["momentum"], group["betas"][1])
        self._last_value = self._current()

    def get_last_value(self) -> list[Any]:
        """The value of each param group after the last step."""
        return list(self._last_value)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's position: its counters and values, and what it schedules (to check a load).

        The config (``begin``, ``end``, ``gamma``...) is not saved: a resumed
        run uses its own.
        """
        return {
            "type": type(self).__name__,
            "param_name": self.param_name,
            "by_epoch": self.by_epoch,
            "last_step": self.last_step,
            "global_step": self._global_step,
            "base_values": list(self.base_values),
            "last_value": list(self._last_value),
        }

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise unless ``state_dict`` is this kind of scheduler's state; change nothing.

        Raises:
            TypeError, ValueError: Another scheduler's state, or a malformed one.
        """
        saved = self._in_own_form(checks.mapping("the saved scheduler state", state_dict))
        expected = self.state_dict()
        checks.known_keys("the saved scheduler state", saved, expected)
        missing = [key for key in expected if key not in saved]
        if missing:
            raise ValueError(f"the saved scheduler state lacks {missing}; got keys {sorted(saved)}")
        differ = [
            f"{key}: saved {saved[key]!r}, here {expected[key]!r}"
            for key in ("type", "param_name", "by_epoch")
            if saved[key] != expected[key]
        ]
        if differ:
            raise ValueError(f"the saved scheduler state is another scheduler's: {'; '.join(differ)}")
        for key in ("last_step", "global_step"):
            checks.int_at_least(f"the saved scheduler state's {key}", saved[key], -1)
        for key in ("base_values", "last_value"):
            values = saved[key]
            if not isinstance(values, list) or len(values) != len(self._groups):
                raise ValueError(
                    f"the saved scheduler state's {key} must be a list of {len(self._groups)} number(s) "
                    f"(one per param group), got {checks.describe(values)}"
                )
            for index, value in enumerate(values):
                checks.real(f"the saved scheduler state's {key}[{index}]", value)

    def _in_own_form(self, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        """``state_dict``, translated where it is an MMEngine scheduler's."""
        return from_mmengine(state_dict, type(self).__name__, self._groups)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a saved position (checked first), this module's or MMEngine's scheduler's state.

        The param groups' values come with the optimizer's state.
        """
        self.check_state_dict(state_dict)
        state_dict = self._in_own_form(state_dict)
        self.last_step = state_dict["last_step"]
        self._global_step = state_dict["global_step"]
        self.base_values = list(state_dict["base_values"])
        self._last_value = list(state_dict["last_value"])

    def __repr__(self) -> str:
        unit = "epoch" if self.by_epoch else "iter"
        end = "INF" if self.end == INF else self.end
        return f"{type(self).__name__}({self.param_name!r}, begin={self.begin}, end={end}, by {unit})"
