"""The training side of the comparisons: the loop every wrapper test runs, a checkpoint round trip, and the
plain optimizers and recorders that several test files share."""

from __future__ import annotations

import io
from typing import Any

import torch

from engine_opt import AmpOptimWrapper, OptimWrapper, OptimWrapperDict

from oracle import gan_losses, loss_fn


def run_wrapper(model: torch.nn.Module, wrapper: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The tutorial's wrapper loop: forward inside optim_context, then update_params."""
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)


def roundtrip(obj: Any) -> Any:
    """Save with torch.save and load back with weights_only=True, as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def momentum_sgd(model: torch.nn.Module) -> torch.optim.SGD:
    """A plain SGD with momentum (lr 0.1, momentum 0.9) over the model's parameters."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def record_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The lr each optimizer step used, read by a step pre-hook of the plain optimizer."""
    lrs: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    return lrs


def make_amp_gan_wrappers(gan: torch.nn.ModuleDict, **gen_kwargs: Any) -> OptimWrapperDict:
    """The wrappers that plain_gan_loop's optimizers and scaler correspond to."""
    return OptimWrapperDict(
        gen=AmpOptimWrapper(optimizer=torch.optim.Adam(gan["gen"].parameters(), lr=0.01), dtype="fp16", **gen_kwargs),
        disc=OptimWrapper(torch.optim.SGD(gan["disc"].parameters(), lr=0.05, momentum=0.9), accumulative_counts=2),
    )


def gan_step(gan: torch.nn.ModuleDict, wrappers: OptimWrapperDict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One GAN iteration through the wrappers: discriminator, then generator."""
    with wrappers["disc"].optim_context(gan["disc"]):
        _, disc_loss = gan_losses(gan, x)
    wrappers["disc"].update_params(disc_loss)
    with wrappers["gen"].optim_context(gan["gen"]):
        gen_loss = -gan["disc"](gan["gen"](x)).mean()
    wrappers["gen"].update_params(gen_loss)
    return {"disc_loss": disc_loss.detach(), "gen_loss": gen_loss.detach()}


def train_some(gan: torch.nn.ModuleDict, wrappers: OptimWrapperDict, batches: list[torch.Tensor]) -> None:
    for x in batches:
        gan_step(gan, wrappers, x)
