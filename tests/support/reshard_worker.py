"""One run of the resharding tests: trained on N gloo processes, checkpointed, maybe stopped, maybe resumed.

    python reshard_worker.py KIND PROCESSES DIRECTORY OUT [STOP]

KIND is ``fsdp2`` (``fully_shard``, ``attach_sharded_checkpoint`` with an
asynchronous save), ``fsdp2_muon`` (the same, with Muon beside AdamW), ``ddp`` or ``zero`` (DDP, with a
``ZeroRedundancyOptimizer`` for ``zero``; ``attach_checkpoint``). The run
resumes from DIRECTORY's newest checkpoint if there is one, saves every
iteration, and stops after iteration STOP if given. The data is a
``DistributedSampler`` over numbered samples with a global batch of
``GLOBAL_BATCH`` at any number of processes; rank 0 saves to OUT the whole
parameters and, for every rank, the iteration and sample ids of each batch
it trained on.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Events
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from engine_opt import OptimWrapper, build_optim_wrapper, create_trainer
from engine_opt.checkpoint import attach_checkpoint, attach_sharded_checkpoint, resume_from_latest
from engine_opt.engine import ResumableLoader
from engine_opt.optim.distributed import gather_objects

from oracle import loss_fn, make_model

SAMPLES, GLOBAL_BATCH, EPOCHS, ACCUMULATE, SEED, LR = 48, 6, 2, 2, 0, 0.01


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(SAMPLES, 4, generator=generator), torch.randn(SAMPLES, 2, generator=generator)
    return TensorDataset(x, y, torch.arange(SAMPLES))


def build(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    if kind == "fsdp2_muon":  # Muon (a ShardedMuon) for the 2-D weights, AdamW for the rest, in one RoutedOptimizer
        fully_shard(model)
        routes = {"muon": {"ndim": 2, "optimizer": {"type": "Muon", "lr": LR}}}
        return model, build_optim_wrapper(model, {"optimizer": {"type": "AdamW", "lr": LR}, "routes": routes}).optimizer
    if kind == "fsdp2":
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=LR)
    model = DistributedDataParallel(model)
    if kind == "zero":
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR)
    return model, torch.optim.AdamW(model.parameters(), lr=LR)


def run(local_rank: int, kind: str, directory: str, out: str, stop: int | None) -> None:
    world, rank = idist.get_world_size(), idist.get_rank()
    model, optimizer = build(kind)
    wrapper = OptimWrapper(optimizer, accumulative_counts=ACCUMULATE)
    seen: list[tuple[int, list[int]]] = []
    iteration = [0]  # the trainer's, read by prepare_batch

    def prepare_batch(batch: Any, device: Any, non_blocking: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, ids = batch
        seen.append((iteration[0], ids.tolist()))
        return x, y

    trainer = create_trainer(model, wrapper, loss_fn, prepare_batch=prepare_batch)
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda engine: iteration.__setitem__(0, engine.state.iteration))
    sampler = DistributedSampler(dataset(), num_replicas=world, rank=rank, shuffle=True, seed=SEED)
    data = ResumableLoader(DataLoader(dataset(), batch_size=GLOBAL_BATCH // world, sampler=sampler))
    to_save = {"model": model, "optim_wrapper": wrapper, "trainer": trainer, "data": data}
    resumed = resume_from_latest(to_save, directory)
    if kind.startswith("fsdp2"):
        attach_sharded_checkpoint(trainer, to_save, directory, every=1, n_saved=None, async_save=True)
    else:
        attach_checkpoint(trainer, to_save, directory, every=1, n_saved=None)
    if stop is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop), lambda engine: engine.terminate())
    trainer.run(data, max_epochs=EPOCHS)
    params = [
        (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()
        for param in model.parameters()
    ]
    every_rank = gather_objects(seen)
    if rank == 0:
        torch.save({"params": params, "seen": every_rank, "resumed": None if resumed is None else resumed.name}, out)
    del trainer, to_save, model, wrapper, optimizer
    gc.collect()  # free the DDP reducer (held in the trainer's reference cycles) while the process group exists


if __name__ == "__main__":
    kind, processes, directory, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    stop = int(sys.argv[5]) if len(sys.argv) > 5 else None
    with idist.Parallel(backend="gloo", nproc_per_node=processes) as parallel:
        parallel.run(run, kind, str(Path(directory)), out, stop)
