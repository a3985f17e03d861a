"""The newest checkpoint of a directory, file or sharded, and resuming from it.

Examples:
    >>> import tempfile, torch
    >>> model = torch.nn.Linear(1, 1)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     # a fresh start: nothing to load
    ...     missing = resume_from_latest({"model": model}, directory)
    ...     path = f"{directory}/checkpoint_3.pt"
    ...     torch.save({"model": model.state_dict()}, path)
    ...     found = resume_from_latest({"model": model}, directory)
    >>> missing, found.name
    (None, 'checkpoint_3.pt')
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..optim import checks
from .files import load_checkpoint
from .run_directory import Kind, RunDirectory
from .sharded_files import load_sharded_checkpoint


def latest_checkpoint(dirname: str | Path, kind: Kind = "any") -> Path | None:
    """The checkpoint of ``dirname`` with the highest iteration, or None.

    Checkpoints are files named exactly ``checkpoint_{iteration}.pt``
    (``attach_checkpoint``) and sharded checkpoints, directories
    ``checkpoint_{iteration}`` holding ``.metadata`` (``attach_sharded_checkpoint``);
    an entry of such a name of the wrong kind (a link, a directory without
    ``.metadata``) is skipped with a warning.

    Args:
        dirname: The directory of checkpoints.
        kind: ``'file'``, ``'sharded'``, or ``'any'`` (either, the newest):
            pass the kind your run writes, so that a checkpoint of another
            kind put there is never taken for your run's.

    Raises:
        ValueError: ``dirname`` is a file, or ``kind`` is none of the three.
    """
    path = checks.path("dirname", dirname)
    directory = RunDirectory(path, kind)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"{path} is a file, not a directory of checkpoints: pass its directory, or load_checkpoint(to_load, path)"
        )
    return directory.newest()


def resume_from_latest(to_load: Mapping[str, Any], dirname: str | Path, kind: Kind = "any") -> Path | None:
    """Load the newest checkpoint of ``dirname`` (of ``kind``) into ``to_load``; return its path (None if none).

    A file is loaded by ``load_checkpoint``, a sharded checkpoint by
    ``load_sharded_checkpoint`` (see them for what is checked); ``kind`` as
    for ``latest_checkpoint``. In a distributed run every rank calls it and
    reads the same checkpoint.
    """
    checks.mapping("to_load", to_load)
    path = latest_checkpoint(dirname, kind)
    if path is not None and path.is_dir():
        load_sharded_checkpoint(to_load, path)
    elif path is not None:
        load_checkpoint(to_load, path)
    return path
