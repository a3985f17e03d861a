"""``create_trainer``: an Ignite ``Engine`` whose process function delegates to the wrapper.

One iteration of the default process function is the tutorial's loop body::

    x, y = prepare_batch(batch, device, non_blocking)
    with optim_wrapper.optim_context(model):
        y_pred = model(x)
        loss = loss_fn(y_pred, y)
    optim_wrapper.update_params(loss)
    return output_transform(x, y, y_pred, loss)      # default: loss.detach(), no host sync

The trainer registers ``OptimEvents`` (see ``engine_opt.events``) and, when a
run starts or resumes, tells each wrapper where the run stands and how long it
is, so the last accumulation window is applied and divided by its true size.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from ignite.engine import Engine, Events
from ignite.utils import convert_tensor
from torch import nn

from . import checks, parallel
from .events import EVENT_TO_ATTR, OptimEvents
from .wrapper import OptimWrapper
from .wrapper_dict import OptimWrapperDict

TrainStep = Callable[[Engine, Any], Any]


def prepare_batch(
    batch: Sequence[Any], device: str | torch.device | None = None, non_blocking: bool = False
) -> tuple[Any, Any]:
    """Split ``batch`` into ``(x, y)`` and move both to ``device``.

    Example:
        >>> x, y = prepare_batch((torch.ones(2, 3), torch.zeros(2)))
        >>> tuple(x.shape), tuple(y.shape)
        ((2, 3), (2,))
    """
    if not isinstance(batch, Sequence) or len(batch) != 2:
        raise ValueError(
            f"the default prepare_batch expects batches of (x, y), got {checks.describe(batch)}; "
            "pass prepare_batch=... or train_step=... for other batch layouts"
        )
    x, y = batch
    return (
        convert_tensor(x, device=device, non_blocking=non_blocking),
        convert_tensor(y, device=device, non_blocking=non_blocking),
    )


def _loss_output(x: Any, y: Any, y_pred: Any, loss: torch.Tensor) -> torch.Tensor:
    return loss.detach()


def _members(optim_wrapper: OptimWrapper | OptimWrapperDict) -> list[tuple[str | None, OptimWrapper]]:
    if isinstance(optim_wrapper, OptimWrapperDict):
        return [(name, wrapper) for name, wrapper in optim_wrapper.items()]
    return [(None, optim_wrapper)]


def _check_callable(name: str, value: Any, arity: int, usage: str) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be callable as {usage}, got {checks.describe(value)}")
    try:
        inspect.signature(value).bind(*range(arity))
    except TypeError:
        raise TypeError(f"{name} must accept {arity} positional argument(s), as {usage}; got {value!r}") from None
    except ValueError:  # no signature (some builtins): trust it
        pass


def _process_function(
    model: nn.Module,
    optim_wrapper: OptimWrapper | OptimWrapperDict,
    loss_fn: Callable[..., torch.Tensor] | None,
    train_step: TrainStep | None,
    prepare: Callable[..., tuple[Any, Any]],
    device: str | torch.device | None,
    non_blocking: bool,
    output_transform: Callable[[Any, Any, Any, torch.Tensor], Any],
) -> TrainStep:
    if train_step is not None:
        return train_step
    if loss_fn is None:  # an MMEngine model: train_step(data, optim_wrapper) does the whole update
        model_step: Callable[[Any, Any], Any] = getattr(model, "train_step")  # noqa: B009

        def mmengine_step(engine: Engine, batch: Any) -> Any:
            if not model.training:
                model.train()
            return model_step(batch, optim_wrapper)

        return mmengine_step
    wrapper = cast(OptimWrapper, optim_wrapper)  # create_trainer refuses a dict with loss_fn

    def step(engine: Engine, batch: Any) -> Any:
        if not model.training:
            model.train()
        x, y = prepare(batch, device, non_blocking)
        try:
            with wrapper.optim_context(model):
                y_pred = model(x)
                loss = loss_fn(y_pred, y)
            wrapper.update_params(loss)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:  # wrong shapes, dtypes, devices
            _add_note(
                error,
                f"engine_opt: iteration {engine.state.iteration} failed on x = {_describe(x)}, y = {_describe(y)}",
            )
            raise
        return output_transform(x, y, y_pred, loss)

    return step


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor {tuple(value.shape)} on {value.device}"
    return checks.describe(value)


def _add_note(error: BaseException, note: str) -> None:
    """Say which batch a torch error came from (Python 3.11+ shows notes under the message)."""
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(note)


def _check_arguments(
    model: Any,
    optim_wrapper: Any,
    loss_fn: Any,
    train_step: Any,
) -> None:
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
        _check_callable("train_step", train_step, 2, "train_step(engine, batch)")
        return
    if loss_fn is not None:
        _check_callable("loss_fn", loss_fn, 2, "loss_fn(y_pred, y)")
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


def create_trainer(
    model: nn.Module,
    optim_wrapper: OptimWrapper | OptimWrapperDict,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    *,
    device: str | torch.device | None = None,
    train_step: TrainStep | None = None,
    prepare_batch: Callable[..., tuple[Any, Any]] = prepare_batch,
    output_transform: Callable[[Any, Any, Any, torch.Tensor], Any] = _loss_output,
    non_blocking: bool = False,
) -> Engine:
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
        prepare_batch: ``prepare_batch(batch, device, non_blocking) -> (x, y)``.
        output_transform: ``output_transform(x, y, y_pred, loss)``, the
            engine's output each iteration; by default the detached loss tensor
            (not a Python float: no host sync per iteration).
        non_blocking: Passed to ``prepare_batch``.

    When a run starts or resumes, each wrapper gets
    ``initialize_count_status(model, iteration, max_iterations)``, as in
    MMEngine's loops: this assumes one ``backward`` per iteration for each
    wrapper. Data without a length (and no ``epoch_length``) leaves the run
    length unknown, and a trailing partial window is not applied. In a
    distributed run (``ignite.distributed``), the ranks' epoch lengths are
    compared first, and a run whose ranks would do different numbers of
    iterations is refused instead of hanging.

    Returns:
        The trainer. ``OptimEvents`` are registered on it; ``engine.state``
        counts them in ``optim_backwards``, ``optim_steps``,
        ``optim_updates`` (applied) and ``optim_skipped``.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from engine_opt import OptimWrapper
        >>> model = torch.nn.Linear(2, 1)
        >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
        >>> trainer = create_trainer(model, wrapper, F.mse_loss)
        >>> data = [(torch.ones(4, 2), torch.zeros(4, 1))] * 5
        >>> state = trainer.run(data, max_epochs=1)
        >>> state.optim_backwards, state.optim_updates   # the last window, of one micro-step, is applied too
        (5, 3)
    """
    _check_arguments(model, optim_wrapper, loss_fn, train_step)
    if train_step is None and loss_fn is not None:
        _check_callable("prepare_batch", prepare_batch, 3, "prepare_batch(batch, device, non_blocking)")
        _check_callable("output_transform", output_transform, 4, "output_transform(x, y, y_pred, loss)")
    process = _process_function(
        model, optim_wrapper, loss_fn, train_step, prepare_batch, device, non_blocking, output_transform
    )
    trainer = Engine(process)
    trainer.register_events(*OptimEvents, event_to_attr=EVENT_TO_ATTR)
    members = _members(optim_wrapper)
    for name, wrapper in members:
        wrapper.register_step_hook(_event_bridge(trainer, name))
    trainer.add_event_handler(Events.STARTED, _start_run, model, members)
    return trainer


