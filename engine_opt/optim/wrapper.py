"""``OptimWrapper``: one object that drives every optimizer update.

The wrapper owns the order of one update (see ``docs/semantics.md``)::

    with wrapper.optim_context(model):   # skips DDP/FSDP gradient sync mid-window
        loss = loss_fn(model(x), y)
    loss = loss / window_size            # scale_loss: A, or the true size of the last window
    loss.backward()                      # backward: counts the micro-step
    if window ends:                      # should_update
        clip_grad_norm_(params, ...)     # step: clipping, then optimizer.step()
        optimizer.step()
        optimizer.zero_grad()

Examples:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(1, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> wrapper = OptimWrapper(optimizer, accumulative_counts=2)
    >>> for _ in range(4):
    ...     with wrapper.optim_context(model):
    ...         loss = model(torch.ones(1, 1)).sum()
    ...     wrapper.update_params(loss)
    >>> wrapper.inner_count, wrapper.applied_steps
    (4, 2)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import checks, distributed, window_state
from .clip_in_step import ClipInStep
from .clipping import GradClipper
from .closure import Closure, Reevaluation, check_closure, needs_closure
from .hooks import StepEvent, StepHook, StepHooks
from .implementation import Implementation, put_back_step_flags, step_flags
from .num_items import check_num_items, divide_by_items
from .optimizer_view import OptimizerView
from .param_layout import regrouped
from .paramwise import params_in_model_order
from .sam import SharpnessAware, check_unsharded
from .state_checks import check_hyperparameters, check_optimizer_state
from .step_undo import StepUndo

_REENTRANT = (
    "{} called inside SAM's second pass (the closure): the closure returns the loss at the perturbed weights, "
    "and the wrapper runs its backward and the step; call nothing of the wrapper's from it"
)


def _check_loss(loss: Any, backward_kwargs: Mapping[str, Any]) -> None:
    """Refuse, with what to do, a loss that ``backward`` would fail on or silently not train from."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss must be a tensor, got {checks.describe(loss)}; pass the loss tensor, not loss.item()")
    if not loss.requires_grad:
        raise ValueError(
            "loss does not require grad: it was computed under torch.no_grad(), detached, or from a model whose "
            "parameters all have requires_grad=False; compute it from the model's output with gradients enabled"
        )
    if loss.numel() != 1 and "gradient" not in backward_kwargs:
        raise ValueError(
            f"loss must be a scalar (one element), got a tensor of shape {tuple(loss.shape)}; "
            "reduce it first, e.g. loss.mean() or loss.sum()"
        )


