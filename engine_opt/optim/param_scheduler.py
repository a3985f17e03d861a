"""MMEngine's parameter schedulers and its ``param_scheduler`` configs, without MMEngine.

``build_param_scheduler(optim_wrapper, cfg)`` turns MMEngine's ``param_scheduler``
config section (one dict, a list of dicts, or for an ``OptimWrapperDict`` a
dict of those keyed by member name) into scheduler objects that reproduce
MMEngine's formulas exactly: chainable, active while ``begin <= step < end``,
the first value set when built, one ``step()`` per iteration (``by_epoch=False``)
or per epoch (``by_epoch=True``). ``convert_to_iter_based=True`` turns an
epoch-based config into an iteration-based one with ``epoch_length``.

Here an iteration is an *applied optimizer update*: with
``accumulative_counts=4``, MMEngine's schedule advances once per four
micro-steps, and ``epoch_length`` counts applied updates per epoch.
``SchedulerHandler`` (``engine_opt.handlers``) steps these schedulers in a
trainer; in a loop of your own, call ``step()`` after each update (or epoch).

The momentum schedulers set ``momentum``, or for Adam-like optimizers
``betas[0]`` (through a ``momentum`` entry they add to each group, as MMEngine).

Example:
    >>> import torch
    >>> from engine_opt import OptimWrapper
    >>> wrapper = OptimWrapper(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
    >>> schedulers = build_param_scheduler(wrapper, [
    ...     dict(type="LinearLR", start_factor=0.25, begin=0, end=3, by_epoch=False),
    ...     dict(type="CosineAnnealingLR", T_max=4, begin=3, end=7, by_epoch=False)])
    >>> lrs, (group,) = [], wrapper.param_groups
    >>> for _ in range(7):
    ...     lrs.append(round(group["lr"], 4))   # the value this update uses
    ...     for scheduler in schedulers:                       # after the update
    ...         scheduler.step()
    >>> lrs
    [0.025, 0.0625, 0.1, 0.1, 0.0854, 0.05, 0.0146]
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from . import checks
from .paramwise import MODEL_ORDER
from .wrapper import OptimWrapper
from .wrapper_dict import OptimWrapperDict

INF = int(1e9)
"""MMEngine's default ``end``: a step never reached."""

Optimizer = OptimWrapper | torch.optim.Optimizer


