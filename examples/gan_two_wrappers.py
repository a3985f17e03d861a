"""A GAN with two optimizers: an OptimWrapperDict, one member per network, inside an Ignite trainer.

python examples/gan_two_wrappers.py

The discriminator accumulates 2 micro-batches per update, the generator
updates every iteration; both run under autocast (float16 with a loss scaler
on CUDA, bfloat16 on CPU). Each update fires the trainer's optimizer events
with the member's name, so handlers can tell them apart.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine_opt import OptimEvents, build_optim_wrapper, create_trainer, member_filter

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
angles = torch.randint(0, 8, (2048,)) * (2 * math.pi / 8)
ring = torch.stack([angles.cos(), angles.sin()], dim=1) * 2 + 0.05 * torch.randn(2048, 2)
loader = torch.utils.data.DataLoader(ring, batch_size=64, shuffle=True)

gan = nn.ModuleDict(
    {
        "gen": nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2)),
        "disc": nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1)),
    }
).to(device)
adam = dict(type="Adam", lr=1e-3, betas=(0.5, 0.999))
optim_wrapper = build_optim_wrapper(
    gan,
    dict(
        gen=dict(type="AmpOptimWrapper", optimizer=adam),
        disc=dict(type="AmpOptimWrapper", optimizer=adam, accumulative_counts=2),
    ),
)
gen, disc = gan["gen"], gan["disc"]


def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), target))


def train_step(engine, real):
    real = real.to(device)
    noise = torch.randn(real.shape[0], 8, device=device)
    # member=...: that member's optim_context, and the other member's parameters take no gradient
    with optim_wrapper.optim_context(disc, member="disc"):
        disc_loss = bce(disc(real), 1.0) + bce(disc(gen(noise).detach()), 0.0)
    optim_wrapper["disc"].update_params(disc_loss)
    with optim_wrapper.optim_context(gen, member="gen"):  # the generator's loss stays out of disc's window
        gen_loss = bce(disc(gen(noise)), 1.0)
    optim_wrapper["gen"].update_params(gen_loss)
    return {"gen_loss": gen_loss.detach(), "disc_loss": disc_loss.detach()}


trainer = create_trainer(gan, optim_wrapper, train_step=train_step)
gen_updates = []
trainer.add_event_handler(
    OptimEvents.OPTIM_STEP_COMPLETED(event_filter=member_filter("gen")),
    lambda engine: gen_updates.append(engine.state.iteration),
)
state = trainer.run(loader, max_epochs=2)
print(f"generator updates {len(gen_updates)}, all updates {state.optim_updates}, skipped {state.optim_skipped}")
print({name: round(value.item(), 3) for name, value in state.output.items()})
print(optim_wrapper.get_lr())
