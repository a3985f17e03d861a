"""The process functions ``create_trainer`` builds: one iteration of training, written out.

The supervised step is the tutorial's loop body::

    x, y = prepare_batch(batch, device, non_blocking)
    with optim_wrapper.optim_context(model):
        y_pred = model(x)
        loss = loss_fn(y_pred, y)
    optim_wrapper.update_params(loss)                # num_items=...: update_params(loss, num_items=num_items(x, y))
                                                     # LBFGS, SAM: update_params(loss, closure=...), the same again
    return output_transform(x, y, y_pred, loss)      # default: loss.detach(), no host sync

Examples:
    >>> x, y = prepare_batch((torch.ones(2, 3), torch.zeros(2)))
    >>> tuple(x.shape), tuple(y.shape)
    ((2, 3), (2,))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from ignite.engine import Engine
from ignite.utils import convert_tensor
from torch import nn

from ..optim import checks
from ..optim.closure import Closure
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict

TrainStep = Callable[[Engine, Any], Any]
"""A process function: ``train_step(engine, batch) -> output``."""
PrepareBatch = Callable[[Any, "str | torch.device | None", bool], tuple[Any, Any]]
OutputTransform = Callable[[Any, Any, Any, torch.Tensor], Any]


_MAPPING_KEYS = (("x", "y"), ("input", "target"))


def prepare_batch(batch: Any, device: str | torch.device | None = None, non_blocking: bool = False) -> tuple[Any, Any]:
    """Split ``batch`` into ``(x, y)`` and move both to ``device``, as Ignite's ``create_supervised_trainer`` does.

    What unpacks into exactly two is split so (a tuple, a list, a tensor
    whose first dimension is 2); a mapping is split by its keys ``'x'`` and
    ``'y'``, or ``'input'`` and ``'target'`` (Ignite would unpack its keys).
    Anything else is refused with what to pass instead.
    """
    if isinstance(batch, Mapping):
        keys = next((pair for pair in _MAPPING_KEYS if all(key in batch for key in pair)), None)
        if keys is None:
            raise ValueError(
                f"the default prepare_batch splits a dict batch by its keys 'x' and 'y' (or 'input' and 'target'), "
                f"got keys {list(batch)}; pass prepare_batch=... or train_step=... for other layouts"
            )
        x, y = batch[keys[0]], batch[keys[1]]
    else:
        parts = _two_parts(batch)
        if parts is None:
            raise ValueError(
                f"the default prepare_batch expects batches of (x, y), got {checks.describe(batch)}; "
                "pass prepare_batch=... or train_step=... for other batch layouts"
            )
        x, y = parts
    return (
        convert_tensor(x, device=device, non_blocking=non_blocking),
        convert_tensor(y, device=device, non_blocking=non_blocking),
    )


def _two_parts(batch: Any) -> tuple[Any, Any] | None:
    """``batch`` unpacked into two, or None where it does not unpack into exactly two (strings neither)."""
    if isinstance(batch, (str, bytes)) or (isinstance(batch, torch.Tensor) and (batch.dim() == 0 or len(batch) != 2)):
        return None
    try:
        x, y = batch
    except (TypeError, ValueError):
        return None
    return x, y


def loss_output(x: Any, y: Any, y_pred: Any, loss: torch.Tensor) -> torch.Tensor:
    """The default ``output_transform``: the detached loss tensor (not a float: no host sync)."""
    return loss.detach()


def default_model_fn(model: nn.Module, x: Any) -> Any:
    """The default ``model_fn``: ``model(x)``."""
    return model(x)


def default_model_transform(output: Any) -> Any:
    """The default ``model_transform``: the model's output as it is."""
    return output


def check_callable(name: str, value: Any, arity: int, usage: str) -> None:
    """Raise ``TypeError`` unless ``value`` can be called with ``arity`` positional arguments."""
    if not callable(value):
        raise TypeError(f"{name} must be callable as {usage}, got {checks.describe(value)}")
    try:
        inspect.signature(value).bind(*range(arity))
    except TypeError:
        raise TypeError(f"{name} must accept {arity} positional argument(s), as {usage}; got {value!r}") from None
    except ValueError:  # no signature (some builtins): trust it
        pass


@dataclass(frozen=True)
class SupervisedStep:
    """How ``create_trainer``'s default process function turns a batch into a loss (Ignite's arguments)."""

    loss_fn: Callable[..., torch.Tensor]
    prepare_batch: PrepareBatch
    device: str | torch.device | None = None
    non_blocking: bool = False
    model_fn: Callable[[nn.Module, Any], Any] = default_model_fn
    model_transform: Callable[[Any], Any] = default_model_transform
    output_transform: OutputTransform = loss_output
    num_items: Callable[[Any, Any], int | torch.Tensor] | None = None


def supervised_step(model: nn.Module, wrapper: OptimWrapper, how: SupervisedStep) -> TrainStep:
    """``loss_fn(model(x), y)`` through ``wrapper``; an error of the forward pass or the loss names the batch."""

    reevaluates = wrapper.needs_closure

    def step(engine: Engine, batch: Any) -> Any:
        if not model.training:
            model.train()
        x, y = how.prepare_batch(batch, how.device, how.non_blocking)
        try:
            with wrapper.optim_context(model):
                y_pred = how.model_transform(how.model_fn(model, x))
                loss = how.loss_fn(y_pred, y)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:  # wrong shapes, dtypes, devices
            _add_note(
                error,
                f"engine_opt: iteration {engine.state.iteration} failed on x = {_describe(x)}, y = {_describe(y)}",
            )
            raise
        # its errors, and its event handlers', say what they are about themselves
        if reevaluates:  # LBFGS, SAM: the step evaluates the model again on this batch
            items = None if how.num_items is None else how.num_items(x, y)  # SAM only: create_trainer refuses LBFGS's
            wrapper.update_params(loss, closure=reevaluation(model, wrapper, how, x, y), num_items=items)
        elif how.num_items is None:
            wrapper.update_params(loss)
        else:  # token-weighted: loss_fn sums over the items, the window's gradients are divided by their count
            wrapper.update_params(loss, num_items=how.num_items(x, y))
        return how.output_transform(x, y, y_pred, loss)

    return step


def reevaluation(model: nn.Module, wrapper: OptimWrapper, how: SupervisedStep, x: Any, y: Any) -> Closure:
    """torch's closure for the batch ``(x, y)``: zero the gradients, evaluate as the step does, backward.

    With ``sam`` the wrapper runs the backward itself (scaled for float16): the closure returns the loss.
    """
    backward = wrapper.sam is None

    def closure() -> torch.Tensor:
        wrapper.optimizer.zero_grad()
        with wrapper.optim_context(model):
            loss = how.loss_fn(how.model_transform(how.model_fn(model, x)), y)
        if backward:
            loss.backward()  # type: ignore[no-untyped-call]
        return loss

    return closure


def mmengine_step(model: nn.Module, optim_wrapper: OptimWrapper | OptimWrapperDict) -> TrainStep:
    """An MMEngine model's ``train_step(data, optim_wrapper)``, which does the whole update."""
    model_step: Callable[[Any, Any], Any] = getattr(model, "train_step")  # noqa: B009

    def step(engine: Engine, batch: Any) -> Any:
        if not model.training:
            model.train()
        return model_step(batch, optim_wrapper)

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
