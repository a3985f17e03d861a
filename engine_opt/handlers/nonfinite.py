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

from .. import checks, parallel
from ..events import OptimEvents, current_member
from ..wrapper import OptimWrapper

_ACTIONS = ("skip", "stop")


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor: whether every element of every tensor is finite."""
    device = tensors[0].device
    return torch.stack([torch.isfinite(tensor).all().to(device) for tensor in tensors]).all()


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

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from engine_opt import OptimWrapper, create_trainer
        >>> model = torch.nn.Linear(1, 1)
        >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> trainer = create_trainer(model, wrapper, F.mse_loss)
        >>> guard = NonFiniteGuard("skip")
        >>> guard.attach(trainer)
        >>> data = [(torch.ones(1, 1), torch.zeros(1, 1)), (torch.ones(1, 1), torch.full((1, 1), float("nan")))]
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
        engine.add_event_handler(OptimEvents.BACKWARD_COMPLETED, self._check_loss)
        engine.add_event_handler(OptimEvents.BEFORE_OPTIM_STEP, self._check_step)
        engine.add_event_handler(OptimEvents.OPTIM_STEP_SKIPPED, self._scaler_step, True)
        engine.add_event_handler(OptimEvents.OPTIM_STEP_COMPLETED, self._scaler_step, False)

    def _scaler_step(self, engine: Engine, skipped: bool) -> None:
        name, wrapper = current_member(engine)
        scaler = getattr(wrapper, "loss_scaler", None)
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
    def _guarded(engine: Engine) -> OptimWrapper | None:
        _, wrapper = current_member(engine)
        return None if getattr(wrapper, "loss_scaler", None) is not None else wrapper

    def _check_loss(self, engine: Engine) -> None:
        wrapper = self._guarded(engine)
        loss = vars(engine.state)["optim_loss"]
        if wrapper is None or loss is None:
            return
        finite = torch.isfinite(loss.detach()).all()
        previous = self._loss_ok.get(wrapper)
        self._loss_ok[wrapper] = finite if previous is None else previous & finite

    def _check_step(self, engine: Engine) -> None:
        wrapper = self._guarded(engine)
        if wrapper is None:
            return
        grads = [param.grad for group in wrapper.param_groups for param in group["params"] if param.grad is not None]
        finite = self._loss_ok.pop(wrapper, None)
        if grads:
            finite = _all_finite(grads) if finite is None else _all_finite(grads) & finite.to(grads[0].device)
        if finite is None:  # nothing to check here; other ranks may have something
            finite = torch.ones((), dtype=torch.bool)
        if bool(parallel.all_ranks_agree(finite)):
            return
        wrapper.cancel_step()
        name, _ = current_member(engine)
        self.skipped[name] = self.skipped.get(name, 0) + 1
        if self.action == "stop":
            member = "" if name is None else f" of {name!r}"
            raise FloatingPointError(
                f"non-finite loss or gradients{member} at iteration {engine.state.iteration}; "
                "the update was not applied (weights and optimizer state are unchanged)"
            )
