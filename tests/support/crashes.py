"""Crashes injected at each stage of a checkpoint save, for the tests: a process dying there, simulated in-process.

``crash_at(stage)`` makes the next save die at ``stage``: while writing (half
a file written), at the file's ``fsync``, at the rename, at the directory's
``fsync``, or while removing a rotated-out file. ``Crash`` derives from
``BaseException``, so no ``except Exception`` on the way catches it, as
nothing catches a ``SIGKILL``: what is on disk stays as the dead process left it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

STAGES = ("write", "fsync_file", "rename", "fsync_dir", "remove")
RENAMED = {"fsync_dir", "remove"}  # stages that come after the new file took its name


class Crash(BaseException):
    """The process died here."""


@contextmanager
def crash_at(stage: str | None) -> Iterator[None]:
    if stage is None:
        yield
        return
    real_save, real_fsync, real_unlink = torch.save, os.fsync, Path.unlink
    fsyncs = []

    def save(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(max(1, file.tell() // 2))  # half the bytes reached the disk
        raise Crash(stage)

    def fsync(descriptor):
        fsyncs.append(descriptor)
        if (stage, len(fsyncs)) in (("fsync_file", 1), ("fsync_dir", 2)):
            raise Crash(stage)
        real_fsync(descriptor)

    def replace(source, target):
        raise Crash(stage)

    def unlink(path, missing_ok=False):
        if path.name.startswith("checkpoint_"):
            raise Crash(stage)
        real_unlink(path, missing_ok=missing_ok)

    patches = {"write": (torch, "save", save), "rename": (os, "replace", replace), "remove": (Path, "unlink", unlink)}
    target = patches.get(stage, (os, "fsync", fsync))
    with mock.patch.object(*target):
        yield
