"""Tutorial section 6: mixed precision and gradient accumulation with AmpOptimWrapper.

``accumulative_counts=2``: every loss is divided by 2 and the optimizer steps
after every second micro-batch. Under DDP, ``optim_context`` also skips the
gradient all-reduce on the first micro-batch of each window.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim import SGD

from engine_opt import AmpOptimWrapper

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.Linear(1, 1).to(device)
optimizer = SGD(model.parameters(), lr=0.01)
inputs = [torch.zeros(10, 1, 1, 1)] * 10
targets = [torch.ones(10, 1, 1, 1)] * 10

optim_wrapper = AmpOptimWrapper(optimizer=optimizer, accumulative_counts=2)

for input, target in zip(inputs, targets):
    with optim_wrapper.optim_context(model):
        output = model(input.to(device))
        loss = F.l1_loss(output, target.to(device))
    optim_wrapper.update_params(loss)

print(f"weight={model.weight.item():.6f} bias={model.bias.item():.6f}")
