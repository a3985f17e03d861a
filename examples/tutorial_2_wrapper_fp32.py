"""Tutorial section 2: single precision with OptimWrapper (same result as section 1)."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim import SGD

from engine_opt import OptimWrapper

torch.manual_seed(0)
inputs = [torch.zeros(10, 1, 1)] * 10
targets = [torch.ones(10, 1, 1)] * 10
model = nn.Linear(1, 1)
optimizer = SGD(model.parameters(), lr=0.01)

optim_wrapper = OptimWrapper(optimizer=optimizer)

for input, target in zip(inputs, targets):
    output = model(input)
    loss = F.l1_loss(output, target)
    optim_wrapper.update_params(loss)

print(f"weight={model.weight.item():.6f} bias={model.bias.item():.6f}")
