"""``SchedulerHandler``: advance a schedule on applied updates only.

Accumulation micro-steps and skipped float16 steps do not move the schedule,
so the N-th applied update always uses the N-th value, and torch's warning
about ``lr_scheduler.step()`` before ``optimizer.step()`` cannot appear.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers.param_scheduler import ParamScheduler

from ..engine.events import OptimEvents
from ..engine.state import optim_state
from ..optim import checks

Scheduler = torch.optim.lr_scheduler.LRScheduler | ParamScheduler


class SchedulerHandler:
    """Step a torch ``lr_scheduler`` or an Ignite ``ParamScheduler`` after each applied update.

    The scheduler belongs to the wrapper whose optimizer it was built on (its
    ``optimizer`` is the wrapper, or the wrapper's ``optimizer``); with an
    ``OptimWrapperDict`` only that member's updates advance it.

    A torch scheduler is stepped after each applied update. An Ignite
    ``ParamScheduler`` also sets its first value when a fresh run starts, so
    the first update uses it. The handler registers on
    ``OPTIM_STEP_COMPLETED`` when the run starts, after the handlers attached
    before, so a logger at that event records the values the update used.

    Args:
        scheduler: A ``torch.optim.lr_scheduler.LRScheduler`` (built on
            ``wrapper.optimizer``) or an Ignite ``ParamScheduler`` (built on
            the wrapper or its optimizer). Add it to the checkpoint to resume.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from engine_opt import OptimWrapper, create_trainer
        >>> model = torch.nn.Linear(2, 1)
        >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1.0), accumulative_counts=2)
        >>> scheduler = torch.optim.lr_scheduler.StepLR(wrapper.optimizer, step_size=1, gamma=0.5)
        >>> trainer = create_trainer(model, wrapper, F.mse_loss)
        >>> SchedulerHandler(scheduler).attach(trainer)
        >>> _ = trainer.run([(torch.ones(2, 2), torch.zeros(2, 1))] * 6)   # 6 micro-steps, 3 updates
        >>> wrapper.get_lr()
        {'lr': [0.125]}
    """

    def __init__(self, scheduler: Scheduler) -> None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError(
                "ReduceLROnPlateau needs a metric: step it yourself from an evaluation handler "
                "(e.g. at Events.EPOCH_COMPLETED) rather than on every update"
            )
        if not isinstance(scheduler, (torch.optim.lr_scheduler.LRScheduler, ParamScheduler)):
            raise TypeError(
                "scheduler must be a torch.optim.lr_scheduler.LRScheduler or an Ignite ParamScheduler, "
                f"got {checks.describe(scheduler)}"
            )
        self.scheduler = scheduler
        self._target: Any = getattr(scheduler, "optimizer", None)
        self._registered: weakref.WeakSet[Engine] = weakref.WeakSet()

    def attach(self, engine: Engine) -> None:
        """Attach to a trainer built by ``create_trainer``."""
        if not engine.has_event_handler(self._started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self._started)

    def _started(self, engine: Engine) -> None:
        members = optim_state(engine).members
        if not any(self._target in (wrapper, wrapper.optimizer) for wrapper in members.values()):
            raise ValueError(
                f"the scheduler's optimizer is not driven by this trainer's wrapper(s) {list(members)}: "
                "build the scheduler on wrapper.optimizer (torch) or on the wrapper (Ignite)"
            )
        if isinstance(self.scheduler, ParamScheduler) and self.scheduler.event_index == 0:
            self.scheduler(engine)  # the first value, for the first update
        if engine not in self._registered:
            engine.add_event_handler(OptimEvents.OPTIM_STEP_COMPLETED, self._advance)
            self._registered.add(engine)

    def _advance(self, engine: Engine) -> None:
        _, wrapper = optim_state(engine).member()
        if self._target is not wrapper and self._target is not wrapper.optimizer:
            return
        if isinstance(self.scheduler, ParamScheduler):
            self.scheduler(engine)
        else:
            self.scheduler.step()
