"""``SchedulerHandler``: advance a schedule on applied updates only.

Accumulation micro-steps and skipped float16 steps do not move the schedule,
so the N-th applied update always uses the N-th value, and torch's warning
about ``lr_scheduler.step()`` before ``optimizer.step()`` cannot appear.
MMEngine's ``param_scheduler`` schedulers (``build_param_scheduler``) with
``by_epoch=True`` advance once per trainer epoch instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers.param_scheduler import ParamScheduler

from ..engine.events import OptimEvents
from ..engine.state import optim_state
from ..optim import checks
from ..optim.schedulers import ParamScheduler as MMParamScheduler

Scheduler = torch.optim.lr_scheduler.LRScheduler | ParamScheduler | MMParamScheduler
Schedulers = Scheduler | Sequence[Scheduler] | Mapping[str, Sequence[Scheduler]]


class SchedulerHandler:
    """Step a torch ``lr_scheduler``, an Ignite ``ParamScheduler`` or MMEngine's schedulers after each applied update.

    Each scheduler belongs to the wrapper whose optimizer it was built on (its
    ``optimizer`` is the wrapper, or the wrapper's ``optimizer``); with an
    ``OptimWrapperDict`` only that member's updates advance it.

    A torch scheduler is stepped after each applied update. An Ignite
    ``ParamScheduler`` also sets its first value when a fresh run starts, so
    the first update uses it. The handler registers on
    ``OPTIM_STEP_COMPLETED`` when the run starts, after the handlers attached
    before, so a logger at that event records the values the update used.

    The schedulers of ``build_param_scheduler`` (MMEngine's
    ``param_scheduler`` configs) set their first value when built; an
    iteration-based one (``by_epoch=False``) is stepped after each applied
    update of its wrapper, an epoch-based one once per trainer epoch, whatever
    its wrapper did in it (MMEngine's order: after the epoch's updates). An
    epoch-based scheduler's steps are kept equal to the trainer's completed
    epochs: stepped at ``EPOCH_COMPLETED``, and at ``EPOCH_STARTED`` if a
    checkpoint saved at an epoch's end (by a handler that ran before this
    one, or at its last iteration) holds it one step behind, so a resumed run
    continues exactly whatever the order of the handlers. Build it before the
    trainer's first epoch and load its state when resuming; a count off by
    more than one is refused.

    Args:
        scheduler: A ``torch.optim.lr_scheduler.LRScheduler`` (built on
            ``wrapper.optimizer``), an Ignite ``ParamScheduler`` (built on
            the wrapper or its optimizer), an ``engine_opt.optim``
            ``ParamScheduler``, or a list of them, or a dict of lists as
            ``build_param_scheduler`` returns for an ``OptimWrapperDict``
            (stepped in list order). Add each scheduler to the checkpoint to
            resume.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from engine_opt import OptimWrapper, create_trainer
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> wrapper = OptimWrapper(optimizer, accumulative_counts=2)
        >>> from torch.optim.lr_scheduler import StepLR
        >>> scheduler = StepLR(optimizer, step_size=1, gamma=0.5)
        >>> trainer = create_trainer(model, wrapper, F.mse_loss)
        >>> SchedulerHandler(scheduler).attach(trainer)
        >>> batch = (torch.ones(2, 2), torch.zeros(2, 1))
        >>> _ = trainer.run([batch] * 6)  # 6 micro-steps, 3 updates
        >>> wrapper.get_lr()
        {'lr': [0.125]}

        MMEngine's configs, by update and by epoch:

        >>> from engine_opt.optim.schedulers import build_param_scheduler
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> wrapper = OptimWrapper(optimizer, accumulative_counts=2)
        >>> schedulers = build_param_scheduler(wrapper, [
        ...     # 2 updates of warmup
        ...     dict(type="LinearLR", start_factor=0.5, end=2, by_epoch=False),
        ...     # at the end of epoch 2
        ...     dict(type="MultiStepLR", milestones=[2], gamma=0.1)])
        >>> trainer = create_trainer(model, wrapper, F.mse_loss)
        >>> SchedulerHandler(schedulers).attach(trainer)
        >>> _ = trainer.run([batch] * 4, max_epochs=3)  # 2 updates an epoch
        >>> (group,) = wrapper.param_groups
        >>> round(group["lr"], 6)
        0.1
    """

    def __init__(self, scheduler: Schedulers) -> None:
        self.scheduler = scheduler
        self._schedulers = _flatten(scheduler)
        for item in self._schedulers:
            if isinstance(item, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise TypeError(
                    "ReduceLROnPlateau needs a metric: step it yourself from an evaluation handler "
                    "(e.g. at Events.EPOCH_COMPLETED) rather than on every update"
                )
            if not isinstance(item, (torch.optim.lr_scheduler.LRScheduler, ParamScheduler, MMParamScheduler)):
                raise TypeError(
                    "scheduler must be a torch.optim.lr_scheduler.LRScheduler or an Ignite ParamScheduler, "
                    "or an engine_opt ParamScheduler (build_param_scheduler), or a list of them, or a dict of "
                    f"such lists, got {checks.describe(item)}"
                )
        by_epoch = [isinstance(item, MMParamScheduler) and item.by_epoch for item in self._schedulers]
        self._per_epoch = [item for item, epochs in zip(self._schedulers, by_epoch, strict=True) if epochs]
        self._per_update = [item for item, epochs in zip(self._schedulers, by_epoch, strict=True) if not epochs]
        self._registered: weakref.WeakSet[Engine] = weakref.WeakSet()

    def attach(self, engine: Engine) -> None:
        """Attach to a trainer built by ``create_trainer``."""
        if not engine.has_event_handler(self._started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self._started)

    def _started(self, engine: Engine) -> None:
        members = optim_state(engine).members
        for item in self._schedulers:
            target = getattr(item, "optimizer", None)
            if not any(target in (wrapper, wrapper.optimizer) for wrapper in members.values()):
                raise ValueError(
                    f"the scheduler's optimizer is not driven by this trainer's wrapper(s) {list(members)}: "
                    "build the scheduler on wrapper.optimizer (torch) or on the wrapper (Ignite, "
                    "build_param_scheduler)"
                )
        for item in self._per_update:
            if isinstance(item, ParamScheduler) and item.event_index == 0:
                item(engine)  # the first value, for the first update
        if engine not in self._registered:
            if self._per_update:
                engine.add_event_handler(OptimEvents.OPTIM_STEP_COMPLETED, self._advance)
            if self._per_epoch:
                engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
                engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
            self._registered.add(engine)

    def _advance(self, engine: Engine) -> None:
        _, wrapper = optim_state(engine).member()
        for item in self._per_update:
            target = getattr(item, "optimizer", None)
            if target is not wrapper and target is not wrapper.optimizer:
                continue
            if isinstance(item, ParamScheduler):
                item(engine)
            else:
                item.step()

    def _epoch_started(self, engine: Engine) -> None:
        self._catch_up(engine.state.epoch - 1)

    def _epoch_completed(self, engine: Engine) -> None:
        self._catch_up(engine.state.epoch)

    def _catch_up(self, completed: int) -> None:
        """Step each epoch-based scheduler to ``completed`` epochs: one step at most, a larger gap refused."""
        for item in self._per_epoch:
            behind = completed - item.global_step
            if behind == 1:
                item.step()
            elif behind != 0:
                raise ValueError(
                    f"the epoch-based scheduler {item!r} has taken {item.global_step} epoch step(s) but the "
                    f"trainer has completed {completed} epoch(s): build it before the first epoch, and load "
                    "its state from the checkpoint when resuming"
                )


def _flatten(scheduler: Any) -> list[Any]:
    """The schedulers of one, a list, or a dict of lists (``build_param_scheduler``'s result), in order."""
    if isinstance(scheduler, Mapping):
        return [item for value in scheduler.values() for item in _flatten_list(value)]
    return _flatten_list(scheduler)


def _flatten_list(scheduler: Any) -> list[Any]:
    return list(scheduler) if isinstance(scheduler, (list, tuple)) else [scheduler]
