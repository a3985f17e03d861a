"""``OptimEvents``: the optimizer events of one update, for Ignite handlers.

``create_trainer`` registers them on its engine and fires each one from the
wrapper's step hook of the same name (``StepEvent``), so they fire whoever
calls ``update_params`` (the default process function, a custom
``train_step``, an MMEngine model's ``train_step``).

Examples:
    >>> from ignite.engine import Engine
    >>> engine = Engine(lambda engine, batch: None)
    >>> engine.register_events(*OptimEvents, event_to_attr=EVENT_TO_ATTR)
    >>> event = OptimEvents.OPTIM_STEP_COMPLETED
    >>> event.value, EVENT_TO_ATTR[event]
    ('optim_step_completed', 'optim_updates')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, EventEnum

from ..optim import checks
from ..optim.hooks import StepEvent
from ..optim.wrapper import OptimWrapper


class OptimEvents(EventEnum):
    """Events fired around each optimizer update, and the ``engine.state`` counter each one advances.

    The event map of one trainer iteration (filters such as ``every=10``
    count with the event's counter)::

        ITERATION_STARTED
          with wrapper.optim_context(model):      # autocast; no DDP/FSDP grad sync mid-window
              loss = loss_fn(model(x), y)
          (loss / window_size).backward()
                         -> BACKWARD_COMPLETED     state.optim_backwards
          if the window ends:
              unscale the gradients (fp16)
                         -> BEFORE_OPTIM_STEP      state.optim_steps
                            (gradients complete, unscaled, not yet clipped: log norms,
                             guard, wrapper.cancel_step() to veto the update)
              clip the gradients
              optimizer.step()  (skipped by the fp16 scaler for non-finite gradients, or vetoed)
                         -> OPTIM_STEP_COMPLETED   state.optim_updates   (an update was applied)
                         or OPTIM_STEP_SKIPPED     state.optim_skipped   (no update)
              optimizer.zero_grad()
        ITERATION_COMPLETED

    While an event is handled, ``engine.state.optim`` (an ``OptimState``)
    says which member it is about: ``name`` (its key in an
    ``OptimWrapperDict``, ``None`` for a single wrapper), ``wrapper``, and at
    ``BACKWARD_COMPLETED`` the ``loss`` given to ``backward`` (divided by the
    window size; times the loss scale under float16). The counters are the
    sums of the wrappers' own counts, so they continue across a resume. An
    event without handlers is not fired and costs nothing.
    """

    BACKWARD_COMPLETED = "backward_completed"
    BEFORE_OPTIM_STEP = "before_optim_step"
    OPTIM_STEP_COMPLETED = "optim_step_completed"
    OPTIM_STEP_SKIPPED = "optim_step_skipped"

    @classmethod
    def of(cls, event: StepEvent) -> OptimEvents:
        """The Ignite event fired for the wrapper's step event ``event``.

        Examples:
            >>> OptimEvents.of(StepEvent.BEFORE_OPTIM_STEP) is OptimEvents.BEFORE_OPTIM_STEP
            True
        """
        return cls[event.name]


EVENT_TO_ATTR: dict[Any, str] = {
    OptimEvents.BACKWARD_COMPLETED: "optim_backwards",
    OptimEvents.BEFORE_OPTIM_STEP: "optim_steps",
    OptimEvents.OPTIM_STEP_COMPLETED: "optim_updates",
    OptimEvents.OPTIM_STEP_SKIPPED: "optim_skipped",
}


MEMBER_COUNTS: dict[StepEvent, Callable[[OptimWrapper], int]] = {
    StepEvent.BACKWARD_COMPLETED: lambda wrapper: wrapper.inner_count,
    StepEvent.BEFORE_OPTIM_STEP: lambda wrapper: wrapper.step_count,
    StepEvent.OPTIM_STEP_COMPLETED: lambda wrapper: wrapper.applied_steps,
    StepEvent.OPTIM_STEP_SKIPPED: lambda wrapper: wrapper.skipped_steps,
}
"""One member's own count of each event: what the engine's counters (``EVENT_TO_ATTR``) sum over members."""


def member_filter(name: str | None = None, every: int = 1) -> Callable[[Engine, Any], bool]:
    """An event filter for ``OptimEvents``: one member's events, or every member's, each ``every``-th of its own.

    ``every`` counts with the member's own count (its applied updates at
    ``OPTIM_STEP_COMPLETED``), where ``OptimEvents.X(every=n)`` counts the
    events of all members together: with two members, ``member_filter(every=10)``
    passes each member's 10th, 20th... update, ``every=10`` the 10th, 20th...
    of both, which may all be one member's.

    Args:
        name: The member (its key in the ``OptimWrapperDict``); ``None``:
            every member (the one of a single wrapper).
        every: Pass the member's events whose own count is a multiple of this.

    Examples:
        >>> completed = OptimEvents.OPTIM_STEP_COMPLETED
        >>> gen_events = completed(event_filter=member_filter("gen"))
        >>> each_10th = completed(event_filter=member_filter(every=10))
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a member's name (a str) or None, got {checks.describe(name)}")
    checks.positive_int("every", every)

    def passes(engine: Engine, _: Any) -> bool:
        optim = getattr(engine.state, "optim", None)
        if optim is None or optim.wrapper is None or (name is not None and optim.name != name):
            return False
        return every == 1 or optim.event is None or MEMBER_COUNTS[optim.event](optim.wrapper) % every == 0

    return passes
