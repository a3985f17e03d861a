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

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from ..engine.checkpoint_files import load_checkpoint
from ..optim import checks, distributed

_STEP = re.compile(r"checkpoint_(\d+)\.pt$")


def attach_checkpoint(
    trainer: Engine,
    to_save: Mapping[str, Any],
    dirname: str | Path,
    *,
    every: int | None = None,
    n_saved: int | None = 2,
) -> Checkpoint:
    """Save ``to_save`` every ``every`` iterations (or each epoch), and when the run ends.

    Files are ``checkpoint_{iteration}.pt`` in ``dirname``, written through a
    temporary file and a rename (``DiskSaver(atomic=True)``), so a process
    killed while saving leaves the previous checkpoint as the newest one. The
    newest ``n_saved`` are kept, counting those already in ``dirname`` (a
    resumed run's); a run that starts behind the newest file there is refused
    with a ``ValueError`` when it starts, since its own files would not be
    kept. In a distributed run rank 0 writes the files; every rank must
    attach it, since saving gathers state from all ranks.

    Args:
        trainer: The trainer.
        to_save: Objects with ``state_dict``/``load_state_dict``, by name;
            include the trainer, and the ``ResumableLoader`` for exact resume.
        dirname: Directory for the files (created if missing).
        every: Save period in iterations; ``None`` saves at each epoch's end.
        n_saved: How many checkpoints to keep (``None``: all).

    Returns:
        The attached Ignite ``Checkpoint``.
    """
    if every is not None:
        checks.positive_int("every", every)
    if n_saved is not None:
        checks.positive_int("n_saved", n_saved)
    checkpoint = Checkpoint(
        dict(to_save),
        DiskSaver(str(dirname), require_empty=False, atomic=True, create_dir=True),
        n_saved=n_saved,
        global_step_transform=lambda engine, _: engine.state.iteration,
        filename_pattern="checkpoint_{global_step}.{ext}",  # Ignite would name a lone object's file after it
    )
    trainer.add_event_handler(Events.STARTED, _take_over_files, checkpoint, Path(dirname))
    event = Events.EPOCH_COMPLETED if every is None else Events.ITERATION_COMPLETED(every=every)
    trainer.add_event_handler(event, checkpoint)

    def save_last(engine: Engine) -> None:
        last = checkpoint.last_checkpoint
        if last is None or _step_of(Path(str(last))) != engine.state.iteration:
            checkpoint(engine)

    trainer.add_event_handler(Events.COMPLETED, save_last)
    return checkpoint


def _take_over_files(engine: Engine, checkpoint: Checkpoint, directory: Path) -> None:
    """Count the checkpoints already in ``directory`` (the resumed run's) towards ``n_saved``.

    Files from later iterations than the run's own belong to another run: its
    checkpoints would rank below them and never be kept, so the run is refused
    (on every rank: a collective call).
    """
    saved = (
        sorted((step, path.name) for path in directory.iterdir() if (step := _step_of(path)) is not None)
        if directory.is_dir()
        else []
    )
    iteration = engine.state.iteration
    later = sorted(
        {name for names in distributed.gather_objects([n for s, n in saved if s > iteration]) for name in names}
    )
    if later:
        raise ValueError(
            f"{directory} holds checkpoints of later iterations than this run's {iteration} ({', '.join(later)}): "
            "resume from the newest (resume_from_latest), or save to another directory"
        )
    checkpoint.load_state_dict({"_saved": saved})


def _step_of(path: Path) -> int | None:
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else None


def latest_checkpoint(dirname: str | Path) -> Path | None:
    """The ``checkpoint_{iteration}.pt`` file of ``dirname`` with the highest iteration, or None."""
    directory = Path(dirname)
    if not directory.is_dir():
        return None
    steps = [(step, path) for path in directory.iterdir() if (step := _step_of(path)) is not None]
    return max(steps)[1] if steps else None


def resume_from_latest(to_load: Mapping[str, Any], dirname: str | Path) -> Path | None:
    """Load the newest checkpoint of ``dirname`` into ``to_load``; return its path (None if there is none).

    See ``load_checkpoint`` for what is checked. In a distributed run every
    rank calls it and reads the same file.
    """
    path = latest_checkpoint(dirname)
    if path is not None:
        load_checkpoint(to_load, path)
    return path
