"""Tutorial section 5: mixed precision and gradient accumulation with plain PyTorch.

As in the tutorial, this loop steps at idx 0, 2, 4, ... and does not divide
the loss: windows are [0], [1, 2], [3, 4], ... with summed losses. Section 6
steps after every two micro-batches with the mean loss; docs/from-pytorch.md
writes out the plain loop that section 6 matches exactly.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import autocast
from torch.optim import SGD

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.Linear(1, 1).to(device)
optimizer = SGD(model.parameters(), lr=0.01)
inputs = [torch.zeros(10, 1, 1, 1)] * 10
targets = [torch.ones(10, 1, 1, 1)] * 10

for idx, (input, target) in enumerate(zip(inputs, targets)):
    with autocast(device):
        output = model(input.to(device))
        loss = F.l1_loss(output, target.to(device))
    loss.backward()
    if idx % 2 == 0:
        optimizer.step()
        optimizer.zero_grad()

print(f"weight={model.weight.item():.6f} bias={model.bias.item():.6f}")
print(
    "(section 6 prints other numbers: this loop, as the tutorial writes it, steps at idx 0, 2, 4, ... on "
    "summed losses; section 6 steps after every two micro-batches on their mean, the loop of docs/from-pytorch.md)"
)
