"""The ``engine-opt`` executable's first step: a Ctrl-C while torch and Ignite load ends with one line.

Nothing heavy is imported here: the command's modules load inside ``main``,
where an interrupt is answered with exit status 130 rather than a traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Load the command and run it (``engine_opt.app.cli.entry``)."""
    try:
        from .cli import entry
    except KeyboardInterrupt:
        print("engine-opt: interrupted by SIGINT while starting; nothing was run", file=sys.stderr)
        raise SystemExit(130) from None
    entry()
