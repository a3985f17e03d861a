"""Periodic checkpoints with Ignite's ``Checkpoint``, and resuming from the newest one.

``attach_checkpoint`` saves ``to_save`` periodically and at the end of the run;
``resume_from_latest`` loads the newest checkpoint of a directory into the same
objects (all of them or none, see ``load_checkpoint``). With a
``ResumableLoader`` among them, a run resumed mid-epoch, in a new process,
continues exactly::

    data = ResumableLoader(DataLoader(dataset, batch_size=32, shuffle=True))
    to_save = {"model": model, "optim_wrapper": wrapper, "trainer": trainer, "data": data}
    resume_from_latest(to_save, "checkpoints")          # None on a fresh start
    attach_checkpoint(trainer, to_save, "checkpoints", every=100)
    trainer.run(data, max_epochs=10)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from torch import nn

from ..engine.checkpoint_files import load_checkpoint, write_checkpoint
from ..engine.run_directory import RunDirectory, RunDirectoryBusy, checkpoint_name
from ..engine.sharded_files import load_sharded_checkpoint
from ..engine.trainer import Trainer
from ..optim import checks, distributed


class DurableCheckpoint(Checkpoint):
    """Ignite's ``Checkpoint`` whose files appear whole, and whose rotation deletes only after a save is durable.

    Ignite's own rotation removes the oldest file before it writes the new one
    (with ``n_saved=1`` a crash while saving leaves no checkpoint at all);
    here Ignite keeps every name and the saver writes first
    (``write_checkpoint``), then removes the run's files beyond ``n_saved``.

    Args:
        to_save: Objects with ``state_dict``/``load_state_dict``, by name.
        directory: Where the files go.
        n_saved: How many checkpoints to keep (``None``: all).
    """

    def __init__(self, to_save: Mapping[str, Any], directory: RunDirectory, n_saved: int | None) -> None:
        super().__init__(
            dict(to_save),
            _DurableSaver(directory, n_saved),
            n_saved=None,
            global_step_transform=lambda engine, _: engine.state.iteration,
            filename_pattern="checkpoint_{global_step}.{ext}",  # Ignite would name a lone object's file after it
        )
        self.directory = directory

    @property
    def last_checkpoint(self) -> Path | None:
        """The path of the newest file this checkpoint wrote, or None."""
        name = super().last_checkpoint
        return None if name is None else self.directory.path / str(name)


class _DurableSaver(BaseSaveHandler):
    """Write durably on rank 0, then rotate the run's own files."""

    def __init__(self, directory: RunDirectory, n_saved: int | None) -> None:
        self.directory = directory
        self.n_saved = n_saved

    def __call__(self, checkpoint: Mapping[str, Any], filename: str, metadata: Mapping[str, Any] | None = None) -> None:
        if distributed.rank() != 0:
            return
        write_checkpoint(checkpoint, self.directory.path / filename)
        self.directory.rotate(self.n_saved)

    def remove(self, filename: str) -> None:
        if distributed.rank() == 0:
            (self.directory.path / filename).unlink(missing_ok=True)


def attach_checkpoint(
    trainer: Engine,
    to_save: Mapping[str, Any],
    dirname: str | Path,
    *,
    every: int | None = None,
    n_saved: int | None = 2,
) -> DurableCheckpoint:
    """Save ``to_save`` every ``every`` iterations (or each epoch), and when the run ends.

    Files are ``checkpoint_{iteration}.pt`` in ``dirname``. Each is written
    to a partial file, flushed, ``fsync``-ed and renamed, and only then are
    the run's files beyond the newest ``n_saved`` removed (those of earlier
    processes of the run included): a process killed at any moment leaves a
    loadable newest checkpoint. Other files in ``dirname`` are never touched.

    When the run starts, the directory is created and checked writable, its
    lock is taken (a second run there, in another process, is refused with
    ``RunDirectoryBusy`` naming the holder; the lock goes when the run
    completes or its process ends), partial files of interrupted saves are
    removed, and a run that starts behind the newest file there is refused
    with a ``ValueError`` (its files would rank below another run's). In a
    distributed run rank 0 does all of that and writes the files; every rank
    must attach it, since saving gathers state from all ranks, and every rank
    raises the same error.

    Args:
        trainer: The trainer.
        to_save: Objects with ``state_dict``/``load_state_dict``, by name;
            include the trainer, and the ``ResumableLoader`` for exact resume.
        dirname: Directory for the files (created if missing).
        every: Save period in iterations; ``None`` saves at each epoch's end.
        n_saved: How many checkpoints to keep (``None``: all).

    Returns:
        The attached ``DurableCheckpoint`` (an Ignite ``Checkpoint``).

    Raises:
        ValueError: A model of ``to_save`` is sharded (FSDP2): use ``attach_sharded_checkpoint``.
    """
    check_trainer(trainer)
    if every is not None:
        checks.positive_int("every", every)
    if n_saved is not None:
        checks.positive_int("n_saved", n_saved)
    sharded = [
        name
        for name, obj in to_save.items()
        if isinstance(obj, nn.Module) and distributed.any_sharded(obj.parameters())
    ]
    if sharded:
        raise ValueError(
            f"to_save[{sharded[0]!r}] has parameters sharded across ranks (FSDP2's DTensors), and attach_checkpoint "
            "writes one file of whole tensors from rank 0: use attach_sharded_checkpoint"
        )
    directory = RunDirectory(checks.path("dirname", dirname))
    checkpoint = DurableCheckpoint(to_save, directory, n_saved)
    hold = DirectoryHold(directory)
    trainer.add_event_handler(Events.STARTED, hold.take)
    event = Events.EPOCH_COMPLETED if every is None else Events.ITERATION_COMPLETED(every=every)
    trainer.add_event_handler(event, checkpoint)
    trainer.add_event_handler(Events.COMPLETED, _save_last, checkpoint)
    trainer.add_event_handler(Events.COMPLETED, hold.let_go)
    return checkpoint


