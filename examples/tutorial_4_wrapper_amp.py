"""Tutorial section 4: mixed precision with AmpOptimWrapper.

On CUDA it uses float16 with a dynamic loss scale; on CPU bfloat16 (no scaler needed).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim import SGD

from engine_opt import AmpOptimWrapper

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.Linear(1, 1)
optimizer = SGD(model.parameters(), lr=0.01)

model = model.to(device)
inputs = [torch.zeros(10, 1, 1, 1)] * 10
targets = [torch.ones(10, 1, 1, 1)] * 10

optim_wrapper = AmpOptimWrapper(optimizer=optimizer)

for input, target in zip(inputs, targets):
    with optim_wrapper.optim_context(model):
        output = model(input.to(device))
        loss = F.l1_loss(output, target.to(device))
    optim_wrapper.update_params(loss)

print(f"weight={model.weight.item():.6f} bias={model.bias.item():.6f}")
