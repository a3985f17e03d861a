"""The old path of ``engine_opt.checkpoint.sharded_files``: its names, with a ``DeprecationWarning``.

Sharded checkpoint files were here before checkpoints had a package of their own.
"""

from __future__ import annotations

from typing import Any

from ..moved import find_moved


def __getattr__(name: str) -> Any:
    """A name of ``engine_opt.checkpoint.sharded_files``, where this module moved (``engine_opt.moved``)."""
    return find_moved(__name__, name, "engine_opt.checkpoint.sharded_files")
