"""engine_opt: one object to drive every PyTorch optimizer update.

Single precision, mixed precision (fp16 with loss scaling, bf16), gradient
accumulation and clipping, one optimizer or several, with the same training
code whatever the strategy.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import engine_opt
    >>> model = nn.Linear(1, 1)
    >>> wrapper = engine_opt.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    >>> wrapper.get_momentum()
    {'momentum': [0]}
"""

from .amp import AmpOptimWrapper
from .build import build_optim_wrapper
from .events import OptimEvents, member_filter
from .trainer import create_trainer
from .wrapper import OptimWrapper
from .wrapper_dict import OptimWrapperDict

__all__ = [
    "AmpOptimWrapper",
    "OptimEvents",
    "OptimWrapper",
    "OptimWrapperDict",
    "build_optim_wrapper",
    "create_trainer",
    "member_filter",
]
__version__ = "0.1.0"
