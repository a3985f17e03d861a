"""``python -m engine_opt``: the ``engine-opt`` command."""

from .cli import main

raise SystemExit(main())
