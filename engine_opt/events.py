"""``OptimEvents``: the optimizer events of one update, for Ignite handlers.

``create_trainer`` registers them on its engine; the wrappers fire them
through step hooks, so they fire whoever calls ``update_params`` (the default
process function, a custom ``train_step``, an MMEngine model's ``train_step``).

Example:
    >>> from ignite.engine import Engine
    >>> engine = Engine(lambda engine, batch: None)
    >>> engine.register_events(*OptimEvents, event_to_attr=EVENT_TO_ATTR)
    >>> OptimEvents.OPTIM_STEP_COMPLETED.value, EVENT_TO_ATTR[OptimEvents.OPTIM_STEP_COMPLETED]
    ('optim_step_completed', 'optim_updates')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ignite.engine import Engine, EventEnum

if TYPE_CHECKING:
    from .wrapper import OptimWrapper


class OptimEvents(EventEnum):
    """Events fired around each optimizer update, and the ``engine.state`` counter each one advances.

    The event map of one trainer iteration (filters such as ``every=10``
    count with the event's counter)::

        ITERATION_STARTED
          with wrapper.optim_context(model):      # autocast; no DDP/FSDP grad sync mid-window
              loss = loss_fn(model(x), y)
          (loss / window_size).backward()
                         -> BACKWARD_COMPLETED     state.optim_backwards += 1
          if the window ends:
              unscale the gradients (fp16), clip them
                         -> BEFORE_OPTIM_STEP      state.optim_steps += 1
                            (gradients complete and unscaled: log norms, guard,
                             wrapper.cancel_step() to veto the update)
              optimizer.step()  (skipped by the fp16 scaler for non-finite gradients, or vetoed)
                         -> OPTIM_STEP_COMPLETED   state.optim_updates += 1   (an update was applied)
                         or OPTIM_STEP_SKIPPED     state.optim_skipped += 1   (no update)
              optimizer.zero_grad()
        ITERATION_COMPLETED

    While an event is handled, ``engine.state.optim_name`` names the wrapper
    (its key in an ``OptimWrapperDict``, ``None`` for a single wrapper) and
    ``engine.state.optim_wrapper`` is that wrapper; at ``BACKWARD_COMPLETED``,
    ``engine.state.optim_loss`` is the loss given to ``backward`` (divided by
    the window size; times the loss scale under float16).
    ``engine.state.optim_members`` maps every name to its wrapper. The
    counters start, on each run, from the wrappers' own counts, so they
    continue across a resume.
    """

    BACKWARD_COMPLETED = "backward_completed"
    BEFORE_OPTIM_STEP = "before_optim_step"
    OPTIM_STEP_COMPLETED = "optim_step_completed"
    OPTIM_STEP_SKIPPED = "optim_step_skipped"


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
        return vars(engine.state).get("optim_name") == name

    return passes


def current_member(engine: Engine) -> tuple[str | None, OptimWrapper]:
    """The name (``None`` for a single wrapper) and wrapper of the event being handled."""
    state = vars(engine.state)
    return state["optim_name"], state["optim_wrapper"]
