"""A sharded checkpoint's manifest: every file's size and SHA-256, written last, verified before a load reads a byte.

DCP's files carry no checksum, so a flipped bit in a shard would load
silently. ``write_manifest`` records every file of a complete sharded
checkpoint in ``manifest.json`` (``save_sharded`` writes it once DCP has
written every rank's files: in the background for an asynchronous save);
``verify`` reads every file again and refuses the checkpoint, naming the
file, when one differs, is missing, or is a link.

Examples:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     _ = (Path(directory) / "__0_0.distcp").write_bytes(b"shard")
    ...     write_manifest(Path(directory))
    ...     _ = (Path(directory) / "__0_0.distcp").write_bytes(b"sharD")
    ...     try:  # doctest: +NORMALIZE_WHITESPACE
    ...         verify(Path(directory))
    ...     except DamagedCheckpoint as refusal:
    ...         print(refusal)
    /.../__0_0.distcp is damaged: its SHA-256 is not the one its manifest.json
    recorded
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .run_directory import DamagedCheckpoint

MANIFEST_FILE = "manifest.json"
_FORMAT = 1
_BLOCK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and SHA-256 of every file of ``directory`` in its ``manifest.json``, ``fsync``-ed."""
    files = {
        entry.relative_to(directory).as_posix(): {"size": entry.stat().st_size, "sha256": _sha256(entry)}
        for entry in sorted(directory.rglob("*"))
        if entry.is_file() and entry.name != MANIFEST_FILE
    }
    with (directory / MANIFEST_FILE).open("w") as file:
        json.dump({"format": _FORMAT, "files": files}, file, indent=1)
        file.flush()
        os.fsync(file.fileno())


def has_manifest(directory: Path) -> bool:
    """Whether ``directory`` has a manifest (sharded checkpoints of earlier releases have none)."""
    return (directory / MANIFEST_FILE).is_file()


def verify(directory: Path) -> None:
    """Raise a ``ValueError`` naming the file unless the directory's files are its manifest's, whole and unchanged.

    A file the manifest does not list, and a link anywhere in the directory,
    are refused too: a checkpoint's files are its own.
    """
    links = sorted(entry.name for entry in directory.rglob("*") if entry.is_symlink())
    if links:
        raise DamagedCheckpoint(f"{directory} holds links ({', '.join(links)}): a checkpoint's files are its own")
    files = _listed(directory)
    unlisted = sorted(
        entry.relative_to(directory).as_posix()
        for entry in directory.rglob("*")
        if entry.is_file() and entry.name != MANIFEST_FILE and entry.relative_to(directory).as_posix() not in files
    )
    if unlisted:
        raise DamagedCheckpoint(f"{directory} holds files its {MANIFEST_FILE} does not list: {unlisted}")
    for name, record in files.items():
        path = directory / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{path} is missing: {directory}/{MANIFEST_FILE} lists it")
        size = path.stat().st_size
        if size != record["size"]:
            raise DamagedCheckpoint(f"{path} is damaged: {size} bytes, its {MANIFEST_FILE} recorded {record['size']}")
        if _sha256(path) != record["sha256"]:
            raise DamagedCheckpoint(f"{path} is damaged: its SHA-256 is not the one its {MANIFEST_FILE} recorded")


def _listed(directory: Path) -> dict[str, Any]:
    """The manifest's files, or a ``ValueError`` if the manifest is no manifest of this format."""
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        well_formed = manifest["format"] == _FORMAT and all(
            isinstance(name, str)
            and ".." not in Path(name).parts
            and not Path(name).is_absolute()
            and isinstance(record, dict)
            and isinstance(record.get("size"), int)
            and isinstance(record.get("sha256"), str)
            for name, record in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DamagedCheckpoint(f"{path} is damaged: it is no manifest ({type(error).__name__})") from None
    if not well_formed:
        raise DamagedCheckpoint(f"{path} is damaged: it is no manifest of format {_FORMAT}")
    result: dict[str, Any] = files
    return result
