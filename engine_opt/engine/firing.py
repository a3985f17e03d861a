"""``fire_registered``: fire an event the engine registered, skipping Ignite's registration check.

The one place that uses a private name of Ignite. ``Engine.fire_event``
first checks that the event is registered, a linear scan of the engine's
events with a Python ``__eq__`` per entry: about 9 us per call on the
project's 2-core CI machine, against about 5 us for the dispatch itself
(``docs/benchmarks.md``). An optimizer event fires once per update when a
handler listens, so the check would cost more than dispatching. The trainer
registered these events itself, so it calls the dispatcher, ``_fire_event``,
directly; where that is missing, it falls back to ``fire_event``.
``tests/test_firing.py`` fails when Ignite changes it.

Example:
    >>> from ignite.engine import Engine, Events
    >>> engine = Engine(lambda engine, batch: None)
    >>> seen = []
    >>> _ = engine.add_event_handler(Events.STARTED, lambda: seen.append("started"))
    >>> fire_registered(engine, Events.STARTED)
    >>> seen
    ['started']
"""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine


def fire_registered(engine: Engine, event: Any) -> None:
    """Run ``engine``'s handlers of ``event``, which the caller knows is registered on it."""
    dispatch = getattr(engine, "_fire_event", None)
    if dispatch is None:
        engine.fire_event(event)
    else:
        dispatch(event)