class OptimWrapper(OptimizerView):
    """Wrap a ``torch.optim.Optimizer`` with gradient accumulation and clipping.

    The wrapper is itself a ``torch.optim.Optimizer`` (as accelerate's
    ``AcceleratedOptimizer`` is; see ``OptimizerView``): ``param_groups``,
    ``defaults`` and ``state`` are live views of the wrapped optimizer's. So
    torch's and MMEngine's LR schedulers, Ignite's ``LRScheduler``/``ParamScheduler``s
    and ``FastaiLRFinder`` take the wrapper itself; what they save and restore
    goes through the wrapper's ``state_dict``, counters and a window's
    gradients included (see ``window_state``). ``step``,
    ``zero_grad``, ``state_dict``, ``load_state_dict`` keep MMEngine's meaning
    (``step`` clips and steps one window); torch's ``register_step_pre_hook``
    and the other ``Optimizer`` hooks register on the wrapped optimizer.

    Args:
        optimizer: The optimizer to drive.
        accumulative_counts: Number of micro-steps whose gradients are summed
            before one optimizer step. Each loss is divided by the size of its
            window, so a window of ``k`` micro-batches gives the update of one
            batch ``k`` times larger.
        clip_grad: ``None`` (no clipping) or a dict such as
            ``dict(max_norm=1.0)`` / ``dict(type='norm', max_norm=1.0,
            norm_type=2)`` for ``clip_grad_norm_``, or
            ``dict(type='value', clip_value=0.5)`` for ``clip_grad_value_``.
            Gradients are clipped once per window, just before the step.
        sync_each_micro_step: In a distributed run, reduce the gradients on
            every micro-step rather than once per window (``optim_context``):
            more traffic, less memory where the model is sharded (FSDP2 keeps
            reduced gradients sharded; HSDP reduce-scatters every micro-step
            and all-reduces across replicas once per window).
        sam: ``None``, or sharpness-aware minimisation's settings,
            ``dict(rho=0.05, adaptive=False)`` (``SharpnessAware``): each update
            takes two passes over its batch, the second given as a closure
            (see ``update_params``). One batch per update (``accumulative_counts=1``).

    Attributes:
        optimizer: The wrapped optimizer.
        clip_grad_kwargs: The clipping arguments without ``type`` (``None``
            when not clipping, as in MMEngine).
        loss_scaler: The float16 grad scaler: always ``None`` here (see
            ``AmpOptimWrapper``).
        sync_each_micro_step: As given (``False`` for a wrapper pickled before the option existed).
        implementation: What the config's ``implementation`` chose (``build_optim_wrapper``):
            ``None`` where it chose none (torch's default).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1)
        >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                        clip_grad=dict(max_norm=1.0))
        >>> wrapper.update_params(model(torch.ones(3, 2)).sum())
        >>> wrapper.get_lr()
        {'lr': [0.1]}
        >>> bool(wrapper.grad_norm > 0)
        True
        >>> scheduler = torch.optim.lr_scheduler.StepLR(wrapper, step_size=1, gamma=0.5)
        >>> wrapper.update_params(model(torch.ones(3, 2)).sum())
        >>> scheduler.step()
        >>> isinstance(wrapper, torch.optim.Optimizer), wrapper.get_lr()
        (True, {'lr': [0.05]})
    """

    sync_each_micro_step: bool = False
    implementation: Implementation | None = None
    _sam: SharpnessAware | None = None
    _folded: ClipInStep | None = None
    _second_pass = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        accumulative_counts: int = 1,
        clip_grad: Mapping[str, Any] | None = None,
        *,
        sync_each_micro_step: bool = False,
        sam: Mapping[str, Any] | SharpnessAware | None = None,
    ) -> None:
        if isinstance(optimizer, OptimWrapper):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got the wrapper {type(optimizer).__name__}; "
                "pass the optimizer it wraps (wrapper.optimizer) instead"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {checks.describe(optimizer)}; "
                "build one first, e.g. SGD(model.parameters(), lr=0.01)"
            )
        check_hyperparameters(optimizer)
        super().__init__(optimizer)
        self.loss_scaler: torch.amp.GradScaler | None = None
        self._accumulative_counts = checks.positive_int("accumulative_counts", accumulative_counts)
        self.sync_each_micro_step = checks.flag("sync_each_micro_step", sync_each_micro_step)
        self._clipper = GradClipper.parse(clip_grad)
        self.clip_grad_kwargs: dict[str, Any] | None = None if self._clipper is None else dict(self._clipper.kwargs)
        self._folded = ClipInStep(self._clipper, optimizer) if self._clipper and self._clipper.fold_into_step else None
        self._inner_count = 0
        self._max_counts = -1
        self._steps = 0  # windows stepped, applied or skipped
        self._stepping = False  # between the start of step() and the count of its outcome
        self._skipped_loaded = 0  # skipped steps read from a loaded state dict
        self._skipped_on_device: torch.Tensor | None = None  # skipped steps since, summed on the device
        self._last_found_inf: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None
        # num_items: the items the window's summed losses cover, an int or a device tensor; None outside such windows
        self._window_items: int | torch.Tensor | None = None
        self._sam = SharpnessAware.parse(sam)
        self._second_pass = False  # SAM: the closure's evaluation at the perturbed weights is running
        self._needs_closure = needs_closure(optimizer) or self._sam is not None
        if self._sam is not None:
            self._check_two_pass_use(optimizer)
        elif self._needs_closure:
            self._check_closure_use(None)
        self._hooks = StepHooks()
        # The live hook tables, tested on every micro-step: empty (false) while nobody listens.
        self._on_backward = self._hooks.table(StepEvent.BACKWARD_COMPLETED)
        self._on_before_step = self._hooks.table(StepEvent.BEFORE_OPTIM_STEP)
        self._on_outcome = (
            self._hooks.table(StepEvent.OPTIM_STEP_COMPLETED),
            self._hooks.table(StepEvent.OPTIM_STEP_SKIPPED),
        )

    # ------------------------------------------------------------------ counting

    @property
    def accumulative_counts(self) -> int:
        """The number of micro-steps in one full accumulation window."""
        return self._accumulative_counts

    @property
    def inner_count(self) -> int:
        """The number of backward passes (micro-steps) counted so far."""
        return self._inner_count

    @property
    def in_window(self) -> bool:
        """Whether micro-steps of a window have run and its update has not: gradients are being accumulated.

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(1, 1)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> wrapper = OptimWrapper(optimizer, accumulative_counts=2)
            >>> wrapper.update_params(model(torch.ones(1)).sum())
            >>> wrapper.in_window
            True
        """
        return self._inner_count % self._accumulative_counts != 0 and self._inner_count != self._max_counts

    @property
    def window_items(self) -> int | torch.Tensor | None:
        """The items the open window's micro-steps gave as ``num_items`` so far (``None`` without them)."""
        return self._window_items

    @property
    def max_counts(self) -> int:
        """The run length in micro-steps set by ``initialize_count_status``, or -1."""
        return self._max_counts

    def initialize_count_status(self, model: nn.Module, init_counts: int, max_counts: int) -> None:
        """Tell the wrapper where the run stands and how long it is.

        With the run length known, the last window is flushed at
        ``max_counts`` and its losses are divided by its true size.

        Args:
            model: The trained model (accepted for MMEngine compatibility).
            init_counts: Micro-steps already done (the resumed iteration).
            max_counts: Total micro-steps of the run, or -1 if unknown.
        """
        for name, value in (("init_counts", init_counts), ("max_counts", max_counts)):
            if not checks.is_int(value):
                raise TypeError(f"{name} must be an int, got {checks.describe(value)}")
        if init_counts < 0:
            raise ValueError(f"init_counts must be >= 0, got {init_counts}")
        if not (max_counts == -1 or max_counts >= 1):
            raise ValueError(f"max_counts must be a positive int or -1 (unknown), got {max_counts}")
        if max_counts != -1 and init_counts > max_counts:
            raise ValueError(f"init_counts ({init_counts}) must not exceed max_counts ({max_counts})")
        self._inner_count = init_counts
        self._max_counts = max_counts

    def _window_size(self) -> int:
        """Size of the window that the next micro-step belongs to."""
        size = self._accumulative_counts
        if size == 1 or self._max_counts == -1:
            return size
        if self._inner_count >= self._max_counts:  # past the declared run: full windows again
            return size
        start = self._inner_count - self._inner_count % size
        return min(size, self._max_counts - start)

    def should_update(self) -> bool:
        """Whether the micro-step just counted by ``backward`` ends a window."""
        return self._inner_count % self._accumulative_counts == 0 or self._inner_count == self._max_counts

    def should_sync(self) -> bool:
        """Whether the next backward ends a window, so gradients must be all-reduced.

        With ``sam``, only the second pass's: each rank perturbs its weights by
        its own first-pass gradient.
        """
        if self._sam is not None:
            return self._second_pass
        count = self._inner_count + 1
        return count % self._accumulative_counts == 0 or count == self._max_counts

    def optim_context(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Context for the forward pass (and loss) of one micro-step.

        On micro-steps that do not end a window it stops gradient
        synchronisation: ``no_sync()`` for DDP, and
        ``set_requires_gradient_sync(False)`` for FSDP2 and HSDP, which stays
        set through the backward that follows. With ``sync_each_micro_step``
        every micro-step reduces (HSDP: all-reduces across replicas only at
        the window's end, ``set_requires_all_reduce``).
        """
        # SAM: the first pass stays local whatever sync_each_micro_step says (each rank perturbs by its own gradient)
        each_micro_step = self.sync_each_micro_step and self._sam is None
        return distributed.grad_sync_context(model, self.should_sync(), each_micro_step)

    # ------------------------------------------------------------------ one update

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Divide ``loss`` by the size of the accumulation window it belongs to."""
        size = self._window_size()
        return loss if size == 1 else loss / size

    def backward(self, loss: torch.Tensor, *, num_items: int | torch.Tensor | None = None, **kwargs: Any) -> None:
        """Run ``loss.backward(**kwargs)`` and count the micro-step.

        Args:
            loss: The loss, already scaled (``scale_loss``); with ``num_items``, the sum over the items.
            num_items: How many items ``loss`` sums over (an int, or a 0-d integer tensor on the
                gradients' device, never read on the host). The window's counts are summed, and the
                step divides the window's gradients by the total (see ``update_params``). Give it on
                every micro-step of a window or on none.
            **kwargs: Keyword arguments for ``loss.backward``.

        Raises:
            TypeError: ``loss`` is not a tensor; ``num_items`` is neither an int nor an integer 0-d tensor.
            ValueError: ``loss`` does not require grad, or is not a scalar (without ``gradient=``);
                ``num_items`` is not positive or on another device, or the window mixes calls with and
                without it.
        """
        _check_loss(loss, kwargs)
        if self._second_pass:
            raise RuntimeError(_REENTRANT.format("backward"))
        items = None if num_items is None and self._window_items is None else self._next_items(num_items)
        scaled = self._scale_for_backward(loss)
        scaled.backward(**kwargs)  # type: ignore[no-untyped-call]
        self._inner_count += 1
        if items is not None:
            self._window_items = items
        if self._on_backward:
            self._hooks.call(self, StepEvent.BACKWARD_COMPLETED, scaled)

    def _scale_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The tensor backward runs from: ``loss`` itself, or times a float16 loss scale (``AmpOptimWrapper``)."""
        return loss

    def _next_items(self, num_items: Any) -> int | torch.Tensor:
        """The window's item count with ``num_items`` added (nothing read on the host); refuse mixed windows."""
        if num_items is None:
            raise ValueError(
                "num_items is None, but this accumulation window's earlier micro-steps gave num_items: pass "
                "num_items on every micro-step of a window, or on none"
            )
        items = check_num_items(num_items, self._params()[0].device)
        if self._window_items is not None:
            return self._window_items + items
        if self.in_window:
            raise ValueError(
                f"num_items={num_items!r} given, but this accumulation window's earlier micro-steps gave none "
                "(their losses were divided by the window size): pass num_items on every micro-step of a window, "
                "or on none"
            )
        return items

    def step(self, **kwargs: Any) -> None:  # type: ignore[override]  # MMEngine's: keyword arguments only
        """Step the optimizer on the window's gradients, clipped if configured.

        ``closure=`` (torch's: zero the gradients, evaluate, backward, return
        the loss) goes to an optimizer that re-evaluates the model
        (``torch.optim.LBFGS``), each evaluation's gradients clipped as
        configured; see ``update_params``.

        In order: unscale (float16, when clipping or when a
        ``BEFORE_OPTIM_STEP`` hook listens), the ``BEFORE_OPTIM_STEP`` hooks
        (they see the gradients before clipping, so a guard sees an ``inf``
        that clipping by value would hide; one may cancel the step), clipping,
        ``optimizer.step(**kwargs)``. Step hooks see the outcome as
        ``OPTIM_STEP_COMPLETED`` or ``OPTIM_STEP_SKIPPED`` (which, with a
        float16 scaler, reads the scaler's found-inf flag on the host; only
        when a hook listens to one of them).

        If anything raises on the way (a hook, clipping with
        ``error_if_nonfinite``, the optimizer), the window is abandoned before
        the error goes on: its gradients are dropped and a grad scaler's
        iteration is closed, so the next window starts clean.
        """
        if self._second_pass:
            raise RuntimeError(_REENTRANT.format("step"))
        if self._sam is not None:
            kwargs = dict(kwargs)
            closure = self._given_closure(kwargs.pop("closure", None))
        elif ("closure" in kwargs and kwargs["closure"] is not None) or self._needs_closure:
            kwargs = self._with_reevaluation(kwargs)
        try:
            if self._sam is not None:
                self._second_pass_at_perturbed_weights(self._sam, closure)
            self._step(kwargs)
        except BaseException:
            self._abandon_window()
            raise

    def _second_pass_at_perturbed_weights(self, sam: SharpnessAware, closure: Closure) -> None:
        """SAM: perturb the weights by the first pass's gradients, run ``closure`` there, put the weights back.

        The gradients left are the second pass's. A closure that returns its
        loss leaves its backward to the wrapper (scaled by a float16 loss
        scale, not counted as a micro-step); one in torch's style runs it itself.
        """
        params = self._params()
        check_unsharded(params)
        perturbation = sam.perturb(params)
        self.optimizer.zero_grad(set_to_none=True)
        self._second_pass = True
        try:
            loss = closure()
            if not any(param.grad is not None for param in params):
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(
                        f"sam: the closure (the second pass) must return its loss tensor, got {checks.describe(loss)}"
                    )
                _check_loss(loss, {})
                self._scale_for_backward(loss).backward()  # type: ignore[no-untyped-call]
            elif self.loss_scaler is not None:
                raise ValueError(
                    "sam: the closure ran backward itself, unscaled, but a float16 loss scale is in use: let the "
                    "closure return the loss without calling backward, and the wrapper scales it"
                )
        finally:
            self._second_pass = False
            perturbation.restore()
        if self.loss_scaler is not None:
            perturbation.carry_overflow(params)

    def _check_two_pass_use(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse what SAM's two passes over one batch cannot honour: accumulation, a closure optimizer."""
        if self._accumulative_counts != 1:
            raise ValueError(
                f"sam: each update evaluates its batch twice (the second time at perturbed weights), but "
                f"accumulative_counts={self._accumulative_counts} would need every micro-batch of the window again; "
                "use accumulative_counts=1 (and a larger batch)"
            )
        if needs_closure(optimizer):
            raise ValueError(
                f"sam: {type(optimizer).__name__} takes its own closure in its step; SAM runs around an optimizer "
                "that steps once from the gradients (SGD, AdamW, ...)"
            )

    @property
    def sam(self) -> SharpnessAware | None:
        """SAM's settings (``rho``, ``adaptive``), or ``None``: see the ``sam`` argument."""
        return self._sam

    def _with_reevaluation(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with its closure wrapped to clip each evaluation's gradients; refused where none can work."""
        closure = self._given_closure(kwargs.get("closure"))
        if isinstance(closure, Reevaluation):  # update_params made it
            return kwargs
        self._check_closure_use(self._window_items)
        return {**kwargs, "closure": Reevaluation(closure, self._clip_closure())}

    def _given_closure(self, closure: Any) -> Closure:
        """``closure`` if it can be called; a ``TypeError`` where it cannot, or is missing."""
        if closure is None and self._sam is not None:
            raise TypeError(
                "sam: each update evaluates its batch a second time, at perturbed weights: pass that second pass "
                "as update_params(loss, closure=second_pass) or step(closure=second_pass), a function returning "
                "the batch's loss (create_trainer's default step makes one)"
            )
        if closure is None:
            raise TypeError(
                f"{type(self.optimizer).__name__} re-evaluates the model during its step: pass torch's closure, "
                "update_params(loss, closure=closure) or step(closure=closure) (create_trainer's default step "
                "makes one)"
            )
        return check_closure(closure)

    def _check_closure_use(self, num_items: Any) -> None:
        """Refuse what a step re-evaluating one batch cannot honour: accumulation, item counts, a float16 scale."""
        if self._accumulative_counts != 1:
            raise ValueError(
                f"closure: a step that re-evaluates the model sees one batch, but accumulative_counts="
                f"{self._accumulative_counts} sums several; use accumulative_counts=1 (and a larger batch)"
            )
        if num_items is not None:
            raise ValueError(
                "closure: num_items weights the micro-steps of a window, and a step that re-evaluates the model "
                "has one batch, whose loss the closure returns; pass one or the other"
            )
        if self.loss_scaler is not None:
            raise ValueError(
                "closure: a float16 loss scale cannot go through a step that re-evaluates the model (the "
                "evaluations would have to share one scale, and a skipped step would throw away the whole "
                "search; torch's GradScaler refuses closures too): use dtype='bfloat16' or float32"
            )

    def _clip_closure(self) -> Callable[[], object] | None:
        clipper = self._clipper
        if clipper is None:
            return None
        return lambda: clipper.clip(params_in_model_order(self.optimizer.param_groups))

    def _step(self, kwargs: dict[str, Any]) -> None:
        items = self._window_items
        if items is not None:  # num_items: before unscaling, hooks and clipping
            self._window_items = None
            divide_by_items(self._params(), items)
        self._stepping = True
        grad_norm = None
        folded = self._folded
        if folded is not None and "closure" in kwargs:  # the closure clips each evaluation itself: no folding
            folded = None
        try:
            if (self._clipper is not None and folded is None) or self._on_before_step:
                self.unscale_grads()  # to clip, or for hooks that read the gradients
            cancel = self._hooks.call_before_step(self) if self._on_before_step else False
            if self._clipper is not None and cancel is not True:
                params = params_in_model_order(self.optimizer.param_groups)
                if folded is None:
                    grad_norm = self._clipper.clip(params)
                else:  # the optimizer's fused step divides by the clip (and loss) scale
                    grad_norm = folded.prepare(self.optimizer, params, self._inverse_scale())
            found_inf = self._optimizer_step(kwargs) if cancel is False else self._cancelled_step(cancel, kwargs)
        finally:
            self._stepping = False
            if folded is not None:
                folded.release(self.optimizer)
        self._record_step(found_inf, grad_norm)
        if self._on_outcome[0] or self._on_outcome[1]:
            self._report_outcome(cancel is True, found_inf)

    def _cancelled_step(self, cancel: bool | torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Skip the step (``cancel`` is True), or step and take it back where a device flag says; the found-inf flag."""
        if isinstance(cancel, torch.Tensor):
            return self._optimizer_step_unless(cancel, kwargs)
        return self._cancel_optimizer_step()

    def _abandon_window(self) -> None:
        """Drop the window's gradients (an update failed half-way must not leave them for the next one)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._window_items = None

    def _report_outcome(self, cancelled: bool, found_inf: torch.Tensor | None) -> None:
        """Call the hooks of ``OPTIM_STEP_SKIPPED`` or ``OPTIM_STEP_COMPLETED``, reading the outcome on the host."""
        was_skipped = cancelled or (found_inf is not None and bool(found_inf))
        event = StepEvent.OPTIM_STEP_SKIPPED if was_skipped else StepEvent.OPTIM_STEP_COMPLETED
        self._hooks.call(self, event, None)

    def cancel_step(self, when: torch.Tensor | None = None) -> None:
        """Skip the step being prepared; call it from a ``BEFORE_OPTIM_STEP`` hook.

        The optimizer does not step, the window's gradients are dropped by the
        ``zero_grad`` that follows, and the step counts in ``skipped_steps``.

        With ``when``, a one-element boolean tensor decided on the device, the
        step is skipped where it is true without the host reading it: the
        optimizer steps, and the parameters and optimizer state it changed are
        put back on the device (``StepUndo``). The step counts as skipped
        (on the device) and the gradient norm stays the last applied one
        (``nan`` before any), as for a float16 step the scaler skips. The step
        is prepared as usual, clipping included (so ``error_if_nonfinite``
        still raises on a non-finite norm). In a distributed run the flag must
        be the same on every rank. Several calls: skipped if any says so.

        Raises:
            RuntimeError: When called outside a ``BEFORE_OPTIM_STEP`` hook.
            TypeError: When ``when`` is not a one-element boolean tensor.

        Examples:
            >>> import torch
            >>> param = torch.nn.Parameter(torch.ones(1))
            >>> wrapper = OptimWrapper(torch.optim.SGD([param], lr=1.0))
            >>> handle = wrapper.register_step_hook(
            ...     lambda w, event, loss: w.cancel_step(when=param.grad.abs().sum() > 10),
            ...     [StepEvent.BEFORE_OPTIM_STEP],
            ... )
            >>> wrapper.update_params((param * 100).sum())  # a gradient of 100: skipped
            >>> wrapper.update_params(param.sum())  # a gradient of 1: applied
            >>> param.item(), wrapper.skipped_steps, wrapper.applied_steps
            (0.0, 1, 1)
        """
        self._hooks.veto(when)

    def register_step_hook(self, hook: StepHook, events: Iterable[StepEvent] | None = None) -> RemovableHandle:
        """Call ``hook(wrapper, event, loss)`` at each of ``events`` (every ``StepEvent`` by default).

        ``loss`` is the tensor given to ``backward`` for ``BACKWARD_COMPLETED``
        and ``None`` otherwise. While a ``BEFORE_OPTIM_STEP`` hook is
        registered, the gradients are unscaled before it runs. Events without
        hooks cost nothing. The trainer uses this to fire its Ignite events.

        Returns:
            A handle whose ``remove()`` unregisters the hook.

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(1, 1)
            >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
            >>> seen = []
            >>> def hook(wrapper, event, loss):
            ...     seen.append(event.value)
            >>> handle = wrapper.register_step_hook(hook)
            >>> wrapper.update_params(model(torch.ones(1, 1)).sum())
            >>> seen
            ['backward_completed', 'before_optim_step', 'optim_step_completed']
            >>> handle.remove()
        """
        return self._hooks.add(hook, events)

    def update_params(
        self,
        loss: torch.Tensor,
        step_kwargs: dict[str, Any] | None = None,
        zero_kwargs: dict[str, Any] | None = None,
        *,
        num_items: int | torch.Tensor | None = None,
        closure: Closure | None = None,
    ) -> None:
        """Scale the loss, run backward and, at the end of a window, step and zero the grads.

        With ``num_items`` (token-weighted accumulation), ``loss`` is the sum
        of the micro-batch's per-item losses: it is not divided by the window
        size; the counts are summed (on the device for tensors), and at the
        end of the window its gradients are divided by its total item count
        (summed over the ranks), before unscaling, clipping and the step. The
        update is then that of the mean loss over all the window's items.

        Args:
            loss: The loss of one micro-step, not yet divided by the window size
                (with ``num_items``: the sum over its items).
            step_kwargs: Keyword arguments for ``optimizer.step``.
            zero_kwargs: Keyword arguments for ``optimizer.zero_grad``.
            num_items: How many items ``loss`` sums over: a positive int, or a
                0-d integer tensor on the gradients' device (not read on the
                host, so its value is not checked). Give it on every micro-step
                of a window or on none.
            closure: For an optimizer that re-evaluates the model during its
                step (``torch.optim.LBFGS``, which needs one): torch's closure,
                which zeroes the gradients, evaluates the model on the batch of
                ``loss``, runs backward and returns the loss. For LBFGS ``loss``
                is its first evaluation (so the model is evaluated as often as
                in torch's loop); every evaluation's gradients are clipped as
                configured. One batch per update: refused with accumulation,
                ``num_items`` or a float16 loss scale (bfloat16 works).
                With ``sam``: the second pass, evaluating the model on the
                same batch at the perturbed weights and returning the loss;
                the wrapper runs its backward (in a distributed run the
                gradients are reduced in this pass only), clipping applies
                to its gradients, and the optimizer steps from the weights
                as they were. A float16 overflow in either pass skips the update.

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
            >>> wrapper = OptimWrapper(optimizer, accumulative_counts=2)
            >>> wrapper.update_params(model(torch.ones(3, 2)).sum(), num_items=3)
            >>> loss = model(torch.ones(1, 2)).sum()
            >>> wrapper.update_params(loss, num_items=torch.tensor(1))
            >>> # the next window: without is fine
            >>> wrapper.update_params(model(torch.ones(1, 2)).sum())
        """
        if closure is not None or self._needs_closure:
            self._update_reevaluating(loss, step_kwargs, zero_kwargs, num_items, closure)
            return
        if num_items is None:
            self.backward(self.scale_loss(loss))
        else:
            self.backward(loss, num_items=num_items)
        if self.should_update():
            self.step(**(step_kwargs or {}))
            self.zero_grad(**(zero_kwargs or {}))

    def _update_reevaluating(
        self,
        loss: torch.Tensor,
        step_kwargs: dict[str, Any] | None,
        zero_kwargs: dict[str, Any] | None,
        num_items: Any,
        closure: Closure | None,
    ) -> None:
        """``update_params`` with a closure: backward ``loss``, then a step whose first evaluation it is."""
        kwargs = dict(step_kwargs or {})
        if self._sam is not None:  # SAM: the first pass is an ordinary micro-step, the step runs the second
            kwargs["closure"] = self._given_closure(kwargs.get("closure") if closure is None else closure)
            if num_items is None:
                self.backward(self.scale_loss(loss))
            else:
                self.backward(loss, num_items=num_items)
            self.step(**kwargs)
            self.zero_grad(**(zero_kwargs or {}))
            return
        self._check_closure_use(num_items)
        # MMEngine's way, the closure among the step's arguments, is evaluated anew
        given = self._given_closure(kwargs.get("closure") if closure is None else closure)
        self.backward(loss)
        # LBFGS evaluates where the weights stand before it moves them: that evaluation is `loss`. Others
        # (schedule-free's closure variants) move them first, and evaluate anew.
        lbfgs = closure is not None and isinstance(self.optimizer, torch.optim.LBFGS)
        kwargs["closure"] = Reevaluation(given, self._clip_closure(), first=loss.detach() if lbfgs else None)
        self.step(**kwargs)
        self.zero_grad(**(zero_kwargs or {}))

    @property
    def needs_closure(self) -> bool:
        """Whether the optimizer's step needs a closure (``torch.optim.LBFGS``): see ``update_params``."""
        return self._needs_closure

    def unscale_grads(self) -> None:
        """Bring the window's gradients to their true scale now (no-op without a float16 scaler).

        The step does it before clipping, and before ``BEFORE_OPTIM_STEP``
        hooks. Calling it again before the step does nothing.
        """

    def _inverse_scale(self) -> torch.Tensor | None:
        """``1 / loss scale`` while the gradients are scaled (``AmpOptimWrapper``); ``None`` here."""
        return None

    def _optimizer_step(self, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """Step the optimizer; return a found-inf tensor when the step may have been skipped."""
        self.optimizer.step(**kwargs)
        return None

    def _cancel_optimizer_step(self) -> torch.Tensor:
        """Leave the parameters as they are; return a found-inf flag that says so."""
        return torch.ones(())

    def _optimizer_step_unless(self, when: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Step, then take the step back on the device where ``when``; the found-inf flag with ``when`` in it."""
        undo = StepUndo(self.optimizer)
        found_inf = self._optimizer_step(kwargs)
        undo.where(when)
        cancelled = when.to(torch.float32)
        return cancelled if found_inf is None else torch.maximum(found_inf, cancelled.to(found_inf.device))

    def _record_step(self, found_inf: torch.Tensor | None, grad_norm: torch.Tensor | None) -> None:
        """Count the window's step without reading any tensor on the host."""
        self._steps += 1
        self._last_found_inf = found_inf
        if found_inf is not None:
            pending = self._skipped_on_device
            self._skipped_on_device = found_inf if pending is None else pending + found_inf
        if grad_norm is not None:
            if found_inf is not None:  # keep the norm of the last step that was applied
                previous = self._grad_norm if self._grad_norm is not None else torch.full_like(grad_norm, torch.nan)
                grad_norm = torch.where(found_inf.to(grad_norm.device) > 0, previous, grad_norm)
            self._grad_norm = grad_norm

    # ------------------------------------------------------------------ what happened

    @property
    def step_count(self) -> int:
        """Windows that reached the optimizer step, applied or skipped; the one being stepped counts.

        A Python int, read without waiting for the device.
        """
        return self._steps + self._stepping

    @property
    def step_was_skipped(self) -> bool:
        """Whether the last window's step applied no update (non-finite fp16 gradients, or cancelled).

        Reading it waits for the device.
        """
        return self._last_found_inf is not None and bool(self._last_found_inf)

    @property
    def skipped_steps(self) -> int:
        """Number of windows whose step was skipped. Reading it waits for the device."""
        pending = 0 if self._skipped_on_device is None else int(self._skipped_on_device.item())
        return self._skipped_loaded + pending

    @property
    def applied_steps(self) -> int:
        """Number of windows whose step updated the parameters. Reading it waits for the device."""
        return self._steps - self.skipped_steps

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """Total gradient norm before clipping, of the last applied step, as a tensor.

        Set only when clipping by norm (``None`` before the first step); use
        ``clip_grad=dict(max_norm=float('inf'))`` to measure the norm without
        clipping. A skipped step keeps the norm of the last applied one (``nan``
        if none was applied yet).
        """
        return self._grad_norm

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict plus the wrapper's counters, and mid-window the window's gradients.

        The optimizer's keys stay at the top level, so the result also loads
        into a plain optimizer. ``'counters'`` holds the micro-step and update
        counts; between two micro-steps of a window, ``'accumulated_grads'``
        holds the gradients summed so far, so a resumed run continues exactly
        (in a distributed run, ``'rank_accumulated_grads'`` holds each rank's,
        gathered by a collective call), and ``'accumulated_items'``
        (``'rank_accumulated_items'``) the items counted so far when the
        window's micro-steps gave ``num_items`` (the format: ``window_state``).
        A ``ZeroRedundancyOptimizer`` is consolidated first: every rank must
        call this, and each gets the whole state.
        """
        state = distributed.optimizer_state_dict(self.optimizer)
        state["optimizer_type"] = window_state.optimizer_type(self.optimizer)
        state["counters"] = {
            "inner_count": self._inner_count,
            "max_counts": self._max_counts,
            "steps": self._steps,
            "skipped_steps": self.skipped_steps,
            "accumulative_counts": self._accumulative_counts,
        }
        if self.in_window:
            grads = [None if param.grad is None else param.grad.detach().clone() for param in self._params()]
            items = None if self._window_items is None else int(self._window_items)  # num_items: the count so far
            state.update(window_state.window_entries(grads, items))
        return state

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise ``ValueError``/``TypeError`` if ``state_dict`` cannot be loaded; change nothing.

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(1, 1)
            >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
            >>> wrapper.check_state_dict(  # doctest: +NORMALIZE_WHITESPACE
            ...     {"lr": 0.1})
            Traceback (most recent call last):
            ...
            ValueError: state_dict lacks the optimizer key(s) ['state', 'param_groups'];
            got keys ['lr']. ...
        """
        if isinstance(state_dict, Mapping):
            window_state.check_optimizer_type(state_dict, self.optimizer)
        check_optimizer_state(self.optimizer, self._in_layout(state_dict))
        window_state.check(state_dict, self._params(), self._accumulative_counts)

    def _in_layout(self, state_dict: Any) -> Any:
        """``state_dict`` in this optimizer's param groups, where MMEngine saved it one group per parameter."""
        return regrouped(self.optimizer, state_dict) if isinstance(state_dict, Mapping) else state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what ``state_dict()`` returned, or a plain optimizer's state dict.

        The whole dict is checked first (``check_state_dict``): on error
        nothing is loaded. The caller's dict is not modified. The parameters'
        gradients become the state's: those of its window when it was saved
        mid-window, none otherwise (whatever they held before is dropped).
        Where a config chose the ``implementation``, the optimizer keeps it
        (its groups' ``foreach`` and ``fused``), whatever the state was saved with.
        A window saved with ``num_items`` keeps its item count
        (``'accumulated_items'``): it loads into a wrapper with the same
        ``accumulative_counts``, like any mid-window state, and must be
        continued with ``num_items`` (a micro-step without it is refused).
        """
        self.check_state_dict(state_dict)
        state_dict = self._in_layout(state_dict)
        # the config's implementation stays: torch's load would take the saved groups' foreach and fused
        kept = None if self.implementation is None else step_flags(self.optimizer)
        self.optimizer.load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        if kept is not None:
            put_back_step_flags(self.optimizer, kept)
        counters = state_dict.get("counters")
        if counters is not None:
            self._inner_count = counters.get("inner_count", self._inner_count)
            self._max_counts = counters.get("max_counts", self._max_counts)
            self._steps = counters.get("steps", self._steps)
            self._skipped_loaded = counters.get("skipped_steps", self.skipped_steps)
            self._skipped_on_device = None
            self._last_found_inf = None
        self._window_items = window_state.saved_items(state_dict)  # None: no window, or one without num_items
        grads = window_state.saved_grads(state_dict)
        for index, param in enumerate(self._params()):  # between windows, a state has no gradients: none stay
            grad = None if grads is None else grads[index]
            param.grad = None if grad is None else grad.detach().to(param.device, param.dtype, copy=True)

    def __repr__(self) -> str:
        clip = None if self._clipper is None else dict(self._clipper.as_config())
        optimizer = repr(self.optimizer).replace("\n", "\n  ")
        sync = "  sync_each_micro_step=True,\n" if self.sync_each_micro_step else ""
        sync += "" if self._sam is None else f"  sam={self._sam},\n"
        sync += "" if self.implementation is None else f"  implementation={self.implementation},\n"
        return (
            f"{type(self).__name__}(\n  accumulative_counts={self._accumulative_counts},\n"
            f"  clip_grad={clip},\n{sync}{self._extra_repr()}  optimizer={optimizer},\n)"
        )

    def _extra_repr(self) -> str:
        return ""