def check_trainer(trainer: Any) -> Engine:
    """``trainer`` if it is an Ignite ``Engine``; a ``TypeError`` naming it otherwise."""
    if not isinstance(trainer, Engine):
        raise TypeError(
            f"trainer must be an Ignite Engine (what create_trainer returns), got {checks.describe(trainer)}"
        )
    return trainer


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
        refusal = distributed.gather_objects(refusal)[0]
        if refusal is not None:
            kind, message = refusal
            raise {"busy": RunDirectoryBusy, "unwritable": OSError, "later": ValueError}[kind](message)
        if self.held and isinstance(engine, Trainer):
            engine.call_at_run_end(self.let_go)

    def let_go(self, *_: Any) -> None:
        """Release the directory if this run holds it (once)."""
        if self.held:
            self.held = False
            self.directory.release()

    def _refusal(self, iteration: int) -> tuple[str, str] | None:
        directory = self.directory
        try:
            directory.acquire()
        except RunDirectoryBusy as error:
            return "busy", str(error)
        except OSError as error:
            return "unwritable", str(error)
        self.held = True
        try:
            directory.prepare()
        except OSError as error:
            self.let_go()
            return "unwritable", str(error)
        later = [path.name for step, path in directory.checkpoints() if step > iteration]
        if later:
            self.let_go()
            return "later", (
                f"{directory.path} holds checkpoints of later iterations than this run's {iteration} "
                f"({', '.join(later)}): resume from the newest (resume_from_latest), or save to another directory"
            )
        return None


def _save_last(engine: Engine, checkpoint: DurableCheckpoint) -> None:
    """Save the final state unless the last save was at this iteration."""
    last = checkpoint.last_checkpoint
    if last is None or last.name != checkpoint_name(engine.state.iteration):
        checkpoint(engine)


def latest_checkpoint(dirname: str | Path) -> Path | None:
    """The checkpoint of ``dirname`` with the highest iteration, or None.

    Checkpoints are files named exactly ``checkpoint_{iteration}.pt`` and
    sharded checkpoints, directories ``checkpoint_{iteration}`` holding
    ``.metadata`` (``attach_sharded_checkpoint``); an entry of such a name of
    the wrong kind (a dangling link, a directory without ``.metadata``) is
    skipped with a warning.

    Raises:
        ValueError: ``dirname`` is a file.
    """
    path = checks.path("dirname", dirname)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"{path} is a file, not a directory of checkpoints: pass its directory, or load_checkpoint(to_load, path)"
        )
    return RunDirectory(path).newest()


def resume_from_latest(to_load: Mapping[str, Any], dirname: str | Path) -> Path | None:
    """Load the newest checkpoint of ``dirname`` into ``to_load``; return its path (None if there is none).

    A file is loaded by ``load_checkpoint``, a sharded checkpoint by
    ``load_sharded_checkpoint`` (see them for what is checked). In a
    distributed run every rank calls it and reads the same checkpoint.
    """
    checks.mapping("to_load", to_load)
    path = latest_checkpoint(dirname)
    if path is not None and path.is_dir():
        load_sharded_checkpoint(to_load, path)
    elif path is not None:
        load_checkpoint(to_load, path)
    return path
