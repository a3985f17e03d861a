"""The core: the wrappers, building them from config, and what they need. Imports torch only.

Usable in any training loop (hand-written, Ignite, Lightning, accelerate);
nothing here imports a training framework or a logger.
"""

from .amp import AmpOptimWrapper
from .build import build_optim_wrapper
from .hooks import StepEvent
from .routed import RoutedOptimizer
from .schedulers import build_param_scheduler
from .sharded_muon import ShardedMuon
from .wrapper import OptimWrapper
from .wrapper_dict import OptimWrapperDict

__all__ = [
    "AmpOptimWrapper",
    "OptimWrapper",
    "OptimWrapperDict",
    "RoutedOptimizer",
    "ShardedMuon",
    "StepEvent",
    "build_optim_wrapper",
    "build_param_scheduler",
]
