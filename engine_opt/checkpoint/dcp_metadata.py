"""DCP's ``.metadata``, read without running code: a restricted unpickler, and the storage reader that uses it.

``torch.distributed.checkpoint`` writes a sharded checkpoint's metadata with
``pickle`` and reads it back with ``pickle.load``, which runs whatever a
planted file asks for. Here it is read by an unpickler that builds only what
DCP's metadata holds (``torch.distributed.checkpoint.metadata``'s records,
the file system's storage records, torch's sizes, dtypes and layouts, paths)
and refuses anything else before it is built; a storage record that names a
file outside the checkpoint's directory (``../``, an absolute path) is
refused too. ``SafeReader`` is DCP's own ``FileSystemReader`` with that one
read replaced, for checks and loads alike.

Examples:
    >>> import io, pickle
    >>> # a payload would call something less harmless than print
    >>> planted = io.BytesIO(pickle.dumps(print))
    >>> try:  # doctest: +NORMALIZE_WHITESPACE
    ...     read_metadata(planted, "ckpt/checkpoint_3")
    ... except DamagedCheckpoint as refusal:
    ...     print(refusal)
    ckpt/checkpoint_3/.metadata holds builtins.print, which DCP's metadata never
    does: ...
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .run_directory import SHARDED_METADATA, DamagedCheckpoint

# The records DCP's metadata is made of, by module. Two are private names of torch (the storage record of a
# file and the layout lookup that torch's own weights_only unpickler allows too): a release that renames them
# makes every sharded load refused by name, never unchecked.
_RECORDS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


class _Refused(pickle.UnpicklingError):
    """A global that DCP's metadata never holds."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _RECORDS.get(module, ()) or (module == "torch" and _is_torch_constant(name)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _is_torch_constant(name: str) -> bool:
    """A dtype, layout or memory format of torch (``torch.float32``...): a value, nothing that runs."""
    return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))


def read_metadata(file: IO[bytes], checkpoint: str | Path) -> Metadata:
    """The ``Metadata`` in ``file``, the ``.metadata`` of ``checkpoint``, built only from DCP's own records.

    Raises:
        DamagedCheckpoint: It holds anything else (loading it could run code), or it is damaged; the message
            names the file.
    """
    where = f"{checkpoint}/{SHARDED_METADATA}"
    try:
        metadata = _MetadataUnpickler(file).load()
    except _Refused as refused:
        raise DamagedCheckpoint(
            f"{where} holds {refused}, which DCP's metadata never does: loading it could run code, so the "
            "checkpoint is refused (sharded checkpoints written by attach_sharded_checkpoint hold none)"
        ) from None
    except Exception as error:  # a damaged pickle surfaces as UnpicklingError, EOFError, ValueError, ...
        raise DamagedCheckpoint(
            f"{where} is damaged: it is not DCP's metadata ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(metadata, Metadata):
        raise DamagedCheckpoint(f"{where} is damaged: it holds a {type(metadata).__name__}, not DCP's Metadata")
    outside = sorted(
        {
            str(relative)
            for record in (metadata.storage_data or {}).values()
            if not _in_directory(relative := getattr(record, "relative_path", None))
        }
    )
    if outside:
        raise DamagedCheckpoint(
            f"{where} points at files outside its checkpoint ({outside}): the checkpoint is refused"
        )
    return metadata


def _in_directory(relative: Any) -> bool:
    """Whether a storage record names a file of the checkpoint's own directory (a bare file name)."""
    return isinstance(relative, str) and relative not in ("", ".", "..") and Path(relative).name == relative


class SafeReader(FileSystemReader):
    """DCP's ``FileSystemReader`` (of a sharded checkpoint's directory) whose ``read_metadata`` runs no code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's ``Metadata``, read as ``FileSystemReader`` reads it, without ``pickle.load``."""
        rank = kwargs.get("rank")
        directory = Path(self.path)
        name = SHARDED_METADATA if rank is None else f"__{rank}{SHARDED_METADATA}"
        with open(directory / name, "rb") as file:
            metadata = read_metadata(file, directory)
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata
