"""The only two places the project touches Ignite's private names, each fenced with a fallback.

- ``fire_registered``: ``Engine.fire_event`` first checks that the event is
  registered, a linear scan of the engine's events with a Python ``__eq__``
  per entry: 14.0 us per call on the project's 2-core CI machine, against
  5.2 us for the dispatch itself (``docs/benchmarks.md``). An optimizer event
  fires once per update when a handler listens, so the check would cost more
  than dispatching. The trainer registered these events itself, so it calls
  the dispatcher, ``_fire_event``, directly; where that is missing, it falls
  back to ``fire_event``.
- ``forget_failed_run``: after a run raised, Ignite 0.5 keeps the run's
  finished generator (``_internal_run_generator``), and the next ``run()``
  returns ``None`` at once instead of training (a resume after a crash in the
  same process would silently do nothing). The trainer drops it; where the
  attribute is missing there is nothing to drop.

``tests/engine/test_ignite_internals.py`` fails when Ignite changes either.

Examples:
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


def forget_failed_run(engine: Engine) -> None:
    """After ``engine.run`` raised: let the next ``run()`` start (or resume) a run instead of returning ``None``."""
    if getattr(engine, "_internal_run_generator", None) is not None:
        engine._internal_run_generator = None
