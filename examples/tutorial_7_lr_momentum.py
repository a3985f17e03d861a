"""Tutorial section 7: reading the learning rate and momentum."""

import torch.nn as nn
from torch.optim import SGD

from engine_opt import OptimWrapper

model = nn.Linear(1, 1)
# optimizer
optimizer = SGD(model.parameters(), lr=0.01)
# wrapper
optim_wrapper = OptimWrapper(optimizer)

print("get info from optimizer ------")
print(optimizer.param_groups[0]["lr"])  # 0.01
print(optimizer.param_groups[0]["momentum"])  # 0
print("get info from wrapper ------")
print(optim_wrapper.get_lr())  # {'lr': [0.01]}
print(optim_wrapper.get_momentum())  # {'momentum': [0]}
