"""The ranks of the distributed tests (2 processes, gloo), launched with ``ignite.distributed.Parallel``.

Each scenario records what its rank saw in a dict; ``scenarios`` saves them
to ``OUT/rank{r}.pt`` for tests/test_distributed.py to compare with the plain
single-process loops of tests/support/oracle.py.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from engine_opt import OptimWrapper, build_optim_wrapper, create_trainer
from engine_opt.checkpoint import attach_checkpoint, latest_checkpoint, load_checkpoint
from engine_opt.handlers import NonFiniteGuard, SpikeGuard, UpdateTelemetryHandler
from engine_opt.testing import GradientTraffic

from oracle import OPTIMIZERS, item_loss_sum, loss_fn, make_batches, make_model

ACCUMULATE = 4
ITERATIONS = 8
GLOBAL_BATCH = 6


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_batches(ITERATIONS, batch_size=GLOBAL_BATCH)


def my_share(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's half of every global batch (what a DistributedSampler would give it)."""
    half = GLOBAL_BATCH // idist.get_world_size()
    start = idist.get_rank() * half
    return [(x[start : start + half], y[start : start + half]) for x, y in batches]


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()
        for param in model.parameters()
    ]


def ddp_with_wrapper() -> dict[str, Any]:
    """The trainer's default step on DDP: accumulation 4, clipping."""
    model = DistributedDataParallel(make_model())
    traffic = GradientTraffic(model)
    optimizer = OPTIMIZERS["sgd_momentum"](model.parameters())
    wrapper = OptimWrapper(optimizer, accumulative_counts=ACCUMULATE, clip_grad={"max_norm": 1.0})
    create_trainer(model, wrapper, loss_fn).run(my_share(global_batches()))
    return {"calls": traffic.calls, "bytes": traffic.bytes, "params": params_of(model), "steps": wrapper.applied_steps}


def ddp_without_sync_avoidance() -> dict[str, Any]:
    """Control: the same accumulation written without no_sync reduces on every micro-step."""
    model = DistributedDataParallel(make_model())
    traffic = GradientTraffic(model)
    optimizer = OPTIMIZERS["sgd_momentum"](model.parameters())
    for index, (x, y) in enumerate(my_share(global_batches())):
        (loss_fn(model(x), y) / ACCUMULATE).backward()
        if (index + 1) % ACCUMULATE == 0:
            optimizer.step()
            optimizer.zero_grad()
    return {"calls": traffic.calls, "params": params_of(model)}


SAM_RHO = 0.05


def ddp_sam() -> dict[str, Any]:
    """SAM on DDP through the trainer: each rank perturbs by its own gradient, only the second pass reduces."""
    model = DistributedDataParallel(make_model())
    traffic = GradientTraffic(model)
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()), sam={"rho": SAM_RHO})
    create_trainer(model, wrapper, loss_fn).run(my_share(global_batches()))
    return {"calls": traffic.calls, "params": params_of(model), "steps": wrapper.applied_steps}


MUON_LR, MUON_ADAMW_LR = 0.02, 0.01


def muon_config(muon_type: str = "Muon") -> dict[str, Any]:
    """Muon for the 2-D weights, AdamW for the rest: on an FSDP2 model, ``Muon`` builds a ``ShardedMuon``."""
    routes = {"muon": {"ndim": 2, "optimizer": {"type": muon_type, "lr": MUON_LR}}}
    return {"optimizer": {"type": "AdamW", "lr": MUON_ADAMW_LR}, "routes": routes, "clip_grad": {"max_norm": 1.0}}


def sharded_muon(kind: str) -> dict[str, Any]:
    """Muon beside AdamW, routed, on FSDP2 (gather, orthogonalise, scatter) or DDP (orthogonalise, broadcast)."""
    model = make_model()
    if kind == "fsdp2":
        fully_shard(model)
        wrapper = build_optim_wrapper(model, muon_config())
    else:
        model = DistributedDataParallel(model)
        wrapper = build_optim_wrapper(model, muon_config("engine_opt.optim.ShardedMuon"))
    muon = wrapper.optimizer["muon"]
    create_trainer(model, wrapper, loss_fn).run(my_share(global_batches()))
    return {
        "params": params_of(model),
        "type": type(muon).__name__,
        "calls": muon.traffic.calls,
        "bytes": muon.traffic.bytes,
    }


CLIP_NORM, CLIP_VALUE = 0.5, 0.02


def fsdp2_clipping(clip_grad: dict[str, Any]) -> dict[str, Any]:
    """FSDP2 with norm or value clipping: each window's gradient norm over every shard, one tensor on each rank."""
    model = make_model()
    fully_shard(model)
    optimizer = OPTIMIZERS["sgd_momentum"](model.parameters())
    wrapper = OptimWrapper(optimizer, accumulative_counts=ACCUMULATE, clip_grad=clip_grad)
    norms = []
    for x, y in my_share(global_batches()):
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)
        if wrapper.inner_count % ACCUMULATE == 0 and wrapper.grad_norm is not None:
            norms.append(wrapper.grad_norm)
    return {"params": params_of(model), "norms": norms, "norm_types": sorted({type(norm).__name__ for norm in norms})}


def sharded_accumulation(hybrid: bool, each_micro_step: bool) -> dict[str, Any]:
    """FSDP2, or HSDP (replicate 2 x shard 1), through the wrapper: reduced once per window or every micro-step."""
    model = make_model()
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")) if hybrid else None
    fully_shard(model, mesh=mesh)
    traffic = GradientTraffic(model)
    optimizer = OPTIMIZERS["sgd_momentum"](model.parameters())
    wrapper = OptimWrapper(optimizer, accumulative_counts=ACCUMULATE, sync_each_micro_step=each_micro_step)
    for x, y in my_share(global_batches()):
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)
    return {"calls": traffic.calls, "bytes": traffic.bytes, "params": params_of(model)}


def hsdp_without_sync_avoidance() -> dict[str, Any]:
    """Control: HSDP accumulation written without the flags all-reduces on every micro-step."""
    model = make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")))
    traffic = GradientTraffic(model)
    for x, y in my_share(global_batches()):
        (loss_fn(model(x), y) / ACCUMULATE).backward()
    return {"calls": traffic.calls}


def ddp_each_micro_step() -> dict[str, Any]:
    """DDP through the trainer with sync_each_micro_step: every micro-step all-reduces."""
    model = DistributedDataParallel(make_model())
    traffic = GradientTraffic(model)
    optimizer = OPTIMIZERS["sgd_momentum"](model.parameters())
    wrapper = OptimWrapper(optimizer, accumulative_counts=ACCUMULATE, sync_each_micro_step=True)
    create_trainer(model, wrapper, loss_fn).run(my_share(global_batches()))
    return {"calls": traffic.calls, "params": params_of(model)}


def telemetry_reads(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], clip: bool = True
) -> list[dict[str, float]]:
    """UpdateTelemetryHandler on every update of an SGD run (clipped), read after each (shared with the test)."""
    clip_grad = {"max_norm": CLIP_NORM} if clip else None
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()), clip_grad=clip_grad)
    telemetry = UpdateTelemetryHandler(wrapper, every=1, model=model, depth=1)
    reads = [telemetry.read()]
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)
        reads.append(telemetry.read())
    return reads


def sharded_telemetry(hybrid: bool) -> dict[str, Any]:
    """Telemetry of an FSDP2 (or HSDP) model: each rank measures its shards, one all-reduce makes them whole."""
    model = make_model()
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")) if hybrid else None
    fully_shard(model, mesh=mesh)
    return {"reads": telemetry_reads(model, my_share(global_batches())[:3])}


def mixed_telemetry() -> dict[str, Any]:
    """FSDP2 leaving two parameters plain (ignored_params), every rank on the whole batches: plain parameters
    are whole on each rank, sharded ones in parts; the telemetry must still be one process's."""
    model = make_model()
    fully_shard(model, ignored_params={model[0].weight, model[3].bias})
    return {"reads": telemetry_reads(model, global_batches()[:3], clip=False)}


def fsdp2_without_sync_avoidance() -> dict[str, Any]:
    """Control: FSDP2 accumulation written without set_requires_gradient_sync reduces on every micro-step."""
    model = make_model()
    fully_shard(model)
    traffic = GradientTraffic(model)
    for x, y in my_share(global_batches()):
        (loss_fn(model(x), y) / ACCUMULATE).backward()
    return {"calls": traffic.calls}


