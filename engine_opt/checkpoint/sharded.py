"""Periodic sharded checkpoints (``torch.distributed.checkpoint``), optionally written while training goes on.

``attach_sharded_checkpoint`` is ``attach_checkpoint`` for models too large
to gather on one rank (FSDP2's ``fully_shard``): each rank writes its own
shards, and ``resume_from_latest`` loads the newest checkpoint, file or
sharded, into the same objects, in as many processes or in another number::

    to_save = {"model": model, "optim_wrapper": wrapper, "trainer": trainer}
    resume_from_latest(to_save, "checkpoints")
    attach_sharded_checkpoint(trainer, to_save, "checkpoints", every=100, async_save=True)
    trainer.run(data, max_epochs=10)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist
from ignite.engine import Engine, Events

from ..engine.trainer import Trainer
from ..optim import OptimWrapper, OptimWrapperDict, checks, distributed
from ..optim.wrapper_dict import members
from .periodic import attach_periodic, check_period
from .run_directory import RunDirectory, checkpoint_name, partial_name
from .sharded_files import ShardedLayout, publish, save_sharded


class ShardedCheckpoint:
    """Write ``to_save`` as a sharded checkpoint ``checkpoint_{iteration}`` of a run directory, then rotate.

    Each save is written to ``.checkpoint_{iteration}.{pid}.partial`` and
    renamed once DCP's ``.metadata`` (written after every rank's shards) is
    there, so only complete checkpoints carry the run's names; only then are
    the run's checkpoints beyond ``n_saved`` removed. A save asked for while
    a wrapper of sharded (FSDP2) parameters is part-way through an
    accumulation window waits for the window's end (FSDP2 holds the
    window's gradients, not the wrapper; a warning says when it has waited
    a whole window). With ``async_save`` each rank copies its state to host
    memory and training goes on while a thread writes it; a save waits for
    the one before it, and the run's end waits for the last (a run of a
    plain Ignite ``Engine`` that raises leaves its last background save
    unpublished; ``create_trainer``'s trainer publishes it however the run ends).

    Args:
        to_save: Objects with ``state_dict``/``load_state_dict``, by name.
        directory: The run directory.
        n_saved: How many checkpoints to keep (``None``: all).
        async_save: Write in the background (``torch.distributed.checkpoint.async_save``).
    """

    def __init__(self, to_save: Mapping[str, Any], directory: RunDirectory, n_saved: int | None, async_save: bool):
        self.layout = ShardedLayout.of(to_save)
        self.directory = directory
        self.n_saved = n_saved
        self.async_save = async_save
        self.last_checkpoint: Path | None = None
        self.last_iteration: int | None = None
        self._pid = distributed.gather_objects(os.getpid())[0]  # the partial directory's name, as rank 0 has it
        self._group = dist.new_group(backend="gloo") if async_save and distributed.initialized() else None
        self._pending: tuple[Future[Any], Path, Path] | None = None
        self._deferred_since: int | None = None  # the iteration a save was asked for mid-window
        self._longest_window = _longest_window(self.layout.objects.values())

    def __call__(self, engine: Engine) -> None:
        """Save now, or at the end of the accumulation window in progress."""
        if not self.layout.in_window():
            self._deferred_since = None  # a save asked for earlier in the window: this one is it
            self.save(engine.state.iteration)
        elif self._deferred_since is None:
            self._deferred_since = engine.state.iteration

    def at_iteration_end(self, engine: Engine) -> None:
        """Publish a finished background save; take a deferred save once the window has ended."""
        if self._pending is not None and self._pending[0].done():
            self.wait()
        if self._deferred_since is None:
            return
        if not self.layout.in_window():
            self._deferred_since = None
            self.save(engine.state.iteration)
        elif engine.state.iteration - self._deferred_since == self._longest_window:
            warnings.warn(
                f"a sharded checkpoint asked for at iteration {self._deferred_since} still waits for its "
                f"wrappers' accumulation windows to end together ({self._longest_window} iterations later): "
                "windows that never end together (members that begin at different iterations) are never saved",
                RuntimeWarning,
                stacklevel=2,
            )

    def save(self, iteration: int) -> None:
        """Write the checkpoint of ``iteration`` (every rank calls it); with ``async_save``, begin writing it."""
        self.wait()
        final = self.directory.path / checkpoint_name(iteration, sharded=True)
        partial = partial_name(final, self._pid)
        future = save_sharded(self.layout, partial, process_group=self._group, async_save=self.async_save)
        self.last_iteration = iteration
        if future is None:
            self._publish(partial, final)
        else:
            self._pending = (future, partial, final)

    def wait(self) -> None:
        """Wait for a background save to be written, then publish it (a failed write raises here)."""
        if self._pending is None:
            return
        (future, partial, final), self._pending = self._pending, None
        future.result()
        self._publish(partial, final)

    def at_run_end(self, engine: Engine) -> None:
        """Save the final state (unless saved at this iteration), and wait for it to be written."""
        if self.layout.in_window():
            newest = "none was written" if self.last_iteration is None else f"the newest is of {self.last_iteration}"
            warnings.warn(
                f"the run ended part-way through an accumulation window of sharded parameters (iteration "
                f"{engine.state.iteration}); a sharded checkpoint of them is taken between windows: {newest}",
                RuntimeWarning,
                stacklevel=2,
            )
        elif self.last_iteration != engine.state.iteration:
            self.save(engine.state.iteration)
        self._deferred_since = None
        self.wait()

    def _publish(self, partial: Path, final: Path) -> None:
        if distributed.rank() == 0:
            publish(partial, final)
            self.directory.rotate(self.n_saved)
        self.last_checkpoint = final


def attach_sharded_checkpoint(
    trainer: Engine,
    to_save: Mapping[str, Any],
    dirname: str | Path,
    *,
    every: int | None = None,
    n_saved: int | None = 2,
    async_save: bool = False,
) -> ShardedCheckpoint:
    """Save ``to_save`` as sharded checkpoints every ``every`` iterations (or each epoch), and when the run ends.

    Models (FSDP2's ``fully_shard``, DDP or plain) and their optimizers are
    written by ``torch.distributed.checkpoint``, each rank its own shards;
    the rest (the wrappers' counters, the grad scaler, the trainer, the
    ``ResumableLoader``...) by rank 0 to ``objects.pt``. The directory is
    held, cleaned of interrupted saves and checked as ``attach_checkpoint``
    does, and the same rules hold: a save that did not finish never becomes
    the newest, rotation keeps ``n_saved``. Every rank must attach it, in the
    same order as its other collective calls.

    Args:
        trainer: The trainer.
        to_save: Objects with ``state_dict``/``load_state_dict``, by name;
            every optimizer's model must be among them.
        dirname: Directory for the checkpoints (created if missing).
        every: Save period in iterations; ``None`` saves at each epoch's end.
        n_saved: How many checkpoints to keep (``None``: all).
        async_save: Write in a background thread while training goes on
            (the state is first copied to host memory).

    Returns:
        The attached ``ShardedCheckpoint``.

    Raises:
        ValueError: An optimizer's model is not in ``to_save``, or an
            optimizer is a ``ZeroRedundancyOptimizer``.

    Examples:
        >>> import tempfile, torch
        >>> from engine_opt import OptimWrapper, create_trainer
        >>> model = torch.nn.Linear(2, 1)
        >>> wrapper = OptimWrapper(torch.optim.AdamW(model.parameters()))
        >>> trainer = create_trainer(model, wrapper, torch.nn.functional.mse_loss)
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     to_save = {"model": model, "optim_wrapper": wrapper, "trainer": trainer}
        ...     _ = attach_sharded_checkpoint(
        ...         trainer, to_save, directory, every=2, n_saved=1
        ...     )
        ...     _ = trainer.run([(torch.ones(3, 2), torch.ones(3, 1))] * 4)
        ...     sorted(os.listdir(f"{directory}/checkpoint_4"))
        ['.metadata', '__0_0.distcp', 'manifest.json', 'objects.pt']
    """
    check_period(trainer, every, n_saved)
    if not isinstance(async_save, bool):
        raise TypeError(f"async_save must be a bool, got {checks.describe(async_save)}")
    directory = RunDirectory(checks.path("dirname", dirname), "sharded")
    checkpoint = ShardedCheckpoint(to_save, directory, n_saved, async_save)
    attach_periodic(trainer, checkpoint, directory, every)
    # after the directory's hold: a run's end waits for its background save, then lets the directory go
    trainer.add_event_handler(Events.STARTED, _wait_at_run_end, checkpoint)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, checkpoint.at_iteration_end)
    return checkpoint


def _longest_window(objects: Iterable[Any]) -> int:
    """The longest accumulation window of the wrappers among ``objects`` (1 without any)."""
    wrappers = [
        member for obj in objects if isinstance(obj, (OptimWrapper, OptimWrapperDict)) for member in members(obj)
    ]
    return max((wrapper.accumulative_counts for _, wrapper in wrappers), default=1)


def _wait_at_run_end(engine: Engine, checkpoint: ShardedCheckpoint) -> None:
    """A run that ends otherwise than completed still waits for its background save (before its lock goes)."""
    if isinstance(engine, Trainer):
        engine.call_at_run_end(checkpoint.wait)
