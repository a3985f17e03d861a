"""What both periodic checkpoints share: their arguments, the run directory held for the run, the saves' events.

``attach_checkpoint`` writes one file per save (``durable``),
``attach_sharded_checkpoint`` one ``torch.distributed.checkpoint`` directory
(``sharded``); both attach through ``attach_periodic``: the directory is
taken when the run starts (``DirectoryHold``), a save runs every ``every``
iterations (or each epoch) and at the run's end, and the directory is let go.
Schedule-free optimizers are saved in eval mode (``optimizers_with_modes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from ignite.engine import Engine, Events

from ..engine.trainer import Trainer
from ..optim import checks, distributed
from ..optim.modes import has_modes
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict, members
from .run_directory import RunDirectory, RunDirectoryBusy, RunDirectoryConflict


def optimizers_with_modes(to_save: Mapping[str, Any]) -> list[torch.optim.Optimizer]:
    """The schedule-free optimizers among ``to_save`` (plain, wrapped, members): saved in eval mode."""
    found: list[torch.optim.Optimizer] = []
    for obj in to_save.values():
        if isinstance(obj, (OptimWrapper, OptimWrapperDict)):
            found += [wrapper.optimizer for _, wrapper in members(obj)]
        elif isinstance(obj, torch.optim.Optimizer):
            found.append(obj)
    return [optimizer for optimizer in found if has_modes(optimizer)]


class PeriodicSave(Protocol):
    """A checkpoint that ``attach_periodic`` attaches: a save now, and the final save of a run."""

    def __call__(self, engine: Engine) -> None:
        """Save (at the period)."""

    def at_run_end(self, engine: Engine) -> None:
        """Save the final state, unless saved at this iteration already."""


def check_trainer(trainer: Any) -> Engine:
    """``trainer`` if it is an Ignite ``Engine``; a ``TypeError`` naming it otherwise."""
    if not isinstance(trainer, Engine):
        raise TypeError(
            f"trainer must be an Ignite Engine (what create_trainer returns), got {checks.describe(trainer)}"
        )
    return trainer


def check_period(trainer: Any, every: Any, n_saved: Any) -> None:
    """Check the arguments every periodic checkpoint takes (its ``dirname`` is checked after its own)."""
    check_trainer(trainer)
    if every is not None:
        checks.positive_int("every", every)
    if n_saved is not None:
        checks.positive_int("n_saved", n_saved)


def attach_periodic(trainer: Engine, save: PeriodicSave, directory: RunDirectory, every: int | None) -> None:
    """Hold ``directory`` for the run, ``save`` every ``every`` iterations (each epoch: ``None``) and at the end."""
    hold = DirectoryHold(directory)
    trainer.add_event_handler(Events.STARTED, hold.take)
    event = Events.EPOCH_COMPLETED if every is None else Events.ITERATION_COMPLETED(every=every)
    trainer.add_event_handler(event, save)
    trainer.add_event_handler(Events.COMPLETED, save.at_run_end)
    trainer.add_event_handler(Events.COMPLETED, hold.let_go)


class DirectoryHold:
    """The run's hold on its checkpoint directory: taken when it starts, let go when it ends.

    A ``Trainer`` lets it go when its run ends however it ends (an exception
    included); another ``Engine``, when it completes.
    """

    def __init__(self, directory: RunDirectory) -> None:
        self.directory = directory
        self.held = False

    def take(self, engine: Engine) -> None:
        """Take the directory on rank 0; every rank raises if it cannot (a collective call)."""
        refusal = self._refusal(engine.state.iteration) if distributed.rank() == 0 else None
        refusal = distributed.gather_objects(refusal)[0]  # rank 0's, on every rank
        if refusal is not None:
            raise refusal
        if self.held and isinstance(engine, Trainer):
            engine.call_at_run_end(self.let_go)

    def let_go(self, *_: Any) -> None:
        """Release the directory if this run holds it (once)."""
        if self.held:
            self.held = False
            self.directory.release()

    def _refusal(self, iteration: int) -> Exception | None:
        """Take the directory; the error that says why it cannot be (None: taken)."""
        directory = self.directory
        try:
            directory.acquire()
        except RunDirectoryBusy as error:
            return error
        except OSError as error:
            return OSError(str(error))
        self.held = True
        try:
            directory.prepare()
        except OSError as error:
            self.let_go()
            return OSError(str(error))
        impostors = directory.impostors()
        if impostors:
            self.let_go()
            return RunDirectoryConflict(
                f"{directory.path} holds entries named like this run's checkpoints that are none "
                f"({', '.join(impostors)}); a save of that name would fail or replace them: move them away"
            )
        later = [path.name for step, path in directory.checkpoints() if step > iteration]
        if later:
            self.let_go()
            return RunDirectoryConflict(
                f"{directory.path} holds checkpoints of later iterations than this run's {iteration} "
                f"({', '.join(later)}): resume from the newest (resume_from_latest), or save to another directory"
            )
        return None