ITEM_SPLITS = [1, 2, 5, 3, 4, 1, 2, 5]  # rank 0's rows of each global batch of 6, rank 1 has the rest


def my_uneven_share(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank 0's first rows of every global batch, rank 1's others: the ranks count different numbers of items."""
    rows = [slice(0, split) if idist.get_rank() == 0 else slice(split, None) for split in ITEM_SPLITS]
    return [(x[part], y[part]) for (x, y), part in zip(batches, rows, strict=True)]


def ddp_num_items() -> dict[str, Any]:
    """Token weighting through the trainer on DDP: accumulation 4, clipping; all-reduces of the count counted."""
    model = DistributedDataParallel(make_model())
    traffic = GradientTraffic(model)
    wrapper = OptimWrapper(
        OPTIMIZERS["sgd_momentum"](model.parameters()), accumulative_counts=ACCUMULATE, clip_grad={"max_norm": 1.0}
    )
    trainer = create_trainer(model, wrapper, item_loss_sum, num_items=lambda x, y: len(x))
    all_reduce, counts = torch.distributed.all_reduce, []
    torch.distributed.all_reduce = lambda tensor, *args, **kwargs: (
        counts.append(f"{tensor.dtype} {tuple(tensor.shape)}") or all_reduce(tensor, *args, **kwargs)
    )
    try:
        trainer.run(my_uneven_share(global_batches()))
    finally:
        torch.distributed.all_reduce = all_reduce
    return {"calls": traffic.calls, "all_reduces": counts, "params": params_of(model)}


def fsdp2_num_items() -> dict[str, Any]:
    """Token weighting on FSDP2 (gradients reduce-scattered once per window, averaged), tensor counts."""
    model = make_model()
    fully_shard(model)
    traffic = GradientTraffic(model)
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()), accumulative_counts=ACCUMULATE)
    for x, y in my_uneven_share(global_batches()):
        with wrapper.optim_context(model):
            loss = item_loss_sum(model(x), y)
        wrapper.update_params(loss, num_items=torch.tensor(len(x)))
    return {"calls": traffic.calls, "params": params_of(model)}


def uneven_data() -> dict[str, Any]:
    """Rank 1 has one batch more than rank 0: the trainer refuses to start on both ranks."""
    model = DistributedDataParallel(make_model())
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.05))
    data = my_share(global_batches())[: 5 + idist.get_rank()]
    try:
        create_trainer(model, wrapper, loss_fn).run(data)
    except ValueError as error:
        return {"error": str(error), "params": params_of(model)}
    return {"error": None, "params": params_of(model)}


POISONED_ITERATION = 3


def guard_agreement() -> dict[str, Any]:
    """Only rank 1 sees a non-finite loss (its gradients stay finite): both ranks must skip that update."""
    model = DistributedDataParallel(make_model())
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()))

    def train_step(engine: Engine, batch: Any) -> torch.Tensor:
        x, y = batch
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
            if idist.get_rank() == 1 and engine.state.iteration == POISONED_ITERATION:
                loss = loss + torch.tensor(float("inf"))  # a constant: no effect on the gradients
        wrapper.update_params(loss)
        return loss.detach()

    trainer = create_trainer(model, wrapper, train_step=train_step)
    guard = NonFiniteGuard("skip")
    guard.attach(trainer)
    trainer.run(my_share(global_batches()))
    return {"skipped": guard.skipped, "params": params_of(model), "applied": wrapper.applied_steps}


SPIKE_ITERATIONS = 20
SPIKED_ITERATION = 15


def spike_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_batches(SPIKE_ITERATIONS, batch_size=GLOBAL_BATCH, seed=3)


def spike_agreement() -> dict[str, Any]:
    """Only rank 1's share of one batch spikes, and only the loss is watched: judged on the ranks' mean loss,
    every rank cancels that update (judged on its own, rank 0 would apply it)."""
    model = DistributedDataParallel(make_model())
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()))
    trainer = create_trainer(model, wrapper, loss_fn)
    guard = SpikeGuard("skip", warmup=8, watch="loss")
    guard.attach(trainer)
    data = my_share(spike_batches())
    if idist.get_rank() == 1:
        x, y = data[SPIKED_ITERATION - 1]
        data[SPIKED_ITERATION - 1] = (x, y * 1e3)
    trainer.run(data)
    return {"spikes": guard.spikes(), "params": params_of(model), "applied": wrapper.applied_steps}


def zero_checkpoint(directory: Path) -> dict[str, Any]:
    """ZeroRedundancyOptimizer in a wrapper, through Ignite's Checkpoint, written by rank 0, read by all."""

    def build() -> tuple[torch.nn.Module, OptimWrapper]:
        model = DistributedDataParallel(make_model())
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.01)
        return model, OptimWrapper(optimizer, accumulative_counts=2)

    model, wrapper = build()
    trainer = create_trainer(model, wrapper, loss_fn)
    to_save = {"model": model, "optim_wrapper": wrapper, "trainer": trainer}
    attach_checkpoint(trainer, to_save, directory, every=2)
    trainer.run(my_share(global_batches())[:5])
    idist.barrier()  # rank 0 has written the last checkpoint
    path = latest_checkpoint(directory)
    assert path is not None
    saved = torch.load(path, weights_only=True)
    fresh_model, fresh_wrapper = build()
    fresh_trainer = create_trainer(fresh_model, fresh_wrapper, loss_fn)
    load_checkpoint({"model": fresh_model, "optim_wrapper": fresh_wrapper, "trainer": fresh_trainer}, path)
    return {
        "path": path.name,
        "saved_states": len(saved["optim_wrapper"]["state"]),
        "local_states": len(wrapper.optimizer.optim.state),
        "expected": wrapper.state_dict(),
        "loaded": fresh_wrapper.state_dict(),
        "params": params_of(fresh_model),
        "iteration": fresh_trainer.state.iteration,
    }


