"""``python -m engine_opt``: the ``engine-opt`` command."""

from .app.start import main

main()