def _real(name: str, value: Any) -> float:
    """``value`` if it is a finite real number (``bool`` refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {checks.describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an ``int`` of at least ``minimum`` (``bool`` refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {checks.describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {checks.describe(value)}")
    return value


def _fraction(name: str, value: Any, *, zero: bool = True) -> float:
    """A number in ``[0, 1]`` (``(0, 1]`` without ``zero``)."""
    number = _real(name, value)
    if not ((number >= 0 if zero else number > 0) and number <= 1):
        raise ValueError(f"{name} must be in {'[0' if zero else '(0'}, 1], got {number!r}")
    return number


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    if isinstance(optimizer, OptimWrapper):
        return optimizer.optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    raise TypeError(f"optimizer must be an OptimWrapper or a torch.optim.Optimizer, got {checks.describe(optimizer)}")


def _from_mmengine(scheduler: ParamScheduler, state: Mapping[str, Any]) -> Mapping[str, Any]:
    """An MMEngine scheduler's state (its attributes: ``_global_step``, ``_last_value``...) in this module's form.

    Its config entries (``begin``, ``end``, ``gamma``...) are left behind: the
    resumed run's own config applies, as for this module's states.
    """
    if "_global_step" not in state or "global_step" in state:
        return state
    keys = {"param_name": "param_name", "by_epoch": "by_epoch", "last_step": "last_step"}
    keys.update(global_step="_global_step", base_values="base_values", last_value="_last_value")
    converted = {ours: state[theirs] for ours, theirs in keys.items() if theirs in state}
    groups = scheduler._groups
    for key in ("base_values", "last_value"):
        if key in converted:
            converted[key] = _per_group(f"the saved scheduler state's {key}", converted[key], groups)
    return {"type": type(scheduler).__name__, **converted}


def _per_group(key: str, values: Any, groups: list[dict[str, Any]]) -> Any:
    """MMEngine's values of one group per parameter (and its base group last) for these groups, by ``model_order``.

    Returned as given where there is nothing to regroup (the check names a
    length that does not fit).
    """
    total = sum(len(group["params"]) for group in groups)
    if not isinstance(values, list) or not all(MODEL_ORDER in group for group in groups):
        return values
    if len(values) not in (total, total + 1):  # one per parameter, and MMEngine's base group (several groups)
        return values
    result = []
    for group in groups:
        order = group[MODEL_ORDER]
        differing = [position for position in order if values[position] != values[order[0]]]
        if differing:
            raise ValueError(
                f"{key} gives parameters {order[0]} and {differing[0]} (in model "
                f"order) different values, but they share a param group here ({group.get('name', 'unnamed')!r}), "
                "built from another paramwise_cfg than these values were written for"
            )
        result.append(values[order[0]])
    return result


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
        self._optimizer = _torch_optimizer(optimizer)
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
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"{name}: param_groups[{index}][{key!r}] must be a Python number to schedule, "
                    f"got {checks.describe(value)}"
                )
        self.begin = _int(f"{name} begin", begin, 0)
        self.end = _int(f"{name} end", end, 1)
        if self.end <= self.begin:
            raise ValueError(f"{name} end must be larger than begin, got begin={begin!r}, end={end!r}")
        self.by_epoch = _flag(f"{name} by_epoch", by_epoch)
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
        begin = _real(f"{cls.__name__} begin", kwargs.get("begin", 0))
        kwargs["begin"] = int(begin * epoch_length)
        end = kwargs.get("end", INF)
        if end != INF:
            kwargs["end"] = int(_real(f"{cls.__name__} end", end) * epoch_length)
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
        saved = _from_mmengine(self, checks.mapping("the saved scheduler state", state_dict))
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
            _int(f"the saved scheduler state's {key}", saved[key], -1)
        for key in ("base_values", "last_value"):
            values = saved[key]
            if not isinstance(values, list) or len(values) != len(self._groups):
                raise ValueError(
                    f"the saved scheduler state's {key} must be a list of {len(self._groups)} number(s) "
                    f"(one per param group), got {checks.describe(values)}"
                )
            for index, value in enumerate(values):
                _real(f"the saved scheduler state's {key}[{index}]", value)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a saved position (checked first), this module's or MMEngine's scheduler's state.

        The param groups' values come with the optimizer's state.
        """
        self.check_state_dict(state_dict)
        state_dict = _from_mmengine(self, state_dict)
        self.last_step = state_dict["last_step"]
        self._global_step = state_dict["global_step"]
        self.base_values = list(state_dict["base_values"])
        self._last_value = list(state_dict["last_value"])

    def __repr__(self) -> str:
        unit = "epoch" if self.by_epoch else "iter"
        end = "INF" if self.end == INF else self.end
        return f"{type(self).__name__}({self.param_name!r}, begin={self.begin}, end={end}, by {unit})"


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
        self.step_size = _int(f"{type(self).__name__} step_size", step_size, 1)
        self.gamma = _real(f"{type(self).__name__} gamma", gamma)
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
        self.milestones = Counter(_int(f"{name} milestones[{i}]", m, 0) for i, m in enumerate(milestones))
        self.gamma = _real(f"{name} gamma", gamma)
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
        self.gamma = _real(f"{type(self).__name__} gamma", gamma)
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
        self.eta_min = None if eta_min is None else _real(f"{name} eta_min", eta_min)
        self.eta_min_ratio = None if eta_min_ratio is None else _real(f"{name} eta_min_ratio", eta_min_ratio)
        self.T_max = (self.end - self.begin) if T_max is None else _int(f"{name} T_max", T_max, 1)
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
        self.eta_min = _real(f"{type(self).__name__} eta_min", eta_min)
        self.power = _real(f"{type(self).__name__} power", power)
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
            per_group: list[Any] = _per_group(f"{name} eta_max", list(eta_max), self._groups)
            if len(per_group) != len(self._groups):
                raise ValueError(
                    f"{name} eta_max must be a number or {len(self._groups)} numbers (one per param group), "
                    f"got {len(per_group)}"
                )
            self.max_values = [_real(f"{name} eta_max[{i}]", value) for i, value in enumerate(per_group)]
        else:
            self.max_values = [_real(f"{name} eta_max", eta_max)] * len(self._groups)
        self.div_factor = _real(f"{name} div_factor", div_factor)
        self.final_div_factor = _real(f"{name} final_div_factor", final_div_factor)
        if self.div_factor == 0 or self.final_div_factor == 0:
            raise ValueError(
                f"{name} div_factor and final_div_factor must not be 0, got {div_factor!r}, {final_div_factor!r}"
            )
        self.total_steps = (
            (self.end - self.begin) if total_steps is None else _int(f"{name} total_steps", total_steps, 1)
        )
        pct_start = _fraction(f"{name} pct_start", pct_start)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f"{name} anneal_strategy must be 'cos' or 'linear', got {checks.describe(anneal_strategy)}"
            )
        self.anneal_strategy = anneal_strategy
        self.three_phase = _flag(f"{name} three_phase", three_phase)
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
        self.eta_min = None if eta_min is None else _real(f"{name} eta_min", eta_min)
        self.eta_min_ratio = None if eta_min_ratio is None else _real(f"{name} eta_min_ratio", eta_min_ratio)
        for arg, value in (("periods", periods), ("restart_weights", restart_weights)):
            if not isinstance(value, (list, tuple)) or not value:
                raise TypeError(f"{name} {arg} must be a non-empty list, got {checks.describe(value)}")
        self.periods = [_int(f"{name} periods[{i}]", period, 1) for i, period in enumerate(periods)]
        self.restart_weights = [_real(f"{name} restart_weights[{i}]", w) for i, w in enumerate(restart_weights)]
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


