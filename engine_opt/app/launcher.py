"""``launch_ranks``: spawn the ranks of ``engine-opt train --nproc-per-node N`` and wait for them.

A terminal's Ctrl-C reaches the launcher and every rank. The ranks must stop
together at an iteration's end with a checkpoint (``StopOnSignal``), so none
may die of it while it starts: they are spawned while the launcher ignores
SIGINT, and inherit that. Once they exist the launcher notes SIGINT, and
SIGTERM (sent to it alone, by ``kill`` or a supervisor), in a shared number
the ranks read at each iteration's end, so a signal while they import, build
and resume is not lost, and the launcher waits for them to stop. A second
signal sends the ranks SIGTERM unless one has left its training loop (a rank
stuck before training ends; one training stops at the iteration's end as
before), a third kills them; a rank whose launcher was killed outright stops
at its next iteration's end as on SIGTERM. Ranks that
stopped together on a signal end normally and leave its exit status (130,
143) to the launcher: none ends first and has the others terminated before
rank 0 has reported.

Examples:
    >>> import multiprocessing
    >>> link = RankLink.create()
    >>> previous = signal.signal(signal.SIGINT, _StopRequests(link, ranks=[]))
    >>> signal.raise_signal(signal.SIGINT)
    >>> signal.Signals(link.requested.value).name
    'SIGINT'
    >>> _ = signal.signal(signal.SIGINT, previous)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Protocol

from ignite.distributed.launcher import Parallel

from .signals import StopNow


class SharedInt(Protocol):
    """An integer in memory the launcher and its ranks share (``multiprocessing.Value``)."""

    value: int


@dataclass(frozen=True)
class RankLink:
    """What the launcher shares with the ranks it spawns: three integers in shared memory.

    Attributes:
        requested: The number of the signal the launcher received (0: none); the ranks stop at their next
            iteration's end.
        over: Set once a rank has left its training loop: it is saving or ending, not to be terminated.
        status: The exit status of a run the ranks stopped together on a signal (130, 143); else 0.
        launcher: The launcher's process id (the ranks' parent while it lives).
    """

    requested: SharedInt
    over: SharedInt
    status: SharedInt
    launcher: int

    @classmethod
    def create(cls) -> RankLink:
        """Three zeros in memory that ranks spawned from this process share, and this process's id."""
        context = multiprocessing.get_context("spawn")
        requested, over, status = (context.Value("i", 0, lock=False) for _ in range(3))
        return cls(requested, over, status, os.getpid())


class FromLauncher:
    """A spawned rank's side of its ``RankLink``: the ``StopRequest`` its ``StopOnSignal`` reads.

    The launcher gone (killed outright) stands for SIGTERM: the rank stops at the iteration's end with a
    checkpoint rather than train on as an orphan.
    """

    def __init__(self, link: RankLink) -> None:
        self.link = link

    @property
    def value(self) -> int:
        requested = self.link.requested.value
        if not requested and os.getppid() != self.link.launcher:
            return int(signal.SIGTERM)
        return requested

    def training_over(self) -> None:
        self.link.over.value = 1


Worker = Callable[[int, argparse.Namespace, RankLink | None], None]


def rendezvous_port() -> int:
    """Where the ranks meet: ``MASTER_PORT`` if the environment sets it, else a port free on this machine now.

    Ignite's default is one fixed port, so two runs started at once on one
    machine collided on it (the second failed with ``EADDRINUSE``).

    Examples:
        >>> 0 < rendezvous_port() < 65536
        True
    """
    if os.environ.get("MASTER_PORT"):
        return int(os.environ["MASTER_PORT"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def launch_ranks(worker: Worker, args: argparse.Namespace, backend: str, processes: int) -> int:
    """Run ``worker(local_rank, args, link)`` in ``processes`` spawned ranks; the status they left in ``link``.

    A rank's failure comes as Ignite's launch raises it (``ProcessExitedException``); ranks the launcher
    ended on a second signal as ``StopNow``.
    """
    link = RankLink.create()
    port = rendezvous_port()
    errors: list[BaseException] = []

    def launch() -> None:
        try:
            with Parallel(backend=backend, nproc_per_node=processes, master_port=port) as parallel:
                parallel.run(worker, args, link)
        except BaseException as error:  # handed to the main thread, which raises it
            errors.append(error)

    thread = threading.Thread(target=launch, name="engine-opt launcher")
    others = set(multiprocessing.active_children())
    requests = _StopRequests(link, ranks=[])
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the ranks spawned meanwhile
    signal.signal(signal.SIGTERM, requests)  # not inherited: theirs stays the default
    try:
        thread.start()
        requests.ranks = _spawned(thread, others, processes)
        signal.signal(signal.SIGINT, requests)
        thread.join()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if errors and requests.interrupts >= 2 and link.requested.value:  # the ranks were stopped at once, as asked
        raise StopNow(signal.Signals(link.requested.value).name) from errors[0]
    if errors:
        raise errors[0]
    return int(link.status.value)


def _spawned(thread: threading.Thread, others: set[BaseProcess], processes: int) -> list[BaseProcess]:
    """The rank processes, once ``processes`` of them run (or the launch ended); ``others`` are not ranks."""
    while True:
        ranks = [child for child in multiprocessing.active_children() if child not in others]
        if len(ranks) >= processes or not thread.is_alive():
            return ranks
        time.sleep(0.005)


class _StopRequests:
    """The launcher's handler: note the first signal for the ranks; on a second, terminate them unless one has
    left training (it saves), on a third, kill them."""

    def __init__(self, link: RankLink, ranks: Sequence[BaseProcess]) -> None:
        self.link = link
        self.ranks = ranks
        self.interrupts = 0

    def __call__(self, number: int, frame: FrameType | None) -> None:
        if not self.link.requested.value:
            self.link.requested.value = number
        self.interrupts += 1
        if self.interrupts == 2 and not self.link.over.value:  # none has left training: one is stuck before it
            for rank in self.ranks:
                rank.terminate()
        elif self.interrupts > 2:
            for rank in self.ranks:
                rank.kill()
