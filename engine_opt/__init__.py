"""engine_opt: one object to drive every PyTorch optimizer update.

Single precision, mixed precision (fp16 with loss scaling, bf16), gradient
accumulation and clipping, one optimizer or several, with the same training
code whatever the strategy.

Five layers, each importing only those below (``docs/architecture.md``):
``engine_opt.optim`` (the wrappers and their schedules; torch only),
``engine_opt.engine`` (the Ignite trainer, its events, the data position),
``engine_opt.checkpoint`` (checkpoints and resuming), ``engine_opt.handlers``
(logging, schedules, guards) and ``engine_opt.app`` (the ``engine-opt``
command). The wrappers import no training framework: ``create_trainer``,
``OptimEvents`` and ``member_filter`` load Ignite when first used.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import engine_opt
    >>> model = nn.Linear(1, 1)
    >>> wrapper = engine_opt.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    >>> wrapper.get_momentum()
    {'momentum': [0]}
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .optim import (
    AmpOptimWrapper,
    OptimWrapper,
    OptimWrapperDict,
    StepEvent,
    build_optim_wrapper,
    build_param_scheduler,
)

if TYPE_CHECKING:
    from .engine import OptimEvents, create_trainer, member_filter

_IGNITE_LAYER = {"OptimEvents", "create_trainer", "member_filter"}

__all__ = [
    "AmpOptimWrapper",
    "OptimEvents",
    "OptimWrapper",
    "OptimWrapperDict",
    "StepEvent",
    "build_optim_wrapper",
    "build_param_scheduler",
    "create_trainer",
    "member_filter",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The Ignite layer's names, imported on first use so that the core alone never loads Ignite."""
    if name in _IGNITE_LAYER:
        return getattr(importlib.import_module(".engine", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
