"""MMEngine's nine schedule formulas, each a ``ParamScheduler`` on any param group key.

Every formula computes the next value from the current one (so schedules
chain), exactly as MMEngine's class of the same name does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .. import checks
from .base import INF, Optimizer, ParamScheduler
from .mmengine_state import per_group


def _fraction(name: str, value: Any, *, zero: bool = True) -> float:
    """A number in ``[0, 1]`` (``(0, 1]`` without ``zero``)."""
    number = checks.real(name, value)
    if not ((number >= 0 if zero else number > 0) and number <= 1):
        raise ValueError(f"{name} must be in {'[0' if zero else '(0'}, 1], got {number!r}")
    return number


class StepParamScheduler(ParamScheduler):
    """Multiply the value by ``gamma`` every ``step_size`` steps (MMEngine's ``StepParamScheduler``)."""

    epoch_args = ("step_size",)

    def __init__(
        self,
        optimizer: Optimizer,
        param_name: str | None = None,
        *,
        step_size: int,
        gamma: float = 0.1,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
    ) -> None:
        super().__init__(optimizer, param_name, begin=begin, end=end, by_epoch=by_epoch)
        self.step_size = checks.int_at_least(f"{type(self).__name__} step_size", step_size, 1)
        self.gamma = checks.real(f"{type(self).__name__} gamma", gamma)
        self._start()

    def _get_value(self) -> list[Any]:
        if (self.last_step == 0) or (self.last_step % self.step_size != 0):
            return self._current()
        return [value * self.gamma for value in self._current()]


class MultiStepParamScheduler(ParamScheduler):
    """Multiply the value by ``gamma`` at each of ``milestones`` (MMEngine's ``MultiStepParamScheduler``)."""

    epoch_args = ("milestones",)

    def __init__(
        self,
        optimizer: Optimizer,
        param_name: str | None = None,
        *,
        milestones: Sequence[int],
        gamma: float = 0.1,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
    ) -> None:
        super().__init__(optimizer, param_name, begin=begin, end=end, by_epoch=by_epoch)
        name = type(self).__name__
        if not isinstance(milestones, (list, tuple)):
            raise TypeError(f"{name} milestones must be a list of ints, got {checks.describe(milestones)}")
        self.milestones = Counter(
            checks.int_at_least(f"{name} milestones[{i}]", m, 0) for i, m in enumerate(milestones)
        )
        self.gamma = checks.real(f"{name} gamma", gamma)
        self._start()

    def _get_value(self) -> list[Any]:
        if self.last_step not in self.milestones:
            return self._current()
        return [value * self.gamma ** self.milestones[self.last_step] for value in self._current()]


class ConstantParamScheduler(ParamScheduler):
    """Multiply the value by ``factor`` from ``begin`` until ``end`` (MMEngine's ``ConstantParamScheduler``)."""

    def __init__(
        self,
        optimizer: Optimizer,
        param_name: str | None = None,
        *,
        factor: float = 1.0 / 3,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
    ) -> None:
        super().__init__(optimizer, param_name, begin=begin, end=end, by_epoch=by_epoch)
        self.factor = _fraction(f"{type(self).__name__} factor", factor, zero=False)
        self.total_iters = self.end - self.begin - 1
        self._start()

    def _get_value(self) -> list[Any]:
        if self.last_step == 0:
            return [value * self.factor for value in self._current()]
        if self.last_step != self.total_iters:
            return self._current()
        return [value * (1.0 / self.factor) for value in self._current()]


class ExponentialParamScheduler(ParamScheduler):
    """Multiply the value by ``gamma`` every step (MMEngine's ``ExponentialParamScheduler``)."""

    def __init__(
        self,
        optimizer: Optimizer,
        param_name: str | None = None,
        *,
        gamma: float,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
    ) -> None:
        super().__init__(optimizer, param_name, begin=begin, end=end, by_epoch=by_epoch)
        self.gamma = checks.real(f"{type(self).__name__} gamma", gamma)
        self._start()

    def _get_value(self) -> list[Any]:
        if self.last_step == 0:
            return self._current()
        return [value * self.gamma for value in self._current()]


class CosineAnnealingParamScheduler(ParamScheduler):
    """Cosine annealing from the base value to ``eta_min`` over ``T_max`` steps (default ``end - begin``).

    MMEngine's ``CosineAnnealingParamScheduler``; give ``eta_min`` (default
    0) or ``eta_min_ratio`` (a fraction of each group's base value).
    """

    epoch_args = ("T_max",)

    def __init__(
        self,
        optimizer: Optimizer,
        param_name: str | None = None,
        *,
        T_max: int | None = None,
        eta_min: float | None = None,
        eta_min_ratio: float | None = None,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
    ) -> None:
        super().__init__(optimizer, param_name, begin=begin, end=end, by_epoch=by_epoch)
        name = type(self).__name__
        if eta_min is not None and eta_min_ratio is not None:
            raise ValueError(f"{name} takes eta_min or eta_min_ratio, not both; got {eta_min!r} and {eta_min_ratio!r}")
        if eta_min is None and eta_min_ratio is None:
            eta_min = 0.0
        self.eta_min = None if eta_min is None else checks.real(f"{name} eta_min", eta_min)
        self.eta_min_ratio = None if eta_min_ratio is None else checks.real(f"{name} eta_min_ratio", eta_min_ratio)
        self.T_max = (self.end - self.begin) if T_max is None else checks.int_at_least(f"{name} T_max", T_max, 1)
        self._start()

    def _eta_min(self, base_value: Any) -> Any:
        return self.eta_min if self.eta_min_ratio is None else base_value * self.eta_min_ratio

    def _get_value(self) -> list[Any]:
        if self.last_step == 0:
            return self._current()
        if (self.last_step - 1 - self.T_max) % (2 * self.T_max) == 0:
            return [
                value + (base - self._eta_min(base)) * (1 - math.cos(math.pi / self.T_max)) / 2
                for base, value in zip(self.base_values, self._current(), strict=True)
            ]
        return [
            (1 + math.cos(math.pi * self.last_step / self.T_max))
            / (1 + math.cos(math.pi * (self.last_step - 1) / self.T_max))
            * (value - self._eta_min(base))
            + self._eta_min(base)
            for base, value in zip(self.base_values, self._current(), strict=True)
        ]


class LinearParamScheduler(ParamScheduler):
    """Multiply the base value by a factor going linearly from ``start_factor`` to ``end_factor`` at ``end - 1``.

    MMEngine's ``LinearParamScheduler`` (the usual warmup).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        param_name: str | None = None,
        *,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
    ) -> None:
        super().__init__(optimizer, param_name, begin=begin, end=end, by_epoch=by_epoch)
        self.start_factor = _fraction(f"{type(self).__name__} start_factor", start_factor, zero=False)
        self.end_factor = _fraction(f"{type(self).__name__} end_factor", end_factor)
        self.total_iters = self.end - self.begin - 1
        self._start()

    def _get_value(self) -> list[Any]:
        if self.last_step == 0:
            return [value * self.start_factor for value in self._current()]
        return [
            value
            * (
                1.0
                + (self.end_factor - self.start_factor)
                / (self.total_iters * self.start_factor + (self.last_step - 1) * (self.end_factor - self.start_factor))
            )
            for value in self._current()
        ]


class PolyParamScheduler(ParamScheduler):
    """Polynomial decay to ``eta_min`` at ``end - 1`` (MMEngine's ``PolyParamScheduler``)."""

    def __init__(
        self,
        optimizer: Optimizer,
        param_name: str | None = None,
        *,
        eta_min: float = 0,
        power: float = 1.0,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
    ) -> None:
        super().__init__(optimizer, param_name, begin=begin, end=end, by_epoch=by_epoch)
        self.eta_min = checks.real(f"{type(self).__name__} eta_min", eta_min)
        self.power = checks.real(f"{type(self).__name__} power", power)
        self.total_iters = self.end - self.begin - 1
        self._start()

    def _get_value(self) -> list[Any]:
        if self.last_step == 0:
            return self._current()
        return [
            (value - self.eta_min) * (1 - 1 / (self.total_iters - self.last_step + 1)) ** self.power + self.eta_min
            for value in self._current()
        ]


class OneCycleParamScheduler(ParamScheduler):
    """The 1cycle policy over ``total_steps`` (default ``end - begin``); not chainable.

    MMEngine's ``OneCycleParamScheduler``: from ``eta_max / div_factor`` up to
    ``eta_max`` over ``pct_start`` of the cycle, then down to
    ``eta_max / div_factor / final_div_factor`` (``three_phase``: back to the
    start first). Learning rate only. It writes ``initial_lr``, ``max_lr``
    and ``min_lr`` into each group.
    """

    epoch_args = ("total_steps",)

    def __init__(
        self,
        optimizer: Optimizer,
        param_name: str | None = None,
        *,
        eta_max: float | Sequence[float] = 0,
        total_steps: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
    ) -> None:
        super().__init__(optimizer, param_name, begin=begin, end=end, by_epoch=by_epoch)
        name = type(self).__name__
        if self.param_name != "lr":
            raise ValueError(f"{name} schedules the learning rate only: param_name must be 'lr', got {param_name!r}")
        if isinstance(eta_max, (list, tuple)):  # one per group, or per parameter as MMEngine's groups
            values: list[Any] = per_group(f"{name} eta_max", list(eta_max), self._groups)
            if len(values) != len(self._groups):
                raise ValueError(
                    f"{name} eta_max must be a number or {len(self._groups)} numbers (one per param group), "
                    f"got {len(values)}"
                )
            self.max_values = [checks.real(f"{name} eta_max[{i}]", value) for i, value in enumerate(values)]
        else:
            self.max_values = [checks.real(f"{name} eta_max", eta_max)] * len(self._groups)
        self.div_factor = checks.real(f"{name} div_factor", div_factor)
        self.final_div_factor = checks.real(f"{name} final_div_factor", final_div_factor)
        if self.div_factor == 0 or self.final_div_factor == 0:
            raise ValueError(
                f"{name} div_factor and final_div_factor must not be 0, got {div_factor!r}, {final_div_factor!r}"
            )
        self.total_steps = (
            (self.end - self.begin)
            if total_steps is None
            else checks.int_at_least(f"{name} total_steps", total_steps, 1)
        )
        pct_start = _fraction(f"{name} pct_start", pct_start)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f"{name} anneal_strategy must be 'cos' or 'linear', got {checks.describe(anneal_strategy)}"
            )
        self.anneal_strategy = anneal_strategy
        self.three_phase = checks.flag(f"{name} three_phase", three_phase)
        if self.three_phase:
            self._phases: list[tuple[float, str, str]] = [
                (float(pct_start * self.total_steps) - 1, "initial_lr", "max_lr"),
                (float(2 * pct_start * self.total_steps) - 2, "max_lr", "initial_lr"),
                (self.total_steps - 1, "initial_lr", "min_lr"),
            ]
        else:
            self._phases = [
                (float(pct_start * self.total_steps) - 1, "initial_lr", "max_lr"),
                (self.total_steps - 1, "max_lr", "min_lr"),
            ]
        starts = [0.0] + [end_step for end_step, _, _ in self._phases[:-1]]
        if any(end_step == start for (end_step, _, _), start in zip(self._phases, starts, strict=True)):
            raise ValueError(
                f"{name} pct_start={pct_start!r} with total_steps={self.total_steps} makes a phase of no steps, "
                "where MMEngine divides by zero: pct_start * total_steps must not be 1 (nor pct_start 1)"
            )
        self._start()

    def _prepare_groups(self) -> None:
        for group, max_value in zip(self._groups, self.max_values, strict=True):
            group["initial_lr"] = max_value / self.div_factor
            group["max_lr"] = max_value
            group["min_lr"] = group["initial_lr"] / self.final_div_factor

    def _anneal(self, start: Any, end: Any, pct: float) -> Any:
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def _get_value(self) -> list[Any]:
        step = self.last_step
        if step > self.total_steps:
            raise ValueError(
                f"{type(self).__name__} was stepped {step + 1} times, past its total_steps={self.total_steps}: "
                "raise total_steps or set end"
            )
        values = []
        for group in self._groups:
            start_step: float = 0
            for index, (end_step, start_key, end_key) in enumerate(self._phases):
                if step <= end_step or index == len(self._phases) - 1:
                    pct = (step - start_step) / (end_step - start_step)
                    values.append(self._anneal(group[start_key], group[end_key], pct))
                    break
                start_step = end_step
        return values


class CosineRestartParamScheduler(ParamScheduler):
    """Cosine annealing restarted after each of ``periods``, at ``restart_weights`` of the base value.

    MMEngine's ``CosineRestartParamScheduler``; give ``eta_min`` or ``eta_min_ratio``.
    """

    epoch_args = ("periods",)

    def __init__(
        self,
        optimizer: Optimizer,
        param_name: str | None = None,
        *,
        periods: Sequence[int],
        restart_weights: Sequence[float] = (1,),
        eta_min: float | None = None,
        eta_min_ratio: float | None = None,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
    ) -> None:
        super().__init__(optimizer, param_name, begin=begin, end=end, by_epoch=by_epoch)
        name = type(self).__name__
        if (eta_min is None) == (eta_min_ratio is None):
            raise ValueError(f"{name} takes one of eta_min and eta_min_ratio, got {eta_min!r} and {eta_min_ratio!r}")
        self.eta_min = None if eta_min is None else checks.real(f"{name} eta_min", eta_min)
        self.eta_min_ratio = None if eta_min_ratio is None else checks.real(f"{name} eta_min_ratio", eta_min_ratio)
        for arg, value in (("periods", periods), ("restart_weights", restart_weights)):
            if not isinstance(value, (list, tuple)) or not value:
                raise TypeError(f"{name} {arg} must be a non-empty list, got {checks.describe(value)}")
        self.periods = [checks.int_at_least(f"{name} periods[{i}]", period, 1) for i, period in enumerate(periods)]
        self.restart_weights = [checks.real(f"{name} restart_weights[{i}]", w) for i, w in enumerate(restart_weights)]
        if len(self.periods) != len(self.restart_weights):
            raise ValueError(
                f"{name} periods and restart_weights must have one length, got {len(self.periods)} "
                f"and {len(self.restart_weights)}"
            )
        self.cumulative_periods = [sum(self.periods[0 : i + 1]) for i in range(len(self.periods))]
        self._start()

    def _get_value(self) -> list[Any]:
        index = next((i for i, period in enumerate(self.cumulative_periods) if self.last_step < period), None)
        if index is None:
            return self._current()
        weight = self.restart_weights[index]
        nearest_restart = 0 if index == 0 else self.cumulative_periods[index - 1]
        period = self.periods[index]
        step = self.last_step - nearest_restart
        values = []
        for base, value in zip(self.base_values, self._current(), strict=True):
            eta_max = base * weight
            eta_min = self.eta_min if self.eta_min_ratio is None else base * self.eta_min_ratio
            if step == 0:
                values.append(eta_max)
            else:
                values.append(
                    (1 + math.cos(math.pi * step / period))
                    / (1 + math.cos(math.pi * (step - 1) / period))
                    * (value - eta_min)
                    + eta_min
                )
        return values