# The learning-rate and momentum forms: the same formulas on a fixed parameter.


class StepLR(StepParamScheduler):
    """``StepParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class MultiStepLR(MultiStepParamScheduler):
    """``MultiStepParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class ConstantLR(ConstantParamScheduler):
    """``ConstantParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class ExponentialLR(ExponentialParamScheduler):
    """``ExponentialParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class CosineAnnealingLR(CosineAnnealingParamScheduler):
    """``CosineAnnealingParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class LinearLR(LinearParamScheduler):
    """``LinearParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class PolyLR(PolyParamScheduler):
    """``PolyParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class OneCycleLR(OneCycleParamScheduler):
    """``OneCycleParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class CosineRestartLR(CosineRestartParamScheduler):
    """``CosineRestartParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class StepMomentum(StepParamScheduler):
    """``StepParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class MultiStepMomentum(MultiStepParamScheduler):
    """``MultiStepParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class ConstantMomentum(ConstantParamScheduler):
    """``ConstantParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class ExponentialMomentum(ExponentialParamScheduler):
    """``ExponentialParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class CosineAnnealingMomentum(CosineAnnealingParamScheduler):
    """``CosineAnnealingParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class LinearMomentum(LinearParamScheduler):
    """``LinearParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class PolyMomentum(PolyParamScheduler):
    """``PolyParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class CosineRestartMomentum(CosineRestartParamScheduler):
    """``CosineRestartParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


SCHEDULERS: dict[str, type[ParamScheduler]] = {
    cls.__name__: cls
    for cls in (
        StepParamScheduler, MultiStepParamScheduler, ConstantParamScheduler, ExponentialParamScheduler,
        CosineAnnealingParamScheduler, LinearParamScheduler, PolyParamScheduler, OneCycleParamScheduler,
        CosineRestartParamScheduler,
        StepLR, MultiStepLR, ConstantLR, ExponentialLR, CosineAnnealingLR, LinearLR, PolyLR, OneCycleLR,
        CosineRestartLR,
        StepMomentum, MultiStepMomentum, ConstantMomentum, ExponentialMomentum, CosineAnnealingMomentum,
        LinearMomentum, PolyMomentum, CosineRestartMomentum,
    )
}  # fmt: skip
"""The ``type`` names ``build_param_scheduler`` accepts (MMEngine's registry names)."""

_METRIC_SCHEDULERS = ("ReduceOnPlateauParamScheduler", "ReduceOnPlateauLR", "ReduceOnPlateauMomentum")


def _scheduler_class(where: str, type_: Any) -> type[ParamScheduler]:
    if isinstance(type_, type) and issubclass(type_, ParamScheduler) and type_ is not ParamScheduler:
        return type_
    if isinstance(type_, str) and type_ in SCHEDULERS:
        return SCHEDULERS[type_]
    if type_ in _METRIC_SCHEDULERS:
        raise ValueError(
            f"{where}['type'] {type_!r} needs a validation metric, which a schedule of updates does not have: "
            "use torch's ReduceLROnPlateau from an evaluation handler"
        )
    raise ValueError(
        f"{where}['type'] must be one of {sorted(SCHEDULERS)} or a ParamScheduler subclass, "
        f"got {checks.describe(type_)}"
    )


def _accepted_args(cls: type[ParamScheduler]) -> list[str]:
    """The config keys ``cls`` takes: its keyword arguments, ``param_name`` unless fixed."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    names = [p.name for p in parameters if p.name not in ("self", "optimizer") and p.kind is not p.VAR_KEYWORD]
    if cls.fixed_param_name is not None:
        names.remove("param_name")
    return names


def _build_one(
    target: Optimizer,
    cfg: Any,
    where: str,
    epoch_length: int | None,
    max_epochs: int | None,
    max_iters: int | None,
) -> ParamScheduler:
    cfg = dict(checks.mapping(where, cfg))  # a copy: the caller's config is never changed
    if "type" not in cfg:
        raise ValueError(f"{where} needs a 'type', e.g. dict(type='LinearLR', end=5), got keys {sorted(cfg)}")
    cls = _scheduler_class(where, cfg.pop("type"))
    convert = _flag(f"{where}['convert_to_iter_based']", cfg.pop("convert_to_iter_based", False))
    checks.known_keys(f"{where} ({cls.__name__})", cfg, [*_accepted_args(cls), "type", "convert_to_iter_based"])
    by_epoch = _flag(f"{where}['by_epoch']", cfg.get("by_epoch", True))
    if "end" not in cfg:  # the run's length, as MMEngine's runner sets it
        if by_epoch and max_epochs is not None:
            cfg["end"] = max_epochs
        elif not by_epoch and max_iters is not None:
            cfg["end"] = max_iters
        elif not by_epoch and max_epochs is not None:
            if epoch_length is None:
                raise ValueError(
                    f"{where} is iteration-based (by_epoch=False) without an 'end': its default end is "
                    "max_epochs * epoch_length, which needs epoch_length (applied updates per epoch), got None"
                )
            cfg["end"] = max_epochs * epoch_length
    try:
        if convert:
            if not by_epoch:
                raise ValueError(
                    "convert_to_iter_based=True converts an epoch-based schedule, so by_epoch must be True, "
                    "got by_epoch=False"
                )
            if epoch_length is None:
                raise ValueError("convert_to_iter_based=True needs epoch_length (applied updates per epoch), got None")
            return cls.build_iter_from_epoch(target, epoch_length=epoch_length, **cfg)
        return cls(target, **cfg)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None


def _build_list(
    target: Optimizer,
    cfg: Any,
    where: str,
    epoch_length: int | None,
    max_epochs: int | None,
    max_iters: int | None,
) -> list[ParamScheduler]:
    if isinstance(cfg, Mapping):
        items: list[tuple[str, Any]] = [(where, cfg)]
    elif isinstance(cfg, (list, tuple)):
        items = [(f"{where}[{index}]", item) for index, item in enumerate(cfg)]
    else:
        raise TypeError(f"{where} must be a dict or a list of dicts, got {checks.describe(cfg)}")
    schedulers = []
    for item_where, item in items:
        if isinstance(item, ParamScheduler):
            if item.optimizer is not target:
                raise ValueError(f"{item_where} is a scheduler built on another optimizer than its wrapper's")
            schedulers.append(item)
        else:
            schedulers.append(_build_one(target, item, item_where, epoch_length, max_epochs, max_iters))
    return schedulers


def build_param_scheduler(
    optim_wrapper: OptimWrapper | OptimWrapperDict | torch.optim.Optimizer,
    cfg: Any,
    *,
    epoch_length: int | None = None,
    max_epochs: int | None = None,
    max_iters: int | None = None,
) -> list[ParamScheduler] | dict[str, list[ParamScheduler]]:
    """Build schedulers from MMEngine's ``param_scheduler`` config, as its runner does.

    Each config is built in order, so a chain (a warmup, then a decay) is
    built as MMEngine builds it. A config that fails leaves the param groups
    as they were.

    Args:
        optim_wrapper: The wrapper (or a torch optimizer), or an
            ``OptimWrapperDict``.
        cfg: One scheduler config, e.g. ``dict(type='CosineAnnealingLR',
            T_max=100, eta_min=1e-5, begin=0, end=100, by_epoch=True,
            convert_to_iter_based=False)``, or a list of them. With an
            ``OptimWrapperDict``, either that (every member gets its own
            schedulers from it) or a dict keyed by member names, each value a
            config or a list; a member left out gets none. Built schedulers
            may stand in for configs. ``cfg`` is not modified.
        epoch_length: Applied updates per epoch (with accumulation, batches
            per epoch / ``accumulative_counts``): needed by
            ``convert_to_iter_based=True``.
        max_epochs: The default ``end`` of an epoch-based config without one
            (and, times ``epoch_length``, of an iteration-based one).
        max_iters: The default ``end`` of an iteration-based config without
            one: applied updates in the run.

    Returns:
        The schedulers in config order, or for an ``OptimWrapperDict`` a
        dict of such lists keyed by member name.

    Raises:
        TypeError, ValueError: An unknown type, key or member name, a value
            of the wrong type or out of range, ``end <= begin``, a missing
            ``epoch_length``: the message names the config entry, the value
            received and what is accepted.

    Example:
        >>> import torch
        >>> from engine_opt import OptimWrapper
        >>> wrapper = OptimWrapper(torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1e-3))
        >>> for scheduler in build_param_scheduler(wrapper, [
        ...         dict(type="LinearLR", start_factor=0.1, end=500, by_epoch=False),
        ...         dict(type="CosineAnnealingLR", begin=1, convert_to_iter_based=True),
        ...         dict(type="CosineAnnealingMomentum", eta_min=0.85)], epoch_length=500, max_epochs=12):
        ...     print(scheduler)
        LinearLR('lr', begin=0, end=500, by iter)
        CosineAnnealingLR('lr', begin=500, end=6000, by iter)
        CosineAnnealingMomentum('momentum', begin=0, end=12, by epoch)
    """
    for name, value in (("epoch_length", epoch_length), ("max_epochs", max_epochs), ("max_iters", max_iters)):
        if value is not None:
            checks.positive_int(name, value)
    lengths = (epoch_length, max_epochs, max_iters)
    if isinstance(optim_wrapper, OptimWrapperDict):
        targets = list(optim_wrapper.items())
    elif isinstance(optim_wrapper, (OptimWrapper, torch.optim.Optimizer)):
        targets = []
    else:
        raise TypeError(
            "optim_wrapper must be an OptimWrapper, an OptimWrapperDict or a torch.optim.Optimizer, "
            f"got {checks.describe(optim_wrapper)}"
        )
    groups = [
        group
        for target in ([wrapper for _, wrapper in targets] if targets else [optim_wrapper])
        for group in _torch_optimizer(target).param_groups
    ]
    snapshot = [{key: value for key, value in group.items() if key != "params"} for group in groups]
    try:
        if not isinstance(optim_wrapper, OptimWrapperDict):
            if isinstance(cfg, Mapping) and "type" not in cfg:
                raise ValueError(
                    f"param_scheduler needs a 'type', e.g. dict(type='LinearLR', end=5), got keys {sorted(cfg)} "
                    "(a dict keyed by member names is for an OptimWrapperDict)"
                )
            return _build_list(optim_wrapper, cfg, "param_scheduler", *lengths)
        if isinstance(cfg, Mapping) and "type" not in cfg:
            unknown = [name for name in cfg if name not in optim_wrapper]
            if unknown:
                raise ValueError(
                    f"param_scheduler names member(s) {unknown}, which the OptimWrapperDict lacks; "
                    f"its members: {list(optim_wrapper)}"
                )
            return {
                name: _build_list(wrapper, cfg[name], f"param_scheduler[{name!r}]", *lengths) if name in cfg else []
                for name, wrapper in targets
            }
        return {name: _build_list(wrapper, cfg, "param_scheduler", *lengths) for name, wrapper in targets}
    except BaseException:
        for group, saved in zip(groups, snapshot, strict=True):
            for key in [key for key in group if key != "params" and key not in saved]:
                del group[key]
            group.update(saved)
        raise
