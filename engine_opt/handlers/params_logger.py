"""``OptimParamsHandler``: log learning rates, momenta, weight decay and update health, to any Ignite logger.

Tags (``{m}`` is ``''`` for one wrapper and ``'{name}/'`` for each member of
an ``OptimWrapperDict``; ``{g}`` is a param group's ``name`` when it has one,
as ``build_optim_wrapper`` gives them, else ``group_{i}``; with ``tag``,
every tag starts with ``'{tag}/'``):

================================ ==================================================
``{m}lr/{g}``                     learning rate of the group
``{m}base_lr``                    ``get_lr()['base_lr']``: the default lr, scheduled
``{m}momentum/{g}``               ``momentum``, or ``betas[0]``, of the group
``{m}weight_decay/{g}``           ``weight_decay`` of the group
``{m}loss_scale``                 the float16 grad scaler's scale
``{m}updates_applied``            updates applied so far
``{m}updates_skipped``            updates skipped so far (non-finite gradients)
``{m}grad_norm``                  pre-clip gradient norm of the last applied update
================================ ==================================================

Each value appears where the wrapper has it: a group's ``lr``, ``momentum``
(or ``betas``) and ``weight_decay`` where the optimizer keeps them (Adagrad
has no momentum), ``loss_scale`` with a scaler, ``grad_norm`` with clipping
by norm. Every value is plotted against the trainer's iteration, the x-axis
of Ignite's own handlers and of the loss, whatever event the handler is
attached to; ``x_axis='updates'`` plots each member's values against its own
applied updates instead. At an ``OptimEvents`` event of an
``OptimWrapperDict`` member, only that member's values are logged, so each
value is logged once per update of its own.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeGuard

from ignite.engine import Engine, Events
from ignite.handlers.base_logger import BaseHandler, BaseLogger, BaseOutputHandler
from ignite.handlers.tensorboard_logger import TensorboardLogger

from ..engine.events import OptimEvents
from ..engine.state import OptimState
from ..optim import checks
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict, member_tag, members
from .tensorboard_writer import write_scalars

_X_AXES = ("iteration", "updates")


def group_labels(wrapper: OptimWrapper) -> list[str]:
    """Each param group's label in tags: its ``name``, else ``group_{i}``; never two groups the same.

    A name is used when it is a non-empty string that no other group has and
    that is not another group's ``group_{j}``.

    Examples:
        >>> import torch
        >>> a = torch.zeros(1, requires_grad=True)
        >>> b = torch.zeros(1, requires_grad=True)
        >>> groups = [{"params": [a], "name": "head"}, {"params": [b]}]
        >>> group_labels(OptimWrapper(torch.optim.SGD(groups, lr=0.1)))
        ['head', 'group_1']
    """
    names = [group.get("name") for group in wrapper.param_groups]
    taken = {f"group_{index}": index for index in range(len(names))}

    def usable(name: Any, index: int) -> TypeGuard[str]:
        return isinstance(name, str) and bool(name) and names.count(name) == 1 and taken.get(name, index) == index

    return [name if usable(name, index) else f"group_{index}" for index, name in enumerate(names)]


def member_scalars(wrapper: OptimWrapper, prefix: str = "") -> dict[str, float]:
    """The values ``OptimParamsHandler`` logs for one wrapper, by tag. Reading them waits for the device."""
    groups = wrapper.param_groups
    scalars: dict[str, Any] = {}
    base_lr = wrapper.get_lr().get("base_lr") if all("lr" in group for group in groups) else None  # several groups
    if base_lr is not None:
        scalars[f"{prefix}base_lr"] = base_lr[0]
    for label, group in zip(group_labels(wrapper), groups, strict=True):
        scalars.update({f"{prefix}{key}/{label}": value for key, value in _group_values(group)})
    if wrapper.loss_scaler is not None:
        scalars[f"{prefix}loss_scale"] = wrapper.loss_scaler.get_scale()
    scalars[f"{prefix}updates_applied"] = wrapper.applied_steps
    scalars[f"{prefix}updates_skipped"] = wrapper.skipped_steps
    if wrapper.grad_norm is not None:
        scalars[f"{prefix}grad_norm"] = wrapper.grad_norm.item()
    return {key: float(value) for key, value in scalars.items()}


def _group_values(group: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(name, value)`` of the group's lr, momentum (or ``betas[0]``) and weight decay, where it has them."""
    if "lr" in group:
        yield "lr", group["lr"]
    if "momentum" in group:
        yield "momentum", group["momentum"]
    elif "betas" in group:
        yield "momentum", group["betas"][0]
    if "weight_decay" in group:
        yield "weight_decay", group["weight_decay"]


