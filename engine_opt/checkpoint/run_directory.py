"""``RunDirectory``: a checkpoint directory as one run owns it: its files, its lock, its leftovers.

- The run's checkpoints are files named exactly ``checkpoint_{iteration}.pt``,
  or sharded ones: directories ``checkpoint_{iteration}`` holding
  ``torch.distributed.checkpoint``'s ``.metadata``. Anything else
  (``best_checkpoint_3.pt``, a user's ``pretrained_checkpoint_1.pt``) is
  never listed, rotated or deleted. An entry with the run's name of the wrong
  kind (a directory ``checkpoint_3.pt``, a dangling link, a directory without
  ``.metadata``) is skipped with a warning.
- ``lock()`` holds the directory for one run at a time (a ``filelock`` lock,
  which the operating system releases when its process dies, so a run killed
  earlier never blocks its resume). Within one process it is reentrant. The
  holder's process id and host are written beside it: a run that finds the
  lock file removed under a live holder on this host is refused all the same.
- A save writes ``.checkpoint_{iteration}.pt.{pid}.partial`` (a sharded one
  ``.checkpoint_{iteration}.{pid}.partial``) first and renames it when it is
  complete; ``prepare()`` removes those a killed save left, and ``rotate``
  renames a sharded checkpoint so before it deletes its files.

Examples:
    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as path:
    ...     directory = RunDirectory(path)
    ...     for step in ("checkpoint_8", "checkpoint_12", "best_checkpoint_30"):
    ...         torch.save({}, f"{path}/{step}.pt")
    ...     os.makedirs(f"{path}/checkpoint_10")
    ...     open(f"{path}/checkpoint_10/.metadata", "wb").close()
    ...     [step for step, _ in directory.checkpoints()], directory.newest().name
    ([8, 10, 12], 'checkpoint_12.pt')
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import filelock

from ..optim import checks

CHECKPOINT_NAME = re.compile(r"checkpoint_(0|[1-9][0-9]*)(\.pt)?")  # as checkpoint_name writes it: ASCII, no leading 0
PARTIAL_NAME = re.compile(r"\.checkpoint_(0|[1-9][0-9]*)(\.pt)?\.[0-9]+\.partial")
SHARDED_METADATA = ".metadata"  # what torch.distributed.checkpoint writes last, once every rank has written
_LOCK = ".engine_opt.lock"
_OWNER = ".engine_opt.lock.owner"


Kind = Literal["file", "sharded", "any"]
"""Which checkpoints a run considers: its files, its sharded directories, or both."""
KINDS: tuple[Kind, ...] = ("file", "sharded", "any")


class RunDirectoryBusy(RuntimeError):
    """Another process holds the directory's lock: a second run may not write there."""


class DamagedCheckpoint(ValueError):
    """A checkpoint that cannot be read as it was written: truncated, flipped bits, missing files, not a
    checkpoint at all; unlike a checkpoint of another run (a plain ``ValueError``), an older one may load."""


class RunDirectoryConflict(ValueError):
    """The directory holds what a run starting there would overwrite or rank below: checkpoints of later
    iterations, or entries named like its checkpoints that are none."""


def checkpoint_name(iteration: int, sharded: bool = False) -> str:
    """The name of the run's checkpoint at ``iteration``: a file, or a sharded checkpoint's directory."""
    return f"checkpoint_{iteration}" if sharded else f"checkpoint_{iteration}.pt"


def partial_name(final: Path, pid: int | None = None) -> Path:
    """Where a save of ``final`` by process ``pid`` (this one by default) writes before it is complete."""
    return final.with_name(f".{final.name}.{os.getpid() if pid is None else pid}.partial")


