"""``create_trainer``: an Ignite ``Engine`` whose process function delegates to the wrapper.

The trainer is a ``Trainer``, an ``Engine`` subclass (as Ignite's own
``DeterministicEngine`` is) that registers ``OptimEvents`` and fires each of
them from the wrappers' step hook of the same name, only while a handler
listens to it. When a run starts or resumes it tells each wrapper where the
run stands and how long it is, so the last accumulation window is applied
and divided by its true size.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from ignite.engine import CallableEventWithFilter, Engine, Events, State
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..optim import checks, distributed
from ..optim.hooks import StepEvent, StepHook
from ..optim.modes import has_modes, set_mode
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict, members
from .events import EVENT_TO_ATTR, OptimEvents
from .ignite_internals import fire_registered, forget_failed_run
from .process import (
    OutputTransform,
    PrepareBatch,
    SupervisedStep,
    TrainStep,
    check_callable,
    default_model_fn,
    default_model_transform,
    loss_output,
    mmengine_step,
    prepare_batch,
    supervised_step,
)
from .state import OptimState, TrainerState, check_engine_state


class Trainer(Engine):
    """An Ignite ``Engine`` that fires ``OptimEvents`` for the wrappers it trains.

    ``engine.state`` is a ``TrainerState``: ``engine.state.optim`` holds the
    members and the member of the event being handled. While a run is in
    progress, every optimizer event that a handler listens to has a step hook
    on every member, and no other: events nobody listens to cost nothing (a
    float16 step's outcome is not read on the host), and a wrapper used
    outside the run (by hand, or by another trainer) fires nothing here.

    Args:
        process_function: The process function, as for ``Engine``.
        optim_wrapper: The wrapper, or the dict of wrappers, it trains.
    """

    state: TrainerState

    def __init__(self, process_function: TrainStep, optim_wrapper: OptimWrapper | OptimWrapperDict) -> None:
        self._listeners: dict[StepEvent, Counter[Any]] = {event: Counter() for event in StepEvent}
        self._bridges: dict[StepEvent, list[RemovableHandle]] = {}
        self._at_run_end: contextlib.ExitStack | None = None  # set while a run is in progress
        self._loaded = False  # the state came from load_state_dict and no run has started since
        super().__init__(process_function)
        self.state = TrainerState(OptimState(members=dict(members(optim_wrapper))))
        self.register_events(*OptimEvents, event_to_attr=EVENT_TO_ATTR)

    def add_event_handler(self, event_name: Any, handler: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``Engine.add_event_handler``; the first handler of an optimizer event starts its firing."""
        handle = super().add_event_handler(event_name, handler, *args, **kwargs)
        step_event = _step_event(event_name)
        if step_event is not None:
            self._listeners[step_event][_handler_key(handler)] += 1
            self._connect(step_event)
        return handle

    def remove_event_handler(self, handler: Callable[..., Any], event_name: Any) -> None:
        """``Engine.remove_event_handler`` (every copy of ``handler``, as Ignite does); the last stops the firing."""
        super().remove_event_handler(handler, event_name)
        step_event = _step_event(event_name)
        if step_event is not None:
            self._listeners[step_event].pop(_handler_key(handler), None)
            if not self._listeners[step_event]:
                self._disconnect(step_event)

    def load_state_dict(self, state_dict: Any) -> None:
        """``Engine.load_state_dict``; a loaded run that is already complete is then not run again."""
        super().load_state_dict(state_dict)
        self._loaded = True

    def run(
        self,
        data: Iterable[Any] | None = None,
        max_epochs: int | None = None,
        max_iters: int | None = None,
        epoch_length: int | None = None,
    ) -> State:
        """``Engine.run``, except that a complete run loaded from a checkpoint returns at once, unchanged.

        Ignite starts a complete run over from iteration 0; a resumed run that
        had already finished (a script run again on its checkpoints) would then
        silently train anew. Asking for more epochs (or iterations) than the
        loaded run had continues it as usual.
        """
        if self._loaded and self._ends_where_loaded(max_epochs, max_iters):
            self.logger.info(f"the loaded run is complete at iteration {self.state.iteration}: nothing to run")
            return self.state
        self._loaded = False
        with contextlib.ExitStack() as self._at_run_end:
            for event in StepEvent:
                self._connect(event)
            self._at_run_end.callback(self._disconnect_all)
            try:
                return super().run(data, max_epochs=max_epochs, max_iters=max_iters, epoch_length=epoch_length)
            except BaseException:
                forget_failed_run(self)
                raise
            finally:
                self._at_run_end = None

    def call_at_run_end(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` when the run in progress ends, however it ends (completed, terminated, raised).

        Handlers hold resources for a run with it (``attach_checkpoint`` its
        directory's lock).

        Raises:
            RuntimeError: No run is in progress.
        """
        if self._at_run_end is None:
            raise RuntimeError("call_at_run_end() is for a handler of a run in progress; no run is")
        self._at_run_end.callback(callback)

    def _ends_where_loaded(self, max_epochs: int | None, max_iters: int | None) -> bool:
        """Whether the run asked for ends exactly at the loaded iteration."""
        state = self.state
        if max_iters is not None or state.max_iters is not None:
            return bool(state.iteration == (max_iters if max_iters is not None else state.max_iters))
        epochs = max_epochs if max_epochs is not None else state.max_epochs
        if epochs is None or state.epoch_length is None:
            return False
        return bool(state.iteration == state.epoch_length * epochs)

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise if ``load_state_dict`` would refuse ``state_dict``; change nothing (see ``check_engine_state``)."""
        check_engine_state(self, state_dict)

    def _connect(self, event: StepEvent) -> None:
        """During a run, while a handler listens to ``event``: a step hook for it on every member."""
        if self._at_run_end is None or event in self._bridges or not self._listeners[event]:
            return
        self._bridges[event] = [
            wrapper.register_step_hook(_bridge(self, name), [event])
            for name, wrapper in self.state.optim.members.items()
        ]

    def _disconnect(self, event: StepEvent) -> None:
        for handle in self._bridges.pop(event, []):
            handle.remove()

    def _disconnect_all(self) -> None:
        for event in StepEvent:
            self._disconnect(event)


def _handler_key(handler: Callable[..., Any]) -> Any:
    """How Ignite tells handlers apart when it removes one (by equality): the handler, or its id if unhashable."""
    try:
        hash(handler)
    except TypeError:
        return id(handler)
    return handler


def _step_event(event_name: Any) -> StepEvent | None:
    """The wrapper step event behind ``event_name`` (an ``OptimEvents`` member, filtered or not), or None."""
    if isinstance(event_name, CallableEventWithFilter) and event_name.name in OptimEvents.__members__:
        return StepEvent[event_name.name]
    return None


def _bridge(trainer: Trainer, name: str | None) -> StepHook:
    """A wrapper step hook that fires the trainer's matching event.

    It holds the trainer by a weak reference: the trainer holds the wrapper,
    and a cycle would keep both, and a DDP model's reducer, alive until the
    garbage collector runs, possibly after the process group is gone.
    """
    trainer_ref = weakref.ref(trainer)

    def fire(wrapper: OptimWrapper, event: StepEvent, loss: torch.Tensor | None) -> None:
        trainer = trainer_ref()
        if trainer is None:  # the wrapper outlived its trainer and is used on its own
            return
        optim = trainer.state.optim
        optim.name, optim.wrapper, optim.loss, optim.event = name, wrapper, loss, event
        fire_registered(trainer, OptimEvents.of(event))

    return fire


def _refuse_supervised_options(step: str, **options: Any) -> None:
    """Without ``loss_fn`` the default process function does not run: its options, given, would be ignored."""
    defaults = inspect.signature(create_trainer).parameters
    given = [name for name, value in options.items() if value is not defaults[name].default]
    if given:
        raise ValueError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for the default process function, which "
            f"{step} replaces, and would be ignored: do that work in {step}, or pass loss_fn instead"
        )


def _check_supervised(how: SupervisedStep) -> None:
    check_callable("prepare_batch", how.prepare_batch, 3, "prepare_batch(batch, device, non_blocking)")
    check_callable("model_fn", how.model_fn, 2, "model_fn(model, x)")
    check_callable("model_transform", how.model_transform, 1, "model_transform(output)")
    check_callable("output_transform", how.output_transform, 4, "output_transform(x, y, y_pred, loss)")
    if how.num_items is not None:
        check_callable("num_items", how.num_items, 2, "num_items(x, y) -> int or 0-d integer tensor")


def _check_device(device: Any) -> None:
    """A device torch knows and this machine has (``None``: batches stay where they are)."""
    if device is None:
        return
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"device must be a str or torch.device such as 'cpu' or 'cuda:0', got {checks.describe(device)}"
        )
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must name a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    checks_by_type: dict[str, Callable[[], bool]] = {
        "cuda": torch.cuda.is_available,
        "mps": torch.backends.mps.is_available,
    }
    available = checks_by_type.get(parsed.type)
    if available is not None and not available():
        raise ValueError(f"device {device!r}: no {parsed.type.upper()} device is available here")


def _check_arguments(model: Any, optim_wrapper: Any, loss_fn: Any, train_step: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {checks.describe(model)}")
    if not isinstance(optim_wrapper, (OptimWrapper, OptimWrapperDict)):
        raise TypeError(
            f"optim_wrapper must be an OptimWrapper or an OptimWrapperDict, got {checks.describe(optim_wrapper)}; "
            "wrap the optimizer first, e.g. OptimWrapper(SGD(model.parameters(), lr=0.01))"
        )
    if train_step is not None:
        if loss_fn is not None:
            raise ValueError("pass either loss_fn or train_step, not both: train_step computes its own loss")
        check_callable("train_step", train_step, 2, "train_step(engine, batch)")
        return
    if loss_fn is not None:
        check_callable("loss_fn", loss_fn, 2, "loss_fn(y_pred, y)")
        if isinstance(optim_wrapper, OptimWrapperDict):
            raise ValueError(
                f"an OptimWrapperDict (members {list(optim_wrapper)}) needs train_step(engine, batch) that "
                "updates each member; loss_fn alone cannot say which loss goes to which optimizer"
            )
        return
    if not callable(getattr(model, "train_step", None)):
        raise ValueError(
            "create_trainer needs loss_fn, or train_step(engine, batch), or a model that defines "
            f"train_step(data, optim_wrapper); {type(model).__name__} has none of them"
        )


def _check_the_wrapper_trains_the_model(model: nn.Module, optim_wrapper: OptimWrapper | OptimWrapperDict) -> None:
    """Refuse a wrapper that updates none of the model's parameters: every update would change nothing."""
    own = {id(param) for param in model.parameters()}
    updated = [
        param for _, wrapper in members(optim_wrapper) for group in wrapper.param_groups for param in group["params"]
    ]
    if updated and own.isdisjoint(map(id, updated)):
        raise ValueError(
            f"optim_wrapper updates none of the model's parameters ({len(updated)} in its param groups, "
            f"{len(own)} in {type(model).__name__}): every update would leave the model as it is; build the "
            "optimizer from this model's parameters (after moving or wrapping it, e.g. DDP(model).parameters())"
        )


def create_trainer(
    model: nn.Module,
    optim_wrapper: OptimWrapper | OptimWrapperDict,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    *,
    device: str | torch.device | None = None,
    train_step: TrainStep | None = None,
    prepare_batch: PrepareBatch = prepare_batch,
    model_fn: Callable[[nn.Module, Any], Any] = default_model_fn,
    model_transform: Callable[[Any], Any] = default_model_transform,
    output_transform: OutputTransform = loss_output,
    non_blocking: bool = False,
    num_items: Callable[[Any, Any], int | torch.Tensor] | None = None,
) -> Trainer:
    """Build an Ignite trainer whose every update goes through ``optim_wrapper``.

    Args:
        model: The model to train (already on its device).
        optim_wrapper: An ``OptimWrapper``/``AmpOptimWrapper``, or an
            ``OptimWrapperDict`` (then ``train_step`` does the updates).
        loss_fn: ``loss_fn(y_pred, y)``, for the default process function.
        device: Where ``prepare_batch`` moves each batch (default: left as is).
        train_step: ``train_step(engine, batch)`` replacing the default process
            function: it runs forward passes inside ``optim_context`` and calls
            ``update_params`` on the wrapper (or on each member of a dict).
            Without ``loss_fn`` and ``train_step``, a model that defines
            MMEngine's ``train_step(data, optim_wrapper)`` is called instead.
        prepare_batch: ``prepare_batch(batch, device, non_blocking) -> (x, y)``;
            the default splits batches as Ignite's ``create_supervised_trainer``
            does (see ``engine_opt.engine.process.prepare_batch``).
        model_fn: ``model_fn(model, x)``, the forward pass (default ``model(x)``), as in Ignite.
        model_transform: ``model_transform(output) -> y_pred`` (default: the output), as in Ignite.
        output_transform: ``output_transform(x, y, y_pred, loss)``, the
            engine's output each iteration; by default the detached loss tensor
            (not a Python float: no host sync per iteration).
        non_blocking: Passed to ``prepare_batch``.
        num_items: ``num_items(x, y) -> n``, for token-weighted accumulation:
            how many items (tokens, samples) the loss of the batch ``(x, y)``
            sums over; ``loss_fn`` must then return that sum (e.g.
            ``reduction='sum'``), and each update is the mean over the window's
            items (``OptimWrapper.update_params(loss, num_items=n)``). ``n`` is an
            int or a 0-d integer tensor on the model's device (never read on the
            host). The engine's output is then the summed loss.

    ``device``, ``prepare_batch``, ``non_blocking``, ``model_fn``,
    ``model_transform``, ``output_transform`` and ``num_items`` shape the default process
    function, so they go with ``loss_fn``; given with ``train_step`` (or a
    model's ``train_step``), which they would not reach, they are refused.

    When a run starts or resumes, each wrapper gets
    ``initialize_count_status(model, iteration, max_iterations)``, as in
    MMEngine's loops: this assumes one ``backward`` per iteration for each
    wrapper. Data without a length (and no ``epoch_length``) leaves the run
    length unknown, and a trailing partial window is not applied. In a
    distributed run, the ranks' epoch lengths are compared first, and a run
    whose ranks would do different numbers of iterations is refused instead
    of hanging.

    Returns:
        The trainer, a ``Trainer``. ``OptimEvents`` are registered on it;
        ``engine.state`` counts them in ``optim_backwards``,
        ``optim_steps``, ``optim_updates`` (applied) and ``optim_skipped``.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from engine_opt import OptimWrapper
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> wrapper = OptimWrapper(optimizer, accumulative_counts=2)
        >>> trainer = create_trainer(model, wrapper, F.mse_loss)
        >>> data = [(torch.ones(4, 2), torch.zeros(4, 1))] * 5
        >>> state = trainer.run(data, max_epochs=1)
        >>> # the last window, of one micro-step, is applied too
        >>> state.optim_backwards, state.optim_updates
        (5, 3)
    """
    _check_arguments(model, optim_wrapper, loss_fn, train_step)
    _check_device(device)
    if loss_fn is None:
        _refuse_supervised_options(
            "train_step" if train_step is not None else f"{type(model).__name__}.train_step",
            device=device,
            prepare_batch=prepare_batch,
            non_blocking=non_blocking,
            model_fn=model_fn,
            model_transform=model_transform,
            output_transform=output_transform,
            num_items=num_items,
        )
    if train_step is None and loss_fn is not None:
        how = SupervisedStep(
            loss_fn, prepare_batch, device, non_blocking, model_fn, model_transform, output_transform, num_items
        )
        _check_supervised(how)
        wrapper: OptimWrapper = optim_wrapper  # type: ignore[assignment]  # _check_arguments refused a dict
        if wrapper.needs_closure and wrapper.sam is None and how.num_items is not None:
            raise ValueError(
                f"num_items weights the micro-steps of an accumulation window, and {type(wrapper.optimizer).__name__} "
                "re-evaluates one batch's mean loss in its step: leave num_items out with this optimizer"
            )
        train_step = supervised_step(model, wrapper, how)
    elif train_step is None:
        train_step = mmengine_step(model, optim_wrapper)
    _check_the_wrapper_trains_the_model(model, optim_wrapper)  # last: the errors of the arguments come first
    trainer = Trainer(train_step, optim_wrapper)
    trainer.add_event_handler(Events.STARTED, _start_run, model)
    _attach_modes(trainer, optim_wrapper)
    return trainer


def _attach_modes(trainer: Trainer, optim_wrapper: OptimWrapper | OptimWrapperDict) -> None:
    """Schedule-free optimizers: train mode for each iteration; eval mode when an epoch or the run ends (however:
    terminated, raised), before the handlers attached later (an evaluation, a checkpoint) run."""
    optimizers = [wrapper.optimizer for _, wrapper in members(optim_wrapper) if has_modes(wrapper.optimizer)]
    if not optimizers:
        return

    def switch(engine: Engine, train: bool) -> None:
        for optimizer in optimizers:
            set_mode(optimizer, train)

    trainer.add_event_handler(Events.ITERATION_STARTED, switch, True)
    trainer.add_event_handler(Events.EPOCH_COMPLETED | Events.COMPLETED | Events.TERMINATE, switch, False)
    # however the run ends (an exception too): the weights the optimizer means
    trainer.add_event_handler(Events.STARTED, lambda engine: engine.call_at_run_end(lambda: switch(engine, False)))


def _start_run(engine: Trainer, model: nn.Module) -> None:
    """Tell the wrappers the run length, after checking that every rank runs as long."""
    state = engine.state
    distributed.check_same_length(state.epoch_length)
    total = -1
    if state.max_iters is not None:
        total = state.max_iters
    elif state.epoch_length is not None and state.max_epochs is not None:
        total = state.epoch_length * state.max_epochs
    for wrapper in state.optim.members.values():
        wrapper.initialize_count_status(model, state.iteration, total)
    state.optim.name, state.optim.wrapper, state.optim.loss, state.optim.event = None, None, None, None
