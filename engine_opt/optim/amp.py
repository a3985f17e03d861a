"""``AmpOptimWrapper``: mixed precision on CPU and CUDA.

Autocast runs on the device type of the model's parameters. Only float16 gets
a gradient scaler; bfloat16 needs none, and float32/float64 turn autocast off.
A step skipped for non-finite gradients is read from the scaler's found-inf
state, so it is reported correctly for fused optimizers too.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 1)
    >>> wrapper = AmpOptimWrapper(
    ...     optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    ...     dtype="fp16",
    ...     loss_scale=dict(init_scale=1024.0),
    ... )
    >>> with wrapper.optim_context(model):
    ...     loss = model(torch.ones(4, 2)).float().mean()
    >>> wrapper.update_params(loss)
    >>> scale = wrapper.loss_scaler.get_scale()
    >>> wrapper.cast_dtype, wrapper.step_was_skipped, scale
    (torch.float16, False, 1024.0)
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from . import checks
from .distributed import NO_CONTEXT
from .grad_scaler import inverse_scale, step_reporting_skip
from .loss_scale import check_loss_scale, check_scaler_state
from .wrapper import OptimWrapper

DTYPE_ALIASES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
}
_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)


def _device_type(optimizer: torch.optim.Optimizer) -> str:
    """Device type of the optimizer's first parameter ('cpu' when it has none)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            return str(param.device.type)
    return "cpu"


def parse_dtype(dtype: str | torch.dtype | None, device_type: str) -> torch.dtype:
    """Turn the ``dtype`` argument into a ``torch.dtype``.

    ``None`` means float16 on CUDA and bfloat16 elsewhere.

    Examples:
        >>> parse_dtype("bf16", "cuda"), parse_dtype(None, "cpu")
        (torch.bfloat16, torch.bfloat16)
    """
    if dtype is None:
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_ALIASES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_ALIASES:
        return DTYPE_ALIASES[dtype]
    raise ValueError(
        f"dtype must be None, one of {list(DTYPE_ALIASES)} or torch.float16/bfloat16/float32/float64, got {dtype!r}"
    )


def _build_scaler(loss_scale: Any, device_type: str, use_fsdp: bool) -> torch.amp.GradScaler:
    kwargs: dict[str, Any] = {}
    if isinstance(loss_scale, Mapping):
        kwargs = dict(loss_scale)
    elif not isinstance(loss_scale, str):
        kwargs = {"init_scale": float(loss_scale)}
    if use_fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        accepts_device = "device" in inspect.signature(ShardedGradScaler).parameters
        return ShardedGradScaler(device_type, **kwargs) if accepts_device else ShardedGradScaler(**kwargs)
    return torch.amp.GradScaler(device_type, **kwargs)


@contextlib.contextmanager
def _grad_sync_and_autocast(
    grad_sync: contextlib.AbstractContextManager[Any], autocast: contextlib.AbstractContextManager[Any]
) -> Iterator[None]:
    with grad_sync, autocast:
        yield


