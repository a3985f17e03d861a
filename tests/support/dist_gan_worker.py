"""The ranks of the distributed GAN test (2 processes, gloo): ``OptimWrapperDict.optim_context(member=...)``.

Each scenario trains ``oracle.make_gan`` on this rank's half of every global
batch, the discriminator accumulating 2 micro-steps a window, the generator
stepping in between; ``scenarios`` saves what each rank saw to
``OUT/rank{r}.pt`` for tests/optim/test_wrapper_dict.py to compare with the
single-process oracle there.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from engine_opt import OptimWrapper, OptimWrapperDict
from engine_opt.testing import GradientTraffic

from oracle import make_batches, make_gan

ITERATIONS = 4
DISC_ACCUMULATE = 2
GLOBAL_BATCH = 6


def global_batches() -> list[torch.Tensor]:
    return [x for x, _ in make_batches(ITERATIONS, batch_size=GLOBAL_BATCH)]


def my_share() -> list[torch.Tensor]:
    half = GLOBAL_BATCH // idist.get_world_size()
    start = idist.get_rank() * half
    return [x[start : start + half] for x in global_batches()]


def make_wrappers(gan: nn.ModuleDict) -> OptimWrapperDict:
    return OptimWrapperDict(
        gen=OptimWrapper(torch.optim.Adam(gan["gen"].parameters(), lr=0.01, betas=(0.5, 0.9))),
        disc=OptimWrapper(
            torch.optim.SGD(gan["disc"].parameters(), lr=0.05, momentum=0.9), accumulative_counts=DISC_ACCUMULATE
        ),
    )


def params_of(module: nn.Module) -> list[torch.Tensor]:
    return [
        (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()
        for param in module.parameters()
    ]


class WholeGan(nn.Module):
    """Both networks behind one forward, so one DDP can wrap them: ``which`` picks the pass."""

    def __init__(self, gan: nn.ModuleDict) -> None:
        super().__init__()
        self.gan = gan

    def forward(self, x: torch.Tensor, which: str) -> torch.Tensor:
        gen, disc = self.gan["gen"], self.gan["disc"]
        if which == "disc":
            return (disc(gen(x).detach()) - disc(x)).mean()
        return -disc(gen(x)).mean()


def per_network_ddp() -> dict[str, Any]:
    """One DDP per network (as the built-in GAN task); the generator's pass calls the bare discriminator."""
    gan = make_gan()
    gen, disc = DistributedDataParallel(gan["gen"]), DistributedDataParallel(gan["disc"])
    traffic = GradientTraffic(disc)
    wrappers = make_wrappers(gan)
    for x in my_share():
        with wrappers.optim_context(disc, member="disc"):
            disc_loss = (disc(gan["gen"](x).detach()) - disc(x)).mean()
        wrappers["disc"].update_params(disc_loss)
        with wrappers.optim_context(gen, member="gen"):
            gen_loss = -gan["disc"](gen(x)).mean()
        wrappers["gen"].update_params(gen_loss)
    return {"params": params_of(gan), "disc_calls": traffic.calls, "disc_steps": wrappers["disc"].applied_steps}


def whole_model_ddp(find_unused_parameters: bool) -> dict[str, Any]:
    """One DDP over both networks: frozen parameters are unused ones, which DDP must be told to expect."""
    gan = make_gan()
    model = DistributedDataParallel(WholeGan(gan), find_unused_parameters=find_unused_parameters)
    wrappers = make_wrappers(gan)
    try:
        for x in my_share():
            with wrappers.optim_context(model, member="disc"):
                disc_loss = model(x, "disc")
            wrappers["disc"].update_params(disc_loss)
            with wrappers.optim_context(model, member="gen"):
                gen_loss = model(x, "gen")
            wrappers["gen"].update_params(gen_loss)
    except RuntimeError as error:
        return {"error": str(error)[:300]}
    return {"params": params_of(gan), "error": ""}


def per_network_fsdp2() -> dict[str, Any]:
    """fully_shard on each network; the generator's pass must run through the sharded discriminator.

    FSDP2 copies ``requires_grad`` to a parameter's gathered copy when it gathers it: each network must be
    resharded after its forward, which a root module does only when ``reshard_after_forward=True`` is explicit.
    """
    gan = make_gan()
    fully_shard(gan["gen"], reshard_after_forward=True)
    fully_shard(gan["disc"], reshard_after_forward=True)
    traffic = GradientTraffic(gan["disc"])
    wrappers = make_wrappers(gan)
    for x in my_share():
        with wrappers.optim_context(gan["disc"], member="disc"):
            disc_loss = (gan["disc"](gan["gen"](x).detach()) - gan["disc"](x)).mean()
        wrappers["disc"].update_params(disc_loss)
        with wrappers.optim_context(gan["gen"], member="gen"):
            gen_loss = -gan["disc"](gan["gen"](x)).mean()
        wrappers["gen"].update_params(gen_loss)
    return {"params": params_of(gan), "disc_calls": traffic.calls}


def scenarios(local_rank: int, out: str) -> None:
    results = {
        "per_network": per_network_ddp(),
        "whole_model": whole_model_ddp(find_unused_parameters=True),
        "whole_model_control": whole_model_ddp(find_unused_parameters=False),
        "fsdp2": per_network_fsdp2(),
    }
    torch.save(results, Path(out) / f"rank{idist.get_rank()}.pt")
    gc.collect()


if __name__ == "__main__":
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(scenarios, sys.argv[1])
