"""``StopOnSignal``: Ctrl-C (SIGINT) or SIGTERM ends ``engine-opt train`` at an iteration's end, with a checkpoint.

While the run lasts, the command's handlers only note the signal; at the end
of the iteration in progress the trainer terminates, and the checkpoint
handler saves that iteration (mid-window too: the wrapper's state holds the
window's gradients) as it does when a run completes. In a multi-process run
the ranks agree after every iteration (one all-reduce of one number, over a
CPU ``gloo`` group: no GPU synchronisation), so all stop at the same one.
The handlers are the command's own, installed for the run and put back after.
Ranks spawned by the command start with SIGINT ignored; the launcher notes
it (and a SIGTERM sent to it) for them (``requested``), so a Ctrl-C while
they start is not lost: it stops the run at its first iteration's end.
In one process, a second signal while the iteration has not ended (a step
that stalls) raises ``StopNow`` there: the command stops at once, with the
checkpoints saved before; once the iteration has ended, the final save is
let finish. (The launcher of several ranks escalates on its own.)

Examples:
    >>> import signal
    >>> from ignite.engine import Engine
    >>> def step(engine, batch):
    ...     if batch == 2:
    ...         signal.raise_signal(signal.SIGINT)
    >>> engine = Engine(step)
    >>> with StopOnSignal(engine) as stop:
    ...     state = engine.run([1, 2, 3, 4])
    >>> stop.received, state.iteration
    ('SIGINT', 2)
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any, Protocol

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from ..optim.distributed import world_size

EXIT_STATUS = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report it


class StopNow(KeyboardInterrupt):
    """A second signal came while the run waited for its iteration's end: the command stops at once, unsaved.

    Attributes:
        signal_name: The signal (``'SIGINT'``, ``'SIGTERM'``).
        iteration: The iteration it interrupted (``None`` where unknown: the ranks of a launcher).
    """

    def __init__(self, signal_name: str, iteration: int | None = None) -> None:
        super().__init__(signal_name, iteration)
        self.signal_name = signal_name
        self.iteration = iteration


class StopRequest(Protocol):
    """What a spawned rank reads from its launcher, and tells it."""

    @property
    def value(self) -> int:
        """The number of the signal the launcher received (or that stands for its end); 0 for none."""

    def training_over(self) -> None:
        """Tell the launcher this rank has left its training loop (so it is not terminated while it saves)."""


class StopOnSignal:
    """Stop ``trainer`` at the end of the iteration in progress when SIGINT or SIGTERM arrives.

    Args:
        trainer: The engine to stop.
        requested: The signal the launcher of this rank received (0: none); read at each iteration's end.

    Attributes:
        received: The name of the signal that stopped the run (``None`` if none did).
    """

    def __init__(self, trainer: Engine, requested: StopRequest | None = None) -> None:
        self.trainer = trainer
        self.requested = requested
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._ending = False  # the iteration has ended: the run terminates and saves

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._note)
        if world_size() > 1:
            self._group = dist.new_group(backend="gloo")  # a collective call: every rank enters
        self.trainer.add_event_handler(Events.ITERATION_COMPLETED, self._stop_if_signalled)
        self.trainer.add_event_handler(Events.COMPLETED, self._end)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.trainer.remove_event_handler(self._stop_if_signalled, Events.ITERATION_COMPLETED)
        self.trainer.remove_event_handler(self._end, Events.COMPLETED)
        if self.requested is not None:
            self.requested.training_over()
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        if self._group is not None:
            dist.destroy_process_group(self._group)

    @property
    def exit_status(self) -> int:
        """The status the command exits with after the signal (0 if none came)."""
        return 0 if self.received is None else EXIT_STATUS[self.received]

    def _note(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.received is None:  # the first signal is the one the run reports
            self.received = name
        elif self.requested is None and not self._ending:  # one process, an iteration that does not end
            raise StopNow(name, self.trainer.state.iteration)

    def _end(self, engine: Engine) -> None:
        """The run is over: a signal from here on (while it saves and closes its logs) is only noted."""
        self._ending = True

    def _stop_if_signalled(self, engine: Engine) -> None:
        if self.received is None and self.requested is not None and self.requested.value:
            self.received = signal.Signals(self.requested.value).name
        received = self.received
        if self._group is not None:  # every rank learns what any rank received
            codes = torch.tensor([list(EXIT_STATUS).index(received) + 1 if received else 0])
            dist.all_reduce(codes, op=dist.ReduceOp.MAX, group=self._group)
            received = list(EXIT_STATUS)[int(codes) - 1] if int(codes) else None
            if received is None:  # a signal noted while the ranks agreed is kept: they agree on it next time
                return
            self.received = received
        if received is not None:
            self._ending = True
            engine.terminate()
