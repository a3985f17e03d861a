"""``OptimParamsHandler``: log learning rates, momenta, weight decay and update health, to any Ignite logger.

Tags (``{m}`` is ``''`` for one wrapper and ``'{name}.'`` for each member of
an ``OptimWrapperDict``; ``{g}`` is a param group's ``name`` when it has one,
as ``build_optim_wrapper`` gives them, else ``group_{i}``; with ``tag``,
every tag starts with ``'{tag}/'``):

================================ ==================================================
``{m}lr/{g}``                     learning rate of the group
``{m}base_lr``                    the optimizer's default lr (several groups only)
``{m}momentum/{g}``               ``momentum``, or ``betas[0]``, of the group
``{m}weight_decay/{g}``           ``weight_decay`` of the group (where it has one)
``{m}loss_scale``                 the float16 grad scaler's scale
``{m}updates_applied``            updates applied so far
``{m}updates_skipped``            updates skipped so far (non-finite gradients)
``{m}grad_norm``                  pre-clip gradient norm of the last applied update
================================ ==================================================

``loss_scale`` and ``grad_norm`` appear where the wrapper has them (a scaler;
clipping by norm). Every value is plotted against the trainer's iteration,
the x-axis of Ignite's own handlers and of the loss, whatever event the
handler is attached to; ``x_axis='updates'`` plots each member's values
against its own applied updates instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

from ignite.engine import Engine, Events
from ignite.handlers.base_logger import BaseHandler, BaseLogger
from ignite.handlers.tensorboard_logger import TensorboardLogger

from ..optim import checks
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict, member_prefix, members
from .tensorboard_writer import write_scalars

_X_AXES = ("iteration", "updates")


def group_labels(wrapper: OptimWrapper) -> list[str]:
    """Each param group's label in tags: its ``name`` when it has a unique one, else ``group_{i}``.

    Example:
        >>> import torch
        >>> a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        >>> group_labels(OptimWrapper(torch.optim.SGD([{"params": [a], "name": "head"}, {"params": [b]}], lr=0.1)))
        ['head', 'group_1']
    """
    names = [group.get("name") for group in wrapper.param_groups]
    return [
        name if isinstance(name, str) and name and names.count(name) == 1 else f"group_{index}"
        for index, name in enumerate(names)
    ]


def member_scalars(wrapper: OptimWrapper, prefix: str = "") -> dict[str, float]:
    """The values ``OptimParamsHandler`` logs for one wrapper, by tag. Reading them waits for the device."""
    labels = group_labels(wrapper)
    groups = wrapper.param_groups
    scalars: dict[str, Any] = {}
    if len(groups) > 1:
        scalars[f"{prefix}base_lr"] = wrapper.defaults["lr"]
    scalars.update({f"{prefix}lr/{label}": group["lr"] for label, group in zip(labels, groups, strict=True)})
    momenta = wrapper.get_momentum()["momentum"]
    scalars.update({f"{prefix}momentum/{label}": value for label, value in zip(labels, momenta, strict=True)})
    scalars.update(
        {
            f"{prefix}weight_decay/{label}": g["weight_decay"]
            for label, g in zip(labels, groups, strict=True)
            if "weight_decay" in g
        }
    )
    if wrapper.loss_scaler is not None:
        scalars[f"{prefix}loss_scale"] = wrapper.loss_scaler.get_scale()
    scalars[f"{prefix}updates_applied"] = wrapper.applied_steps
    scalars[f"{prefix}updates_skipped"] = wrapper.skipped_steps
    if wrapper.grad_norm is not None:
        scalars[f"{prefix}grad_norm"] = wrapper.grad_norm.item()
    return {key: float(value) for key, value in scalars.items()}


def optim_scalars(optim_wrapper: OptimWrapper | OptimWrapperDict) -> dict[str, float]:
    """The values ``OptimParamsHandler`` logs, by tag (without the ``tag/`` prefix).

    Reading them waits for the device (loss scale, counts, gradient norm).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1)
        >>> scalars = optim_scalars(OptimWrapper(torch.optim.Adam(model.parameters(), lr=0.1)))
        >>> scalars["lr/group_0"], scalars["momentum/group_0"], scalars["weight_decay/group_0"], list(scalars)[3:]
        (0.1, 0.9, 0.0, ['updates_applied', 'updates_skipped'])
    """
    scalars: dict[str, float] = {}
    for name, wrapper in members(optim_wrapper):
        scalars.update(member_scalars(wrapper, member_prefix(name)))
    return scalars


class OptimParamsHandler(BaseHandler):
    """Log every learning rate, momentum and weight decay of a wrapper (or wrapper dict), and its update health.

    It works with any of Ignite's loggers: TensorBoard (one event per log),
    and MLflow, ClearML, Neptune, Polyaxon, Weights & Biases, Visdom through
    their own ``OutputHandler``, as Ignite's ``OptimizerParamsHandler`` does.

    Args:
        optim_wrapper: An ``OptimWrapper`` or ``OptimWrapperDict``.
        tag: Optional common prefix of the tags, e.g. ``'train'``.
        x_axis: ``'iteration'`` (the trainer's, as Ignite's handlers and the
            loss use) or ``'updates'`` (each member's applied updates).
        global_step_transform: ``f(engine, event_name) -> int``, replacing ``x_axis``.

    Example:
        >>> import tempfile, torch
        >>> import torch.nn.functional as F
        >>> from ignite.handlers.tensorboard_logger import TensorboardLogger
        >>> from engine_opt import OptimEvents, OptimWrapper, create_trainer
        >>> model = torch.nn.Linear(2, 1)
        >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> trainer = create_trainer(model, wrapper, F.mse_loss)
        >>> with tempfile.TemporaryDirectory() as log_dir:
        ...     tb_logger = TensorboardLogger(log_dir=log_dir)
        ...     _ = tb_logger.attach(trainer, log_handler=OptimParamsHandler(wrapper),
        ...                          event_name=OptimEvents.OPTIM_STEP_COMPLETED(every=2))
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

    def __call__(self, engine: Engine, logger: Any, event_name: str | Events) -> None:
        if not isinstance(logger, BaseLogger):
            raise TypeError(f"OptimParamsHandler works with an Ignite logger, got {checks.describe(logger)}")
        for step, scalars in self._logs(engine, event_name):
            _log(engine, logger, event_name, self.tag, scalars, step)

    def _logs(self, engine: Engine, event_name: Any) -> list[tuple[int, dict[str, float]]]:
        """``(step, scalars)`` to log: one entry, or one per member on the ``'updates'`` axis."""
        if self.global_step_transform is not None:
            return [(self.global_step_transform(engine, event_name), optim_scalars(self.optim_wrapper))]
        if self.x_axis == "iteration":
            return [(engine.state.iteration, optim_scalars(self.optim_wrapper))]
        return [
            (wrapper.applied_steps, member_scalars(wrapper, member_prefix(name)))
            for name, wrapper in members(self.optim_wrapper)
        ]


def _log(
    engine: Engine, logger: BaseLogger, event_name: Any, tag: str | None, scalars: dict[str, float], step: int
) -> None:
    """``scalars`` at ``step`` through ``logger``: TensorBoard directly, others through their ``OutputHandler``.

    TensorBoard gets one event per log (``write_scalars``); another logger's
    own ``OutputHandler`` names the values its way under ``tag`` (``'optim'``
    by default), as Ignite's handlers for it do.
    """
    if isinstance(logger, TensorboardLogger):
        prefix = f"{tag}/" if tag else ""
        write_scalars(logger.writer, {f"{prefix}{key}": value for key, value in scalars.items()}, step)
        return
    output_handler = getattr(importlib.import_module(type(logger).__module__), "OutputHandler", None)
    if output_handler is None:
        raise TypeError(
            f"{type(logger).__name__} comes with no Ignite OutputHandler to log through; log optim_scalars(wrapper) "
            "with it yourself"
        )
    handler = output_handler(
        tag=tag or "optim", output_transform=lambda _: scalars, global_step_transform=lambda *_: step
    )
    handler(engine, logger, event_name)
