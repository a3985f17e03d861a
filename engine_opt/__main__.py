"""``python -m engine_opt``: the ``engine-opt`` command."""

from .app.cli import entry

entry()
