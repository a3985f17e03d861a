"""``launch_ranks``: spawn the ranks of ``engine-opt train --nproc-per-node N`` and wait for them.

A terminal's Ctrl-C reaches the launcher and every rank. The ranks must stop
together at an iteration's end with a checkpoint (``StopOnSignal``), so none
may die of it while it starts: they are spawned while the launcher ignores
SIGINT, and inherit that. Once they exist the launcher notes SIGINT in an
event the ranks read at each iteration's end, so a Ctrl-C while they import,
build and resume is not lost. The launcher waits for the ranks either way.
Ranks that stopped together on a signal end normally and leave the exit
status (130, 143) to the launcher: none ends first and has the others
terminated before rank 0 has reported.

Example:
    >>> import multiprocessing
    >>> stop = multiprocessing.get_context("spawn").Event()
    >>> previous = signal.signal(signal.SIGINT, _noting(stop))
    >>> signal.raise_signal(signal.SIGINT)
    >>> stop.is_set()
    True
    >>> _ = signal.signal(signal.SIGINT, previous)
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from types import FrameType

from ignite.distributed.launcher import Parallel


@dataclass(frozen=True)
class RankLink:
    """What the launcher shares with the ranks it spawns.

    Attributes:
        stop: Set by the launcher when it receives SIGINT; the ranks stop at their next iteration's end.
        status: The exit status of a run the ranks stopped together on a signal (130, 143); else 0.
    """

    stop: Event
    status: Synchronized[int]


Worker = Callable[[int, argparse.Namespace, RankLink | None], None]


def launch_ranks(worker: Worker, args: argparse.Namespace, backend: str, processes: int) -> int:
    """Run ``worker(local_rank, args, link)`` in ``processes`` spawned ranks; the status they left in ``link``.

    A rank's failure comes as Ignite's launch raises it (``ProcessExitedException``).
    """
    context = multiprocessing.get_context("spawn")
    link = RankLink(context.Event(), context.Value("i", 0))
    errors: list[BaseException] = []

    def launch() -> None:
        try:
            with Parallel(backend=backend, nproc_per_node=processes) as parallel:
                parallel.run(worker, args, link)
        except BaseException as error:  # handed to the main thread, which raises it
            errors.append(error)

    thread = threading.Thread(target=launch, name="engine-opt launcher")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the ranks spawned meanwhile
    try:
        thread.start()
        _wait_until_spawned(thread, processes)
        signal.signal(signal.SIGINT, _noting(link.stop))
        thread.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    if errors:
        raise errors[0]
    return int(link.status.value)


def _wait_until_spawned(thread: threading.Thread, processes: int) -> None:
    """Return when ``processes`` children run (or the launch ended): their SIGINT disposition is set."""
    while thread.is_alive() and len(multiprocessing.active_children()) < processes:
        time.sleep(0.005)


def _noting(stop: Event) -> Callable[[int, FrameType | None], None]:
    """A SIGINT handler that sets ``stop`` instead of raising ``KeyboardInterrupt``."""

    def note(number: int, frame: FrameType | None) -> None:
        stop.set()

    return note
