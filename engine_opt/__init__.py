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

Examples:
    >>> import torch
    >>> from torch import nn
    >>> import engine_opt
    >>> model = nn.Linear(1, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> wrapper = engine_opt.OptimWrapper(optimizer)
    >>> wrapper.get_momentum()
    {'momentum': [0]}
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import OptimEvents, create_trainer, member_filter
    from .optim import (
        AmpOptimWrapper,
        OptimWrapper,
        OptimWrapperDict,
        StepEvent,
        build_optim_wrapper,
        build_param_scheduler,
    )

# Where each name lives: imported on first use, so that the core alone never loads Ignite, and `engine-opt`
# can answer a Ctrl-C while torch loads (engine_opt.app.start)
_HOMES = {
    **dict.fromkeys(
        ("AmpOptimWrapper", "OptimWrapper", "OptimWrapperDict", "StepEvent", "build_optim_wrapper"), ".optim"
    ),
    "build_param_scheduler": ".optim",
    **dict.fromkeys(("OptimEvents", "create_trainer", "member_filter"), ".engine"),
}

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


_SUBPACKAGES = ("optim", "engine", "checkpoint", "handlers", "app")


def __getattr__(name: str) -> Any:
    """The package's names, each imported from its home on first use (its subpackages too)."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
