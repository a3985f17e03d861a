"""Tutorial section 1: single precision with PyTorch's SGD, the plain loop."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim import SGD

torch.manual_seed(0)
inputs = [torch.zeros(10, 1, 1)] * 10
targets = [torch.ones(10, 1, 1)] * 10
model = nn.Linear(1, 1)
optimizer = SGD(model.parameters(), lr=0.01)
optimizer.zero_grad()

for input, target in zip(inputs, targets):
    output = model(input)
    loss = F.l1_loss(output, target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

print(f"weight={model.weight.item():.6f} bias={model.bias.item():.6f}")
