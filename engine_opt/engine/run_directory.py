"""``RunDirectory``: a checkpoint directory as one run owns it: its files, its lock, its leftovers.

- The run's files are named exactly ``checkpoint_{iteration}.pt``; anything
  else (``best_checkpoint_3.pt``, a user's ``pretrained_checkpoint_1.pt``) is
  never listed, rotated or deleted. An entry with the run's name that is not
  a file (a directory, a dangling link) is skipped with a warning.
- ``lock()`` holds the directory for one run at a time (a ``filelock`` lock,
  which the operating system releases when its process dies, so a run killed
  earlier never blocks its resume). Within one process it is reentrant.
- A save writes ``.checkpoint_{iteration}.pt.{pid}.partial`` first (see
  ``write_checkpoint``); ``prepare()`` removes those a killed save left.

Example:
    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as path:
    ...     directory = RunDirectory(path)
    ...     for name in ("checkpoint_8.pt", "checkpoint_12.pt", "best_checkpoint_30.pt"):
    ...         torch.save({}, f"{path}/{name}")
    ...     [step for step, _ in directory.checkpoints()], directory.newest().name
    ([8, 12], 'checkpoint_12.pt')
"""

from __future__ import annotations

import json
import os
import re
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock

CHECKPOINT_NAME = re.compile(r"checkpoint_(0|[1-9][0-9]*)\.pt")  # as checkpoint_name writes it: ASCII, no leading 0
PARTIAL_NAME = re.compile(r"\.checkpoint_(0|[1-9][0-9]*)\.pt\.[0-9]+\.partial")
_LOCK = ".engine_opt.lock"
_OWNER = ".engine_opt.lock.owner"


class RunDirectoryBusy(RuntimeError):
    """Another process holds the directory's lock: a second run may not write there."""


def checkpoint_name(iteration: int) -> str:
    """The file name of the run's checkpoint at ``iteration``."""
    return f"checkpoint_{iteration}.pt"


def partial_name(final: Path) -> Path:
    """Where a save of ``final`` writes before it is complete."""
    return final.with_name(f".{final.name}.{os.getpid()}.partial")


class RunDirectory:
    """A directory of ``checkpoint_{iteration}.pt`` files that one run writes.

    Args:
        path: The directory (it need not exist yet).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = filelock.FileLock(self.path / _LOCK, timeout=0, is_singleton=True)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(iteration, path)`` of the run's checkpoint files, oldest first (``[]`` without a directory)."""
        if not self.path.is_dir():
            return []
        found = []
        for entry in self.path.iterdir():
            match = CHECKPOINT_NAME.fullmatch(entry.name)
            if match is None:
                continue
            if not entry.is_file():
                kind = "a directory" if entry.is_dir() else "a link to nothing" if entry.is_symlink() else "not a file"
                warnings.warn(f"{entry} is {kind}, not a checkpoint: skipped", RuntimeWarning, stacklevel=2)
                continue
            found.append((int(match.group(1)), entry))
        return sorted(found)

    def newest(self) -> Path | None:
        """The checkpoint file of the highest iteration, or None."""
        files = self.checkpoints()
        return files[-1][1] if files else None

    def prepare(self) -> list[Path]:
        """Make sure the run can write here, then remove what interrupted saves left; return those files.

        Raises:
            OSError: The path is a file, or the directory cannot be created or
                written (the message names it).
        """
        self._create()
        leftovers = [entry for entry in self.path.iterdir() if PARTIAL_NAME.fullmatch(entry.name)]
        for entry in leftovers:
            entry.unlink(missing_ok=True)
        return leftovers

    def _create(self) -> None:
        """Create the directory if needed and write a file there, or raise an ``OSError`` naming it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".engine_opt.write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise type(error)(
                error.errno, f"cannot write checkpoints to {self.path}: {error.strerror or error}"
            ) from None

    def rotate(self, keep: int | None) -> list[Path]:
        """Remove the run's oldest checkpoint files beyond the newest ``keep``; return them."""
        if keep is None:
            return []
        removed = [path for _, path in self.checkpoints()[:-keep]]
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def acquire(self) -> None:
        """Hold the directory for this run (reentrant within this process), while this object lives.

        Raises:
            RunDirectoryBusy: Another process holds it; the message names the
                directory and, where it is known, the holder's process and host.
            OSError: The directory cannot be created or written.
        """
        self._create()
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise RunDirectoryBusy(
                f"{self.path} is in use by another run ({self._holder()}); one run writes to a checkpoint "
                "directory at a time: wait for it to end, or choose another directory"
            ) from None
        if self._lock.lock_counter == 1:
            owner = {"pid": os.getpid(), "host": socket.gethostname()}
            (self.path / _OWNER).write_text(json.dumps(owner))

    def release(self) -> None:
        """Let the directory go (once per ``acquire``); nothing happens if it is not held."""
        if self._lock.is_locked:
            if self._lock.lock_counter == 1:
                (self.path / _OWNER).unlink(missing_ok=True)
            self._lock.release()

    @contextmanager
    def lock(self) -> Iterator[RunDirectory]:
        """Hold the directory while the block runs."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def _holder(self) -> str:
        try:
            owner = json.loads((self.path / _OWNER).read_text())
            return f"process {owner['pid']} on {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"