class AmpOptimWrapper(OptimWrapper):
    """An ``OptimWrapper`` that runs the forward pass under autocast.

    Args:
        loss_scale: ``'dynamic'``, a positive number for a static scale, or a
            dict of ``torch.amp.GradScaler`` arguments. Used for float16 only.
        dtype: ``'float16'``/``'fp16'``, ``'bfloat16'``/``'bf16'``,
            ``'float32'``, ``'float64'`` or a ``torch.dtype``. ``None`` picks
            float16 on CUDA and bfloat16 on other devices. float32 and float64
            run without autocast.
        use_fsdp: Use ``ShardedGradScaler`` (for FSDP1-sharded models).
        **kwargs: ``optimizer``, ``accumulative_counts``, ``clip_grad`` as for
            ``OptimWrapper``; pass ``optimizer`` by keyword.

    Attributes:
        valid_dtypes: The names ``dtype`` accepts (MMEngine's four and their aliases).
        cast_dtype: The autocast dtype.
        loss_scaler: The ``torch.amp.GradScaler`` for float16, else ``None``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> wrapper = AmpOptimWrapper(optimizer=optimizer, dtype="bf16")
        >>> with wrapper.optim_context(model):
        ...     out = model(torch.ones(3, 2))
        >>> out.dtype, wrapper.loss_scaler
        (torch.bfloat16, None)
    """

    valid_dtypes: ClassVar[tuple[str, ...]] = tuple(DTYPE_ALIASES)

    def __init__(
        self,
        loss_scale: str | float | Mapping[str, Any] = "dynamic",
        dtype: str | torch.dtype | None = None,
        use_fsdp: bool = False,
        **kwargs: Any,
    ) -> None:
        check_loss_scale(loss_scale)
        if "optimizer" not in kwargs:
            raise TypeError("AmpOptimWrapper needs optimizer=..., got none")
        super().__init__(**kwargs)
        self._device_type = _device_type(self.optimizer)
        self.cast_dtype = parse_dtype(dtype, self._device_type)
        self._autocast = self.cast_dtype in _AUTOCAST_DTYPES
        self._unscaled = False  # unscale_ ran in this window
        self._scaler_open = False  # the scaler's iteration began (unscale_ or step) and update() has not closed it
        self._scale_update_param: float | None = None
        if self.cast_dtype == torch.float16:
            scaler = _build_scaler(loss_scale, self._device_type, use_fsdp)
            self.loss_scaler = scaler if scaler.is_enabled() else None  # loss_scale=dict(enabled=False)
            if isinstance(loss_scale, (int, float)):
                self._scale_update_param = float(loss_scale)
        if self.needs_closure and self.sam is None:
            self._check_closure_use(None)  # a float16 scaler: refused here, before any update
        if self.loss_scaler is not None and any(param.dtype == torch.float16 for param in self._params()):
            raise ValueError(
                "the optimizer holds float16 parameters, which a grad scaler cannot unscale: keep the model in "
                "float32 (autocast computes in float16 where it pays), or pass loss_scale=dict(enabled=False)"
            )

    def optim_context(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Gradient-sync control of ``OptimWrapper.optim_context`` plus autocast.

        Autocast runs on the device type of the optimized (the model's) parameters.
        """
        autocast = torch.autocast(_device_type(self.optimizer), self.cast_dtype, enabled=self._autocast)
        sync = super().optim_context(model)
        return autocast if sync is NO_CONTEXT else _grad_sync_and_autocast(sync, autocast)

    def _scale_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the loss scale when a float16 scaler exists."""
        return loss if self.loss_scaler is None else self.loss_scaler.scale(loss)

    def unscale_grads(self) -> None:
        if self.loss_scaler is not None and self._sam is not None and not self._stepping:
            raise RuntimeError(
                "unscale_grads() before a SAM update's step: the scaler unscales once per update, and the "
                "gradients the update steps from are the second pass's; read them unscaled in a "
                "BEFORE_OPTIM_STEP hook"
            )
        if self.loss_scaler is not None and not self._unscaled:
            self._scaler_open = True
            self.loss_scaler.unscale_(self.optimizer)
            self._unscaled = True

    def _inverse_scale(self) -> torch.Tensor | None:
        """``1 / scale`` while the gradients are scaled; where the scale cannot be read, they are unscaled now."""
        if self.loss_scaler is None or self._unscaled:
            return None
        inverse = inverse_scale(self.loss_scaler)
        if inverse is None:
            self.unscale_grads()
        return inverse

    def _optimizer_step(self, kwargs: dict[str, Any]) -> torch.Tensor | None:
        scaler = self.loss_scaler
        if scaler is None:
            return super()._optimizer_step(kwargs)
        self._scaler_open = True
        found_inf = step_reporting_skip(scaler, self.optimizer, kwargs, self.unscale_grads)
        self._close_scaler_iteration()
        return found_inf

    def _close_scaler_iteration(self) -> None:
        """``scaler.update()``: the scale moves on, and the next window may unscale again."""
        if self.loss_scaler is not None and self._scaler_open:
            self.loss_scaler.update(self._scale_update_param)
        self._unscaled = self._scaler_open = False

    def _abandon_window(self) -> None:
        """``OptimWrapper._abandon_window``, and close the scaler's iteration if the failed step opened it."""
        super()._abandon_window()
        self._end_scaler_iteration()

    def _end_scaler_iteration(self) -> None:
        """Close the scaler's iteration as far as it can be (best effort: an error being raised goes on)."""
        with contextlib.suppress(AssertionError, RuntimeError):
            self._close_scaler_iteration()
        self._unscaled = self._scaler_open = False

    def _cancel_optimizer_step(self) -> torch.Tensor:
        if self.loss_scaler is not None:  # close the scaler's iteration; update() needs its inf check
            self.unscale_grads()
            self._close_scaler_iteration()
        return super()._cancel_optimizer_step()

    def state_dict(self) -> dict[str, Any]:
        """``OptimWrapper.state_dict()`` plus ``'loss_scaler'``: the grad scaler's state.

        Without a scaler (bfloat16, float32) it is ``{}``, as for a disabled
        ``torch.amp.GradScaler``.
        """
        state = super().state_dict()
        state["loss_scaler"] = {} if self.loss_scaler is None else self.loss_scaler.state_dict()
        return state

    def check_state_dict(self, state_dict: Any) -> None:
        """``OptimWrapper.check_state_dict`` plus the grad scaler's state under ``'loss_scaler'``."""
        super().check_state_dict(state_dict)
        scaler_state = checks.mapping("state_dict['loss_scaler']", state_dict.get("loss_scaler", {}))
        if self.loss_scaler is not None and scaler_state:
            check_scaler_state("state_dict['loss_scaler']", scaler_state, set(self.loss_scaler.state_dict()))

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """``OptimWrapper.load_state_dict`` plus the grad scaler's state (``{}``: a run without a scaler)."""
        self.check_state_dict(state_dict)
        self._end_scaler_iteration()  # a window begun before the load is over
        super().load_state_dict(state_dict)
        scaler_state = state_dict.get("loss_scaler")
        if self.loss_scaler is not None and scaler_state:
            self.loss_scaler.load_state_dict(dict(scaler_state))

    def _extra_repr(self) -> str:
        scale = None if self.loss_scaler is None else self.loss_scaler.state_dict()
        return f"  dtype={self.cast_dtype},\n  loss_scaler={scale},\n"
