"""StopOnSignal in a run of several ranks: a signal that arrives while the ranks agree is kept, not lost."""

from __future__ import annotations

import signal

from ignite.engine import Engine

from engine_opt.app import signals
from engine_opt.app.signals import StopOnSignal


def test_a_signal_arriving_while_the_ranks_agree_stops_the_run_at_the_next_iteration(monkeypatch):
    # two ranks, as far as StopOnSignal can tell: its own process group, and an agreement where no other rank
    # ever received a signal; this rank's SIGINT is delivered while it waits in the first agreement
    monkeypatch.setattr(signals, "world_size", lambda: 2)
    monkeypatch.setattr(signals.dist, "new_group", lambda backend: "gloo group")
    monkeypatch.setattr(signals.dist, "destroy_process_group", lambda group: None)
    agreements = []

    def all_reduce(codes, op, group):
        agreements.append(int(codes))
        if len(agreements) == 1:
            signal.raise_signal(signal.SIGINT)  # handled by StopOnSignal's handler, now, in the wait

    monkeypatch.setattr(signals.dist, "all_reduce", all_reduce)
    engine = Engine(lambda engine, batch: None)
    with StopOnSignal(engine) as stop:
        state = engine.run(range(5))
    assert agreements == [0, 1]  # nothing at the first agreement; this rank brings SIGINT to the second
    assert (stop.received, state.iteration, stop.exit_status) == ("SIGINT", 2, 130)
