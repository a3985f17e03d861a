"""The Ignite layer: the trainer, its optimizer events and typed state, checkpoint files and data position.

Imports the core (``engine_opt.optim``) and Ignite; the handlers that attach
to a trainer are in ``engine_opt.handlers``.
"""

from .checkpoint_files import load_checkpoint
from .events import OptimEvents, member_filter
from .resumable_loader import ResumableLoader
from .state import OptimState, optim_state
from .trainer import Trainer, create_trainer

__all__ = [
    "OptimEvents",
    "OptimState",
    "ResumableLoader",
    "Trainer",
    "create_trainer",
    "load_checkpoint",
    "member_filter",
    "optim_state",
]
