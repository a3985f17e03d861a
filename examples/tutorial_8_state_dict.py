"""Tutorial section 8: exporting and loading state dicts.

The AMP wrapper adds ``'loss_scaler'``: the grad scaler's state for float16
(the default on CUDA), ``{}`` for bfloat16 (the default on CPU), which needs
no loss scaling.
"""

import torch.nn as nn
from torch.optim import SGD

from engine_opt import AmpOptimWrapper, OptimWrapper

model = nn.Linear(1, 1)
# optimizer
optimizer = SGD(model.parameters(), lr=0.01)

# ---- export ---- #
print("print state_dict")
# single-precision wrapper
optim_wrapper = OptimWrapper(optimizer=optimizer)
# mixed-precision wrapper
amp_optim_wrapper = AmpOptimWrapper(optimizer=optimizer)
# export the state dicts
optim_state_dict = optim_wrapper.state_dict()
amp_optim_state_dict = amp_optim_wrapper.state_dict()
print(optim_state_dict)
print(amp_optim_state_dict)

# ---- load ---- #
print("load state_dict")
# single-precision wrapper
optim_wrapper_new = OptimWrapper(optimizer=optimizer)
# mixed-precision wrapper
amp_optim_wrapper_new = AmpOptimWrapper(optimizer=optimizer)
# load the state dicts
amp_optim_wrapper_new.load_state_dict(amp_optim_state_dict)
optim_wrapper_new.load_state_dict(optim_state_dict)
