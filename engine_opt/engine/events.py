"""``OptimEvents``: the optimizer events of one update, for Ignite handlers.

``create_trainer`` registers them on its engine and fires each one from the
wrapper's step hook of the same name (``StepEvent``), so they fire whoever
calls ``update_params`` (the default process function, a custom
``train_step``, an MMEngine model's ``train_step``).

Example:
    >>> from ignite.engine import Engine
    >>> engine = Engine(lambda engine, batch: None)
    >>> engine.register_events(*OptimEvents, event_to_attr=EVENT_TO_ATTR)
    >>> OptimEvents.OPTIM_STEP_COMPLETED.value, EVENT_TO_ATTR[OptimEvents.OPTIM_STEP_COMPLETED]
    ('optim_step_completed', 'optim_updates')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, EventEnum

from ..optim.hooks import StepEvent


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

        Example:
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


def member_filter(name: str) -> Callable[[Engine, Any], bool]:
    """An event filter that passes only the events of one ``OptimWrapperDict`` member.

    Example:
        >>> event = OptimEvents.OPTIM_STEP_COMPLETED(event_filter=member_filter("gen"))
    """

    def passes(engine: Engine, _: Any) -> bool:
        optim = getattr(engine.state, "optim", None)
        return optim is not None and optim.name == name

    return passes
