"""Tutorial section 3: mixed precision with plain PyTorch.

``torch.autocast`` replaces the deprecated ``torch.cuda.amp.autocast`` so the
loop runs on CPU (bfloat16) as well as on CUDA (float16).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import autocast
from torch.optim import SGD

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.Linear(1, 1)
optimizer = SGD(model.parameters(), lr=0.01)

model = model.to(device)
inputs = [torch.zeros(10, 1, 1, 1)] * 10
targets = [torch.ones(10, 1, 1, 1)] * 10

for input, target in zip(inputs, targets):
    with autocast(device):
        output = model(input.to(device))
        loss = F.l1_loss(output, target.to(device))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

print(f"weight={model.weight.item():.6f} bias={model.bias.item():.6f}")