def remove(path: Path) -> None:
    """Remove a checkpoint file, or a sharded checkpoint's directory (renamed to a partial name first)."""
    if path.is_dir() and not path.is_symlink():
        trash = path if PARTIAL_NAME.fullmatch(path.name) else partial_name(path)
        if trash != path:
            os.replace(path, trash)  # from here on it is no checkpoint; prepare() finishes what a crash leaves
        shutil.rmtree(trash, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class RunDirectory:
    """A directory of checkpoints (``checkpoint_{iteration}.pt`` files, sharded directories) that one run writes.

    Args:
        path: The directory (it need not exist yet).
        kind: The checkpoints the run writes and considers its own: ``'file'``,
            ``'sharded'`` or ``'any'``; those of the other kind are never listed,
            taken for the newest or rotated.

    Raises:
        ValueError: ``kind`` is none of the three.
    """

    def __init__(self, path: str | Path, kind: Kind = "any") -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {checks.describe(kind)}")
        self.path = Path(path)
        self.kind = kind
        self._lock = filelock.FileLock(self.path / _LOCK, timeout=0, is_singleton=True)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(iteration, path)`` of the run's checkpoints (of its kind), oldest first (``[]`` without a directory).

        With ``kind='any'``, a file and a sharded checkpoint of one iteration are
        both listed, the file first. An entry named like one that is none
        (``impostors``) is skipped with a warning.
        """
        found = []
        for iteration, entry, problem in self._named_entries():
            if problem is not None:
                warnings.warn(f"{entry} is {problem}, not a checkpoint: skipped", RuntimeWarning, stacklevel=2)
                continue
            found.append((iteration, entry))
        return sorted(found, key=lambda item: (item[0], item[1].is_dir()))

    def impostors(self) -> list[str]:
        """The entries named like the run's checkpoints that are none, each said with what it is instead.

        Examples:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as path:
            ...     os.makedirs(f"{path}/checkpoint_3.pt")
            ...     RunDirectory(path, "file").impostors()
            ['checkpoint_3.pt (a directory)']
        """
        found = [(entry.name, problem) for _, entry, problem in self._named_entries() if problem is not None]
        return [f"{name} ({problem})" for name, problem in sorted(found)]

    def _named_entries(self) -> Iterator[tuple[int, Path, str | None]]:
        """Each entry named like a checkpoint of the run's kind: its iteration, path, and why it is none (or None)."""
        if not self.path.is_dir():
            return
        for entry in self.path.iterdir():
            match = CHECKPOINT_NAME.fullmatch(entry.name)
            if match is None:
                continue
            sharded = match.group(2) is None
            if self.kind != "any" and sharded != (self.kind == "sharded"):
                continue
            yield int(match.group(1)), entry, _kind_problem(entry, sharded)

    def newest(self) -> Path | None:
        """The run's checkpoint of the highest iteration, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def prepare(self) -> list[Path]:
        """Make sure the run can write here, then remove what interrupted saves left; return those files.

        Raises:
            OSError: The path is a file, or the directory cannot be created or
                written (the message names it).
        """
        self._create()
        leftovers = [entry for entry in self.path.iterdir() if PARTIAL_NAME.fullmatch(entry.name)]
        for entry in leftovers:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
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
        """Remove the run's oldest checkpoints beyond the newest ``keep``; return them."""
        if keep is None:
            return []
        removed = [path for _, path in self.checkpoints()[:-keep]]
        for path in removed:
            remove(path)
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
            holder = self._live_holder()
            if holder is not None:  # its lock file was removed under it: the owner file still names it
                self._lock.release()
                raise RunDirectoryBusy(
                    f"{self.path} is in use by another run ({holder}; its lock file was removed while it ran); one "
                    "run writes to a checkpoint directory at a time: wait for it to end, or choose another directory "
                    f"(if that process is no run, remove {self.path / _OWNER})"
                )
            owner = {"pid": os.getpid(), "host": socket.gethostname()}
            (self.path / _OWNER).write_text(json.dumps(owner))

    def held_elsewhere(self) -> str | None:
        """Why another run holds the directory (``RunDirectoryBusy``'s message), or ``None``; writes nothing.

        A directory without a lock file is held by no run, unless its owner
        file names a live process (its lock file was removed under it); one
        with a lock file is held for a moment to tell. A directory that cannot
        be written says nothing here: the run's own set-up reports that.
        """
        if not (self.path / _LOCK).is_file():
            holder = self._live_holder()
            if holder is None:
                return None
            return (
                f"{self.path} is in use by another run ({holder}; its lock file was removed while it ran); one run "
                f"writes to a checkpoint directory at a time (if that process is no run, remove {self.path / _OWNER})"
            )
        try:
            with self.lock():
                return None
        except RunDirectoryBusy as error:
            return str(error)
        except OSError:
            return None

    def release(self) -> None:
        """Let the directory go (once per ``acquire``); nothing happens if it is not held."""
        if self._lock.is_locked:
            if self._lock.lock_counter == 1:
                (self.path / _OWNER).unlink(missing_ok=True)
            self._lock.release()

    def discard_if_unused(self) -> bool:
        """Remove the directory if it holds nothing but a lock no run holds (a run refused before it wrote
        there); whether it did."""
        if self._lock.is_locked or not self.path.is_dir():
            return False
        try:
            self._lock.acquire()
        except filelock.Timeout:
            return False
        try:
            unused = self._live_holder() is None and all(entry.name in (_LOCK, _OWNER) for entry in self.path.iterdir())
            if unused:
                (self.path / _OWNER).unlink(missing_ok=True)
        finally:
            self._lock.release()
        if unused:
            (self.path / _LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # another run began there meanwhile: it stays
                self.path.rmdir()
        return unused

    @contextmanager
    def lock(self) -> Iterator[RunDirectory]:
        """Hold the directory while the block runs."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def _live_holder(self) -> str | None:
        """The process the owner file names, if it is another one, on this host, and alive (else None)."""
        try:
            owner = json.loads((self.path / _OWNER).read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if host != socket.gethostname() or pid == os.getpid():
            return None  # another host's liveness cannot be told; a stale file of a killed run must not block
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            pass
        return f"process {pid} on {host}"

    def _holder(self) -> str:
        try:
            owner = json.loads((self.path / _OWNER).read_text())
            return f"process {owner['pid']} on {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"


def _kind_problem(entry: Path, sharded: bool) -> str | None:
    """Why an entry with a checkpoint's name is no checkpoint (None if it is one): a link is none either."""
    if entry.is_symlink():
        return f"a link to {os.readlink(entry)}" if entry.exists() else "a link to nothing"
    if not sharded:
        return None if entry.is_file() else "a directory" if entry.is_dir() else "not a file"
    if not entry.is_dir():
        return "not a directory"
    return None if (entry / SHARDED_METADATA).is_file() else f"a directory without {SHARDED_METADATA}"