def optim_scalars(optim_wrapper: OptimWrapper | OptimWrapperDict) -> dict[str, float]:
    """The values ``OptimParamsHandler`` logs, by tag (without the ``tag/`` prefix).

    Reading them waits for the device (loss scale, counts, gradient norm).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1)
        >>> wrapper = OptimWrapper(torch.optim.Adam(model.parameters(), lr=0.1))
        >>> scalars = optim_scalars(wrapper)
        >>> [scalars[f"{name}/group_0"] for name in ("lr", "momentum", "weight_decay")]
        [0.1, 0.9, 0.0]
        >>> list(scalars)[3:]
        ['updates_applied', 'updates_skipped']
    """
    scalars: dict[str, float] = {}
    for name, wrapper in members(optim_wrapper):
        scalars.update(member_scalars(wrapper, member_tag(name)))
    return scalars


class OptimParamsHandler(BaseHandler):
    """Log every learning rate, momentum and weight decay of a wrapper (or wrapper dict), and its update health.

    It works with any of Ignite's loggers: TensorBoard (one event per log),
    and MLflow, ClearML, Neptune, Polyaxon, Weights & Biases, Visdom (and
    subclasses of them) through their own ``OutputHandler``, one per logger,
    as Ignite's ``OptimizerParamsHandler`` does.

    Args:
        optim_wrapper: An ``OptimWrapper`` or ``OptimWrapperDict``.
        tag: Optional common prefix of the tags, e.g. ``'train'``.
        x_axis: ``'iteration'`` (the trainer's, as Ignite's handlers and the
            loss use) or ``'updates'`` (each member's applied updates). Keep
            ``'iteration'`` for a logger with one step for the whole run
            (Weights & Biases): it drops values logged at a lower step than
            the last, as another member's or the loss's can be.
        global_step_transform: ``f(engine, event_name) -> int``, replacing ``x_axis``.

    Examples:
        >>> import tempfile, torch
        >>> import torch.nn.functional as F
        >>> from ignite.handlers.tensorboard_logger import TensorboardLogger
        >>> from engine_opt import OptimEvents, OptimWrapper, create_trainer
        >>> model = torch.nn.Linear(2, 1)
        >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> trainer = create_trainer(model, wrapper, F.mse_loss)
        >>> with tempfile.TemporaryDirectory() as log_dir:
        ...     tb_logger = TensorboardLogger(log_dir=log_dir)
        ...     _ = tb_logger.attach(
        ...         trainer,
        ...         log_handler=OptimParamsHandler(wrapper),
        ...         event_name=OptimEvents.OPTIM_STEP_COMPLETED(every=2),
        ...     )
        ...     _ = trainer.run([(torch.ones(2, 2), torch.zeros(2, 1))] * 4)
        ...     tb_logger.close()
    """

    def __init__(
        self,
        optim_wrapper: OptimWrapper | OptimWrapperDict,
        tag: str | None = None,
        global_step_transform: Callable[[Engine, Any], int] | None = None,
        x_axis: Literal["iteration", "updates"] = "iteration",
    ) -> None:
        if not isinstance(optim_wrapper, (OptimWrapper, OptimWrapperDict)):
            raise TypeError(
                f"optim_wrapper must be an OptimWrapper or an OptimWrapperDict, got {checks.describe(optim_wrapper)}"
            )
        if tag is not None and not isinstance(tag, str):
            raise TypeError(f"tag must be a str or None, got {checks.describe(tag)}")
        if global_step_transform is not None and not callable(global_step_transform):
            raise TypeError(f"global_step_transform must be callable, got {checks.describe(global_step_transform)}")
        if x_axis not in _X_AXES:
            raise ValueError(f"x_axis must be one of {list(_X_AXES)}, got {x_axis!r}")
        self.optim_wrapper = optim_wrapper
        self.tag = tag
        self.global_step_transform = global_step_transform
        self.x_axis = x_axis
        self._writer = ScalarWriter(default_tag="optim")

    def __call__(self, engine: Engine, logger: Any, event_name: str | Events) -> None:
        if not isinstance(logger, BaseLogger):
            raise TypeError(f"OptimParamsHandler works with an Ignite logger, got {checks.describe(logger)}")
        for step, scalars in self._logs(engine, event_name):
            self._writer.write(engine, logger, event_name, self.tag, step, scalars)

    def _logs(self, engine: Engine, event_name: Any) -> list[tuple[int, dict[str, float]]]:
        """``(step, scalars)`` to log: one entry, or one per member on the ``'updates'`` axis."""
        logged = _logged_members(self.optim_wrapper, engine, event_name)
        if not logged:
            return []
        if self.global_step_transform is not None or self.x_axis == "iteration":
            scalars: dict[str, float] = {}
            for name, wrapper in logged:
                scalars.update(member_scalars(wrapper, member_tag(name)))
            step = engine.state.iteration
            if self.global_step_transform is not None:
                step = self.global_step_transform(engine, event_name)
            return [(step, scalars)]
        return [(wrapper.applied_steps, member_scalars(wrapper, member_tag(name))) for name, wrapper in logged]


