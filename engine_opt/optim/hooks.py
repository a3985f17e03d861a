"""``StepEvent``: the moments of one update that a wrapper reports to its step hooks.

The core's own, framework-free events: a hook registered with
``OptimWrapper.register_step_hook`` is called as ``hook(wrapper, event, loss)``.
The Ignite layer maps each one to an ``OptimEvents`` member of the same name.

Examples:
    >>> [event.value for event in StepEvent]  # doctest: +NORMALIZE_WHITESPACE
    ['backward_completed', 'before_optim_step', 'optim_step_completed',
     'optim_step_skipped']
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch.utils.hooks import RemovableHandle

from . import checks

if TYPE_CHECKING:
    from .wrapper import OptimWrapper


class StepEvent(enum.Enum):
    """One moment of an update, in the order they happen.

    ``BACKWARD_COMPLETED`` after each micro-step's backward (the hook gets
    the loss given to it); at the end of a window ``BEFORE_OPTIM_STEP`` (the
    gradients are complete and unscaled, not yet clipped; ``wrapper.cancel_step()``
    vetoes the update), then ``OPTIM_STEP_COMPLETED`` if the update was
    applied or ``OPTIM_STEP_SKIPPED`` if it was not.
    """

    BACKWARD_COMPLETED = "backward_completed"
    BEFORE_OPTIM_STEP = "before_optim_step"
    OPTIM_STEP_COMPLETED = "optim_step_completed"
    OPTIM_STEP_SKIPPED = "optim_step_skipped"


StepHook = Callable[["OptimWrapper", StepEvent, "torch.Tensor | None"], None]


class StepHooks:
    """The step hooks of one wrapper, kept per event so an event nobody listens to costs one dict lookup.

    Examples:
        >>> hooks = StepHooks()
        >>> before, backward = StepEvent.BEFORE_OPTIM_STEP, StepEvent.BACKWARD_COMPLETED
        >>> handle = hooks.add(lambda wrapper, event, loss: None, [before])
        >>> bool(hooks.table(before)), bool(hooks.table(backward))
        (True, False)
        >>> handle.remove()
        >>> bool(hooks.table(StepEvent.BEFORE_OPTIM_STEP))
        False
    """

    # What BEFORE_OPTIM_STEP hooks said of the step: None outside them, True (skip), a device flag, or False.
    # A class default too: a wrapper pickled before the veto lived here unpickles hooks without it.
    _veto: bool | torch.Tensor | None = None

    def __init__(self) -> None:
        self._by_event: dict[StepEvent, OrderedDict[int, StepHook]] = {event: OrderedDict() for event in StepEvent}

    def add(self, hook: StepHook, events: Iterable[StepEvent] | None = None) -> RemovableHandle:
        """Call ``hook`` at each of ``events`` (all of them by default); the handle's ``remove()`` undoes it."""
        if not callable(hook):
            raise TypeError(f"hook must be callable as hook(wrapper, event, loss), got {checks.describe(hook)}")
        chosen = list(StepEvent) if events is None else list(events)
        wrong = [event for event in chosen if not isinstance(event, StepEvent)]
        if wrong or not chosen:
            raise TypeError(f"events must be StepEvent members (e.g. StepEvent.BEFORE_OPTIM_STEP), got {chosen!r}")
        tables = [self._by_event[event] for event in dict.fromkeys(chosen)]
        handle = RemovableHandle(tables[0], extra_dict=tables[1:])
        for table in tables:
            table[handle.id] = hook
        return handle

    def table(self, event: StepEvent) -> Mapping[int, StepHook]:
        """The live hooks of ``event``: empty (false) while none waits, so a hot path can test it directly."""
        return self._by_event[event]

    def call(self, wrapper: OptimWrapper, event: StepEvent, loss: torch.Tensor | None) -> None:
        """Call the hooks of ``event`` in the order they were added."""
        for hook in tuple(self._by_event[event].values()):
            hook(wrapper, event, loss)

    def call_before_step(self, wrapper: OptimWrapper) -> bool | torch.Tensor:
        """Call the ``BEFORE_OPTIM_STEP`` hooks; whether they vetoed the step (a device flag if they said so)."""
        self._veto = False
        try:
            self.call(wrapper, StepEvent.BEFORE_OPTIM_STEP, None)
            return self._veto
        finally:
            self._veto = None

    def veto(self, when: torch.Tensor | None = None) -> None:
        """Skip the step whose ``BEFORE_OPTIM_STEP`` hooks are being called: always, or where ``when`` is true.

        ``OptimWrapper.cancel_step`` says what skipping means. Several vetoes:
        skipped if any says so (device flags are or-ed on the device).

        Raises:
            RuntimeError: Outside ``call_before_step``.
            TypeError: ``when`` is not a one-element boolean tensor.
        """
        if self._veto is None:
            raise RuntimeError("cancel_step() can only be called from a step hook handling StepEvent.BEFORE_OPTIM_STEP")
        if when is None:
            self._veto = True
            return
        if not isinstance(when, torch.Tensor) or when.dtype != torch.bool or when.numel() != 1:
            raise TypeError(f"when must be a one-element bool tensor (e.g. norm > limit), got {checks.describe(when)}")
        flag = when.detach().reshape(())
        if self._veto is False:
            self._veto = flag
        elif self._veto is not True:
            self._veto = self._veto | flag.to(self._veto.device)
