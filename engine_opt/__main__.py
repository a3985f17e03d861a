"""``python -m engine_opt``: the ``engine-opt`` command."""

from .app.cli import main

raise SystemExit(main())
