"""``OptimParamsHandler``: log learning rates, momenta and update health to TensorBoard.

Tags (``{prefix}`` is ``''`` for one wrapper and ``'{name}.'`` for each member
of an ``OptimWrapperDict``; with ``tag``, every tag starts with ``'{tag}/'``):

============================== ==================================================
``{prefix}lr/group_{i}``        learning rate of param group ``i``
``{prefix}base_lr``             the optimizer's default lr (several groups only)
``{prefix}momentum/group_{i}``  ``momentum``, or ``betas[0]``, of group ``i``
``{prefix}loss_scale``          the float16 grad scaler's scale
``{prefix}updates_applied``     updates applied so far
``{prefix}updates_skipped``     updates skipped so far (non-finite gradients)
``{prefix}grad_norm``           pre-clip gradient norm of the last applied update
============================== ==================================================

The last three appear where the wrapper has them (a scaler; clipping by norm).
The global step is the counter of the event the handler is attached to
(``engine.state.optim_updates`` for ``OPTIM_STEP_COMPLETED``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers.base_logger import BaseHandler
from ignite.handlers.tensorboard_logger import TensorboardLogger

from ..optim import checks
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict, member_prefix, members
from .tensorboard_writer import write_scalars


def _group_tags(values: dict[str, list[Any]]) -> dict[str, Any]:
    tags = {}
    for key, per_group in values.items():
        if key.endswith("base_lr"):
            tags[key] = per_group[0]
        else:
            tags.update({f"{key}/group_{index}": value for index, value in enumerate(per_group)})
    return tags


def optim_scalars(optim_wrapper: OptimWrapper | OptimWrapperDict) -> dict[str, float]:
    """The values ``OptimParamsHandler`` logs, by tag (without the ``tag/`` prefix).

    Reading them waits for the device (loss scale, counts, gradient norm).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1)
        >>> optim_scalars(OptimWrapper(torch.optim.Adam(model.parameters(), lr=0.1)))
        {'lr/group_0': 0.1, 'momentum/group_0': 0.9, 'updates_applied': 0.0, 'updates_skipped': 0.0}
    """
    scalars = {**_group_tags(optim_wrapper.get_lr()), **_group_tags(optim_wrapper.get_momentum())}
    for name, wrapper in members(optim_wrapper):
        prefix = member_prefix(name)
        if wrapper.loss_scaler is not None:
            scalars[f"{prefix}loss_scale"] = wrapper.loss_scaler.get_scale()
        scalars[f"{prefix}updates_applied"] = wrapper.applied_steps
        scalars[f"{prefix}updates_skipped"] = wrapper.skipped_steps
        if wrapper.grad_norm is not None:
            scalars[f"{prefix}grad_norm"] = wrapper.grad_norm.item()
    return {key: float(value) for key, value in scalars.items()}


class OptimParamsHandler(BaseHandler):
    """Log every learning rate and momentum of a wrapper (or wrapper dict) to TensorBoard.

    Args:
        optim_wrapper: An ``OptimWrapper`` or ``OptimWrapperDict``.
        tag: Optional common prefix of the tags, e.g. ``'train'``.
        global_step_transform: ``f(engine, event_name) -> int``; by default the
            counter of the event the handler runs at.

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
    ) -> None:
        if not isinstance(optim_wrapper, (OptimWrapper, OptimWrapperDict)):
            raise TypeError(
                f"optim_wrapper must be an OptimWrapper or an OptimWrapperDict, got {checks.describe(optim_wrapper)}"
            )
        if tag is not None and not isinstance(tag, str):
            raise TypeError(f"tag must be a str or None, got {checks.describe(tag)}")
        if global_step_transform is not None and not callable(global_step_transform):
            raise TypeError(f"global_step_transform must be callable, got {checks.describe(global_step_transform)}")
        self.optim_wrapper = optim_wrapper
        self.prefix = f"{tag}/" if tag else ""
        self.global_step_transform = global_step_transform

    def __call__(self, engine: Engine, logger: Any, event_name: str | Events) -> None:
        if not isinstance(logger, TensorboardLogger):
            raise TypeError(f"OptimParamsHandler works with a TensorboardLogger, got {checks.describe(logger)}")
        if self.global_step_transform is not None:
            step = self.global_step_transform(engine, event_name)
        else:
            step = engine.state.get_event_attrib_value(event_name)
        scalars = {f"{self.prefix}{tag}": value for tag, value in optim_scalars(self.optim_wrapper).items()}
        write_scalars(logger.writer, scalars, step)