def _event_bridge(trainer: Engine, name: str | None) -> Callable[[OptimWrapper, OptimEvents, Any], None]:
    """A wrapper step hook that fires the trainer's matching event.

    It holds the trainer by a weak reference (and nothing of it): the trainer
    holds the wrapper, and a cycle would keep both, and a DDP model's reducer,
    alive until the garbage collector runs, possibly after the process group
    is gone.
    """

    trainer_ref = weakref.ref(trainer)

    def fire(wrapper: OptimWrapper, event: OptimEvents, loss: torch.Tensor | None) -> None:
        trainer = trainer_ref()
        if trainer is None:  # the wrapper outlived its trainer and is used on its own
            return
        # Ignite's registry: events without handlers are not fired. Its dispatcher,
        # where there is one, skips ``fire_event``'s check that the event is registered
        # (a linear scan, ~15 µs a call): create_trainer registered these events.
        handlers = getattr(trainer, "_event_handlers", None)
        state = vars(trainer.state)
        state["optim_name"] = name
        state["optim_wrapper"] = wrapper
        state["optim_loss"] = loss
        attr = EVENT_TO_ATTR[event]
        state[attr] = state.get(attr, 0) + 1
        if handlers is None or handlers.get(event):
            if event is OptimEvents.BEFORE_OPTIM_STEP:
                wrapper.unscale_grads()  # handlers see true gradients
            getattr(trainer, "_fire_event", trainer.fire_event)(event)

    return fire


def _start_run(engine: Engine, model: nn.Module, members: list[tuple[str | None, OptimWrapper]]) -> None:
    """Tell the wrappers the run length; set the update counters from the wrappers' own."""
    state = engine.state
    parallel.check_same_length(state.epoch_length)
    total = -1
    if state.max_iters is not None:
        total = state.max_iters
    elif state.epoch_length is not None and state.max_epochs is not None:
        total = state.epoch_length * state.max_epochs
    for _, wrapper in members:
        wrapper.initialize_count_status(model, state.iteration, total)
    skipped = sum(wrapper.skipped_steps for _, wrapper in members)
    applied = sum(wrapper.applied_steps for _, wrapper in members)
    vars(state).update(
        optim_members=dict(members),
        optim_name=None,
        optim_wrapper=None,
        optim_loss=None,
        optim_backwards=sum(wrapper.inner_count for _, wrapper in members),
        optim_steps=applied + skipped,
        optim_updates=applied,
        optim_skipped=skipped,
    )