def fsdp2_into_one_file(directory: Path) -> str:
    """attach_checkpoint of an FSDP2 model: refused, pointing at sharded checkpoints."""
    model = make_model()
    fully_shard(model)
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()))
    try:
        attach_checkpoint(create_trainer(model, wrapper, loss_fn), {"model": model}, directory)
    except ValueError as error:
        return str(error)
    return "accepted"


def scenarios(local_rank: int, out: str) -> None:
    directory = Path(out)
    results = {
        "ddp": ddp_with_wrapper(),
        "ddp_control": ddp_without_sync_avoidance(),
        "fsdp2": sharded_accumulation(hybrid=False, each_micro_step=False),
        "fsdp2_control": fsdp2_without_sync_avoidance(),
        "hsdp": sharded_accumulation(hybrid=True, each_micro_step=False),
        "hsdp_control": hsdp_without_sync_avoidance(),
        "fsdp2_each_micro_step": sharded_accumulation(hybrid=False, each_micro_step=True),
        "hsdp_each_micro_step": sharded_accumulation(hybrid=True, each_micro_step=True),
        "ddp_each_micro_step": ddp_each_micro_step(),
        "fsdp2_clip_norm": fsdp2_clipping({"max_norm": CLIP_NORM}),
        "fsdp2_telemetry": sharded_telemetry(hybrid=False),
        "hsdp_telemetry": sharded_telemetry(hybrid=True),
        "mixed_telemetry": mixed_telemetry(),
        "fsdp2_clip_value": fsdp2_clipping({"type": "value", "clip_value": CLIP_VALUE}),
        "uneven": uneven_data(),
        "guard": guard_agreement(),
        "spike": spike_agreement(),
        "zero": zero_checkpoint(directory / "zero"),
        "fsdp2_file": fsdp2_into_one_file(directory / "fsdp2_file"),
        "ddp_num_items": ddp_num_items(),
        "fsdp2_num_items": fsdp2_num_items(),
        "ddp_sam": ddp_sam(),
        "fsdp2_muon": sharded_muon("fsdp2"),
        "ddp_muon": sharded_muon("ddp"),
    }
    torch.save(results, directory / f"rank{idist.get_rank()}.pt")
    # The trainers and checkpoint handlers above sit in reference cycles with their DDP models: free them
    # while the process group exists (as docs/distributed.md tells users), not at interpreter exit.
    gc.collect()


if __name__ == "__main__":
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(scenarios, sys.argv[1])
