"""``attach_checkpoint``: checkpoint files written by Ignite's ``Checkpoint``, each durably, rotated after the save."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from torch import nn

from ..optim import checks, distributed
from ..optim.modes import eval_mode
from .files import write_checkpoint
from .periodic import attach_periodic, check_period, optimizers_with_modes
from .run_directory import RunDirectory, checkpoint_name


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
        self._with_modes = optimizers_with_modes(to_save)

    def __call__(self, engine: Engine) -> None:
        """Save now; a schedule-free optimizer and its model in eval mode (the weights it means)."""
        with eval_mode(self._with_modes):
            super().__call__(engine)

    def at_run_end(self, engine: Engine) -> None:
        """Save the final state unless the last save was at this iteration."""
        last = self.last_checkpoint
        if last is None or last.name != checkpoint_name(engine.state.iteration):
            self(engine)

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
    with a ``RunDirectoryConflict`` (a ``ValueError``: its files would rank
    below another run's), as is a directory holding an entry named like a
    checkpoint that is none (a save would fail on it or replace it). In a
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
    check_period(trainer, every, n_saved)
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
    directory = RunDirectory(checks.path("dirname", dirname), "file")
    checkpoint = DurableCheckpoint(to_save, directory, n_saved)
    attach_periodic(trainer, checkpoint, directory, every)
    return checkpoint
