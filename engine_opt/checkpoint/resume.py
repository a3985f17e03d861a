"""The newest checkpoint of a directory, file or sharded, and resuming from it.

Example:
    >>> import tempfile, torch
    >>> model = torch.nn.Linear(1, 1)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     missing = resume_from_latest({"model": model}, directory)  # a fresh start: nothing to load
    ...     torch.save({"model": model.state_dict()}, f"{directory}/checkpoint_3.pt")
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
from .run_directory import RunDirectory
from .sharded_files import load_sharded_checkpoint


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
