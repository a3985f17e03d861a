"""``NonFiniteGuard``: never apply an update from a non-finite loss or gradient.

A float16 grad scaler already skips such steps; in float32 and bfloat16
nothing does, and one ``nan`` (spread to every gradient by
``clip_grad_norm_``) would poison the weights and the optimizer state. A
scaler that skips step after step (its loss scale collapsing towards zero)
is reported too.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from ignite.engine import Engine

from ..engine.events import OptimEvents
from ..engine.state import optim_state
from ..optim import checks, distributed
from ..optim.finite import grads_finite
from ..optim.wrapper import OptimWrapper

_ACTIONS = ("skip", "stop")


class NonFiniteGuard:
    """Skip (or stop at) any update whose window had a non-finite loss or gradient.

    The losses of a window are checked on the device as they come
    (``BACKWARD_COMPLETED``); at ``BEFORE_OPTIM_STEP`` the gradients are
    checked too and the result is read once per update (one host sync). A bad
    update is cancelled: the optimizer does not step, the gradients are
    zeroed, and the step counts in the wrapper's ``skipped_steps`` (and fires
    ``OPTIM_STEP_SKIPPED``). In a distributed run the ranks decide together
    (one small all-reduce per update), so they never diverge.

    Members with a float16 grad scaler are left to it: it skips bad steps and
    lowers the scale. But ``max_scaler_skips`` skipped steps in a row mean
    the scale has collapsed and training has stalled: ``'stop'`` raises
    ``FloatingPointError``, ``'skip'`` warns (``RuntimeWarning``) once per
    such streak.

    Args:
        action: ``'skip'`` to drop the update and go on, or ``'stop'`` to drop
            it and raise ``FloatingPointError`` naming the iteration.
        max_scaler_skips: Consecutive skipped float16 steps that count as a
            collapsed loss scale.

    Attributes:
        skipped: Updates cancelled so far, by member name (``None`` for one wrapper).
        scaler_streaks: Current run of consecutive skipped steps of each
            float16 member, by name.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from engine_opt import OptimWrapper, create_trainer
        >>> model = torch.nn.Linear(1, 1)
        >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> trainer = create_trainer(model, wrapper, F.mse_loss)
        >>> guard = NonFiniteGuard("skip")
        >>> guard.attach(trainer)
        >>> x = torch.ones(1, 1)
        >>> data = [(x, torch.zeros(1, 1)), (x, torch.full((1, 1), float("nan")))]
        >>> _ = trainer.run(data)
        >>> guard.skipped, wrapper.applied_steps, bool(model.weight.isfinite().all())
        ({None: 1}, 1, True)
    """

    def __init__(self, action: Literal["skip", "stop"] = "skip", *, max_scaler_skips: int = 20) -> None:
        if action not in _ACTIONS:
            raise ValueError(f"action must be one of {list(_ACTIONS)}, got {action!r}")
        self.action = action
        self.max_scaler_skips = checks.positive_int("max_scaler_skips", max_scaler_skips)
        self.skipped: dict[str | None, int] = {}
        self.scaler_streaks: dict[str | None, int] = {}
        self._loss_ok: dict[OptimWrapper, torch.Tensor] = {}

    def attach(self, engine: Engine) -> None:
        """Attach to a trainer built by ``create_trainer``."""
        optim_state(engine)  # refuses other engines
        engine.add_event_handler(OptimEvents.BACKWARD_COMPLETED, self._check_loss)
        engine.add_event_handler(OptimEvents.BEFORE_OPTIM_STEP, self._check_step)
        engine.add_event_handler(OptimEvents.OPTIM_STEP_SKIPPED, self._count_scaler_outcome, True)
        engine.add_event_handler(OptimEvents.OPTIM_STEP_COMPLETED, self._count_scaler_outcome, False)

    def _count_scaler_outcome(self, engine: Engine, skipped: bool) -> None:
        name, wrapper = optim_state(engine).member()
        scaler = wrapper.loss_scaler
        if scaler is None:
            return
        streak = self.scaler_streaks.get(name, 0) + 1 if skipped else 0
        self.scaler_streaks[name] = streak
        if streak != self.max_scaler_skips:
            return
        member = "" if name is None else f" of {name!r}"
        message = (
            f"the float16 loss scale{member} has collapsed: {streak} updates in a row skipped for non-finite "
            f"gradients (iteration {engine.state.iteration}, scale now {scaler.get_scale():.3g}); the loss or "
            "the model overflows or is nan; try bf16, a lower learning rate, or clipping"
        )
        if self.action == "stop":
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    @staticmethod
    def _unscaled_member(engine: Engine) -> tuple[str | None, OptimWrapper] | None:
        """The member of the event if the guard checks it: one without a float16 scaler."""
        name, wrapper = optim_state(engine).member()
        return None if wrapper.loss_scaler is not None else (name, wrapper)

    def _check_loss(self, engine: Engine) -> None:
        member = self._unscaled_member(engine)
        loss = optim_state(engine).loss
        if member is None or loss is None:
            return
        _, wrapper = member
        finite = torch.isfinite(loss.detach()).all()
        previous = self._loss_ok.get(wrapper)
        self._loss_ok[wrapper] = finite if previous is None else previous & finite

    def _check_step(self, engine: Engine) -> None:
        member = self._unscaled_member(engine)
        if member is None:
            return
        name, wrapper = member
        finite = grads_finite(wrapper.optimizer)
        loss_ok = self._loss_ok.pop(wrapper, None)
        if loss_ok is not None:
            finite = finite & loss_ok.to(finite.device)
        if bool(distributed.all_ranks_agree(finite)):
            return
        wrapper.cancel_step()
        self.skipped[name] = self.skipped.get(name, 0) + 1
        if self.action == "stop":
            where = "" if name is None else f" of {name!r}"
            raise FloatingPointError(
                f"non-finite loss or gradients{where} at iteration {engine.state.iteration}; "
                "the update was not applied (weights and optimizer state are unchanged)"
            )