class ScalarWriter:
    """Scalars at a step through any Ignite logger: TensorBoard's writer directly (one event per log), any other
    logger through its own ``OutputHandler``, made once per logger (Visdom's keeps its plot windows).

    Args:
        default_tag: The tag the other loggers' ``OutputHandler`` gets where ``write`` is given none (on
            TensorBoard, no tag means no prefix).
    """

    def __init__(self, default_tag: str) -> None:
        self.default_tag = default_tag
        self._handlers: weakref.WeakKeyDictionary[BaseLogger, BaseOutputHandler] = weakref.WeakKeyDictionary()
        self._pending: tuple[int, dict[str, float]] = (0, {})  # what the OutputHandler logs next

    def write(
        self, engine: Engine, logger: BaseLogger, event_name: Any, tag: str | None, step: int, scalars: dict[str, float]
    ) -> None:
        """Log ``scalars`` at ``step`` under ``tag``."""
        if isinstance(logger, TensorboardLogger):
            prefix = f"{tag}/" if tag else ""
            write_scalars(logger.writer, {f"{prefix}{key}": value for key, value in scalars.items()}, step)
            return
        self._pending = (step, scalars)
        handler = self._handlers.get(logger)
        if handler is None:
            handler = output_handler_type(logger)(
                tag=tag or self.default_tag,
                output_transform=lambda _: self._pending[1],
                global_step_transform=lambda *_: self._pending[0],
            )
            self._handlers[logger] = handler
        handler(engine, logger, event_name)


def _logged_members(
    optim_wrapper: OptimWrapper | OptimWrapperDict, engine: Engine, event_name: Any
) -> list[tuple[str | None, OptimWrapper]]:
    """Every member; at an ``OptimEvents`` event of a ``create_trainer`` trainer, the member it is about only."""
    every = members(optim_wrapper)
    optim = getattr(engine.state, "optim", None)
    if getattr(event_name, "name", None) not in OptimEvents.__members__ or not isinstance(optim, OptimState):
        return every
    return [(name, wrapper) for name, wrapper in every if wrapper is optim.wrapper]


def output_handler_type(logger: BaseLogger) -> type[BaseOutputHandler]:
    """The ``OutputHandler`` of the module that defines ``type(logger)``, or of its nearest base class's.

    Examples:
        >>> from ignite.handlers.mlflow_logger import MLflowLogger
        >>> class MyLogger(MLflowLogger): pass
        >>> output_handler_type(MyLogger.__new__(MyLogger)).__module__
        'ignite.handlers.mlflow_logger'
    """
    for cls in type(logger).__mro__:
        if cls is BaseLogger:
            break
        found = getattr(sys.modules.get(cls.__module__), "OutputHandler", None)
        if isinstance(found, type) and issubclass(found, BaseOutputHandler):
            return found
    raise TypeError(
        f"{type(logger).__name__} comes with no Ignite OutputHandler to log through; log optim_scalars(wrapper) "
        "with it yourself"
    )
