"""The ``engine-opt`` executable's first step: its arguments, then the command, and a Ctrl-C while it loads.

Nothing heavy is imported here: the arguments are parsed first
(``arguments``, which imports no torch), so ``--help``, ``--version`` and a
refused argument answer at once; then the command's modules load, where an
interrupt is answered with exit status 130 rather than a traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Load the command and run it (``engine_opt.app.cli.entry``)."""
    try:
        from .arguments import build_parser

        build_parser().parse_args()  # --help, --version and refused arguments end here, before torch loads
        from .cli import entry
    except KeyboardInterrupt:
        print("engine-opt: interrupted by SIGINT while starting; nothing was run", file=sys.stderr)
        raise SystemExit(130) from None
    entry()
