"""The Ignite layer: the trainer, its optimizer events and typed state, and the data position.

Imports the core (``engine_opt.optim``) and Ignite; checkpoints are in
``engine_opt.checkpoint``, the handlers that attach to a trainer in
``engine_opt.handlers``.
"""

from typing import Any

from ..moved import find_moved
from .events import OptimEvents, member_filter
from .resumable_loader import ResumableLoader, rng_state, sampled_total, set_rng_state
from .state import OptimState, optim_state
from .trainer import Trainer, create_trainer

__all__ = [
    "OptimEvents",
    "OptimState",
    "ResumableLoader",
    "Trainer",
    "create_trainer",
    "member_filter",
    "optim_state",
    "rng_state",
    "sampled_total",
    "set_rng_state",
]

# exported here before checkpoints had a package of their own
_MOVED = {"load_checkpoint": "engine_opt.checkpoint"}


def __getattr__(name: str) -> Any:
    """A name that moved to another package (``engine_opt.moved``)."""
    return find_moved(__name__, name, _MOVED)
