"""Clipping by norm folded into a fused optimizer's step (``clip_grad=dict(..., fold_into_step=True)``).

Unfolded, a clipped update makes three passes over the gradients before the
step: the norm (a read), the clipping (``grads *= clip_coef``: a read and a
write) and, with a float16 loss scale, the unscaling before both (another read
and write). torch's fused optimizers (``Adam``, ``AdamW``, ``SGD``,
``Adagrad`` with ``fused=True``) divide the gradients by a ``grad_scale``
tensor inside their kernel, and skip the update where a ``found_inf`` tensor
is set: the protocol of ``torch.amp.GradScaler.step`` for optimizers with
``_step_supports_amp_scaling``, which multiplies a ``grad_scale`` already set
on the optimizer by its own scale. Folded, the norm is measured on the
gradients as they are (still scaled: a power-of-two scale is taken out of the
norm exactly), and ``1 / clip_coef`` is set as the optimizer's ``grad_scale``:
the kernel divides the gradients by the loss scale and the clipping together,
and writes them back divided. The scaler still checks for non-finite gradients
and skips the step as before.

The two torch attributes (``grad_scale``, read by the fused step; and
``_step_supports_amp_scaling``, which says the step reads it) are used here
only; an optimizer without them is refused when the wrapper is built.

Exactness (``tests/optim/test_clip_in_step.py``): the skipped steps are the
unfolded path's; the norm (``grad_norm``) and, where clipping does not cut
(norm at most ``max_norm``, ``clip_coef`` 1), the update are bitwise the
unfolded ones in float32 and under a power-of-two loss scale (under another,
they differ by a rounding of the scale's reciprocal). Where it cuts, each gradient is ``g / fl(1 / c)`` instead of
``fl(g * c)``: within 2 float32 units in the last place of the gradient
(relative 2.4e-7), which the update carries on. So it is opt-in.

Examples:
    >>> import torch
    >>> from engine_opt.optim.clipping import GradClipper
    >>> param = torch.nn.Parameter(torch.zeros(2))
    >>> optimizer = torch.optim.SGD([param], lr=1.0, fused=True)
    >>> clipper = GradClipper.parse(dict(max_norm=1.0, fold_into_step=True))
    >>> folded = ClipInStep(clipper, optimizer)
    >>> param.grad = torch.tensor([3.0, 4.0])
    >>> folded.prepare(optimizer, [param], None)
    tensor(5.)
    >>> optimizer.step(); folded.release(optimizer)
    >>> param.detach(), param.grad
    (tensor([-0.6000, -0.8000]), tensor([0.6000, 0.8000]))
"""

from __future__ import annotations

import torch

from .clipping import GradClipper
from .distributed import any_sharded, replicated_value

_READS_GRAD_SCALE = "_step_supports_amp_scaling"  # torch's: the optimizer's step reads `grad_scale`/`found_inf`
_GRAD_SCALE = "grad_scale"


def _refusal(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` cannot take the clipping in its step, or ``None`` if it can."""
    name = type(optimizer).__name__
    if not getattr(optimizer, _READS_GRAD_SCALE, False):
        return f"{name} does not divide the gradients in its step (only torch's fused Adam, AdamW, SGD, Adagrad do)"
    if not all(group.get("fused") for group in optimizer.param_groups):
        return f"{name} has param groups with fused={[group.get('fused') for group in optimizer.param_groups]}"
    if any_sharded([param for group in optimizer.param_groups for param in group["params"]]):
        return f"{name} holds sharded (DTensor) parameters, whose norm and step the folding does not cover"
    return None


class ClipInStep:
    """Clipping by norm given to a fused optimizer's step as its ``grad_scale``.

    Args:
        clipper: The clipping, by norm.
        optimizer: A fused optimizer (``fused=True`` in every group).

    Raises:
        ValueError: Clipping by value, or an optimizer that does not divide the gradients in its step.
    """

    def __init__(self, clipper: GradClipper, optimizer: torch.optim.Optimizer) -> None:
        if clipper.type != "norm":
            raise ValueError(
                "clip_grad['fold_into_step']=True folds clipping by norm; clipping by value has no coefficient to "
                "fold: drop fold_into_step"
            )
        refusal = _refusal(optimizer)
        if refusal is not None:
            can_fuse = "fused" in getattr(optimizer, "defaults", {})  # torch's Adam, AdamW, SGD, Adagrad
            how = (
                "build it with fused=True (implementation='fused', or 'auto' where it picks fused), or drop "
                "fold_into_step"
                if can_fuse
                else "it has no fused step: drop fold_into_step"
            )
            raise ValueError(f"clip_grad['fold_into_step']=True needs a fused optimizer: {refusal}; {how}")
        self._optimizer = optimizer
        self._max_norm = float(clipper.kwargs["max_norm"])
        self._norm_type = float(clipper.kwargs.get("norm_type", 2.0))
        self._error_if_nonfinite = bool(clipper.kwargs.get("error_if_nonfinite", False))
        self._foreach = clipper.kwargs.get("foreach")

    def prepare(
        self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], inverse_scale: torch.Tensor | None
    ) -> torch.Tensor:
        """Measure the gradients' norm and set ``1 / clip_coef`` as ``optimizer``'s ``grad_scale``.

        Args:
            optimizer: The wrapper's optimizer now (checked again where it was replaced since).
            params: The parameters whose gradients are clipped (in the model's order, as unfolded).
            inverse_scale: ``1 / loss scale`` as a tensor while the gradients are still scaled, else ``None``.

        Returns:
            The total norm of the true (unscaled) gradients, as ``clip_grad_norm_`` returns it.

        Raises:
            RuntimeError: The optimizer cannot take the clipping in its step (now): replaced by one that is
                not fused, or its groups' ``fused`` set off since.
        """
        if optimizer is not self._optimizer or not all(group.get("fused") for group in optimizer.param_groups):
            refusal = _refusal(optimizer)
            if refusal is not None:
                raise RuntimeError(
                    f"clip_grad['fold_into_step']: {refusal}; give the wrapper a fused optimizer, or drop "
                    "fold_into_step"
                )
            self._optimizer = optimizer
        grads = [param.grad for param in params if param.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, self._norm_type, self._error_if_nonfinite, self._foreach)
        norm = replicated_value(norm) if inverse_scale is None else replicated_value(norm) * inverse_scale
        clip_coef = torch.clamp(self._max_norm / (norm + 1e-6), max=1.0)  # as torch's clip_grads_with_norm_
        # the kernels take a float32 grad_scale (a GradScaler's dtype), whatever the gradients' dtype
        setattr(optimizer, _GRAD_SCALE, torch.reciprocal(clip_coef.float()))
        return norm

    def release(self, optimizer: torch.optim.Optimizer) -> None:
        """Take the ``grad_scale`` off ``optimizer`` (``GradScaler.step`` does it itself after its step)."""
        optimizer.__dict__.pop(_GRAD_SCALE, None)
