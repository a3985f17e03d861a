"""The run's log and checkpoint directories: what a new or resumed ``engine-opt train`` may do with them.

A run leaves its mark in the checkpoint directory when it starts, so that a
run killed before its first checkpoint is told from a directory of no run;
a run writes neither into an earlier run's checkpoints nor its curves; a
damaged checkpoint is answered with the newest that reads whole; an error of
TensorBoard's writer names the log directory.

Examples:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     logs, checkpoints = Path(directory), Path(directory) / "checkpoints"
    ...     checkpoints.mkdir()
    ...     before = saved_there_before(logs, checkpoints)
    ...     mark(logs, checkpoints)
    ...     after = saved_there_before(logs, checkpoints)
    >>> before, after
    (False, True)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from ..checkpoint import DamagedCheckpoint, RunDirectory, latest_checkpoint
from ..checkpoint.files import read_checkpoint
from .config import UsageError

_RUN_MARK = ".engine_opt.run"
"""Written in the checkpoint directory when a run starts: which log directory's run saves there."""


def mark(log_dir: Path, checkpoint_dir: Path) -> None:
    """Leave the mark of a run of ``log_dir`` in ``checkpoint_dir`` (where it saves)."""
    (checkpoint_dir / _RUN_MARK).write_text(json.dumps({"log_dir": str(log_dir.resolve())}))


def saved_there_before(log_dir: Path, checkpoint_dir: Path) -> bool:
    """Whether a run of ``log_dir`` started in ``checkpoint_dir`` before (its mark is there)."""
    try:
        found = json.loads((checkpoint_dir / _RUN_MARK).read_text())
        return bool(found["log_dir"] == str(log_dir.resolve()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_run_directories(args: argparse.Namespace, log_dir: Path, checkpoint_dir: Path, used_before: bool) -> None:
    """A new run, with ``--resume`` or not, writes neither into an earlier run's checkpoints nor its curves.

    ``used_before``: an earlier run of ``log_dir`` started in the checkpoint
    directory (and saved no checkpoint there, or they were removed).
    """
    impostors = RunDirectory(checkpoint_dir, "file").impostors()
    if impostors:
        raise UsageError(
            f"{checkpoint_dir} holds entries named like checkpoints that are none ({', '.join(impostors)}): "
            "move them away, or pass another --checkpoint-dir"
        )
    if latest_checkpoint(checkpoint_dir, kind="file") is not None:
        if args.resume:
            return
        raise UsageError(
            f"{checkpoint_dir} holds checkpoints of an earlier run; pass --resume to continue it, "
            "or --log-dir (logs and checkpoints) or --checkpoint-dir for a new run"
        )
    if not any(log_dir.glob("events.out.tfevents.*")):
        return
    if used_before:  # the earlier run saved there, and stopped before its first checkpoint
        if args.resume:
            return  # started over: its curves are drawn again from iteration 1
        raise UsageError(
            f"{log_dir} holds the TensorBoard logs of an earlier run that saved to {checkpoint_dir} but left no "
            "checkpoint there (it stopped before its first, or they were removed); pass --resume to start that "
            "run over, or --log-dir for a new run"
        )
    if args.resume:
        raise UsageError(
            f"--resume: no checkpoint in {checkpoint_dir}, but {log_dir} holds the TensorBoard logs of an earlier "
            "run; pass the --checkpoint-dir that run saved to, or --log-dir for a new run"
        )
    raise UsageError(
        f"{log_dir} holds the TensorBoard logs of an earlier run, which this run's would mix with; pass "
        "--resume to continue it, or --log-dir for a new run"
    )


def way_past_damage(checkpoint_dir: Path) -> str:
    """What to do when the newest checkpoint is damaged: the newest that reads whole, if one does."""
    found = [path for _, path in RunDirectory(checkpoint_dir, "file").checkpoints()]
    for index in range(len(found) - 2, -1, -1):
        try:
            read_checkpoint(found[index])
        except DamagedCheckpoint:
            continue
        newer = ", ".join(path.name for path in found[index + 1 :])
        return (
            f"{found[index].name} is the newest that reads whole: move {newer} out of {checkpoint_dir} "
            "(nothing was deleted) and --resume continues from it"
        )
    return (
        f"no other checkpoint in {checkpoint_dir} reads whole: start a new run with another --log-dir "
        "and --checkpoint-dir"
    )


def raised_by_tensorboard(trace: TracebackType | None) -> bool:
    """Whether the traceback ``trace`` ends in TensorBoard's writer (its thread writes the event files)."""
    packages = [
        str(Path(module.__file__).parent) + os.sep
        for module in (sys.modules.get("tensorboard"), sys.modules.get("torch.utils.tensorboard"))
        if module is not None and module.__file__ is not None
    ]
    frames = traceback.extract_tb(trace)[-3:]
    return any(frame.filename.startswith(package) for frame in frames for package in packages)


@contextlib.contextmanager
def logs_named(log_dir: Path) -> Iterator[None]:
    """An ``OSError`` of TensorBoard's writer (a full disk) raised as one that names the log directory."""
    try:
        yield
    except OSError as error:
        if not raised_by_tensorboard(error.__traceback__):
            raise
        raise type(error)(
            error.errno, f"cannot write TensorBoard logs to {log_dir}: {error.strerror or error}"
        ) from None
