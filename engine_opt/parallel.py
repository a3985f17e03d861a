"""What the wrappers and the trainer need from ``torch.distributed`` (through ``ignite.distributed``).

- ``optimizer_state_dict``: a ``ZeroRedundancyOptimizer``'s state is
  consolidated on every rank before it is read, so a checkpoint holds all of it.
- ``check_same_length``: ranks that would run different numbers of iterations
  hang in their next all-reduce; the trainer refuses to start instead.
- ``all_ranks_agree``: a decision that changes the weights (skip a non-finite
  update) is taken by all ranks together, so they cannot diverge.
- ``GradientTraffic``: counts the gradient communications of a DDP or FSDP2
  model, to check that accumulation micro-steps do not communicate.

Every function is a no-op (and talks to nobody) in a single process.
"""

from __future__ import annotations

from typing import Any, cast

import ignite.distributed as idist
import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Number of processes in the run (1 when ``torch.distributed`` is not initialised)."""
    return int(idist.get_world_size())


def rank() -> int:
    """This process's rank (0 when ``torch.distributed`` is not initialised)."""
    return int(idist.get_rank())


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, by rank (a collective call); ``[obj]`` in one process."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()``, with a ``ZeroRedundancyOptimizer`` consolidated on every rank first.

    A collective call for a ``ZeroRedundancyOptimizer``: every rank must call it.
    """
    if not _is_zero(optimizer):
        return optimizer.state_dict()
    state: dict[str, Any] = {}
    for target in range(world_size()):  # each consolidation reaches one rank (and clears the others')
        optimizer.consolidate_state_dict(to=target)  # type: ignore[attr-defined]
        if target == rank():
            state = optimizer.state_dict()
    return state


def _is_zero(optimizer: torch.optim.Optimizer) -> bool:
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(optimizer, ZeroRedundancyOptimizer)


def check_same_length(epoch_length: int | None) -> None:
    """Raise on every rank if the ranks' epochs differ in length (a collective call).

    Example:
        >>> check_same_length(8)    # one process: nothing to compare
    """
    if world_size() == 1:
        return
    mine = torch.tensor([-1 if epoch_length is None else epoch_length], device=idist.device())
    lengths = [int(length) for length in cast(torch.Tensor, idist.all_gather(mine)).tolist()]
    if len(set(lengths)) > 1:
        raise ValueError(
            f"the ranks' data have different lengths per epoch ({lengths}, by rank; -1 = unknown); ranks "
            "running different numbers of iterations would wait for each other forever. Shard the data "
            "with ignite.distributed.auto_dataloader (a DistributedSampler pads to equal lengths), or pass "
            "the same epoch_length to trainer.run on every rank"
        )


def all_ranks_agree(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a boolean tensor) and-ed over all ranks, on the device; ``flag`` itself in one process."""
    if world_size() == 1:
        return flag
    agreed = flag.to(idist.device(), torch.int32)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return agreed.bool()


class GradientTraffic:
    """Count the gradient communications of a DDP or FSDP2 model: calls and bytes.

    For ``DistributedDataParallel`` it registers a communication hook that
    counts each bucket and then all-reduces it as DDP would; for an FSDP2
    model (``fully_shard``) it installs a counting reduce-scatter on each
    FSDP module. Create it before the first forward pass. Parameter
    all-gathers (FSDP2's forward) are not gradient traffic and are not
    counted.

    Attributes:
        calls: Gradient reductions so far (DDP buckets or FSDP reduce-scatters).
        bytes: Bytes of gradients sent into those reductions.

    Example:
        >>> traffic = GradientTraffic(torch.nn.Linear(2, 2))   # not distributed: nothing to count
        >>> traffic.calls, traffic.bytes
        (0, 0)
    """

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.bytes = 0
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # A lambda: DDP rejects a hook whose annotations are not its own types (ours are strings).
            model.register_comm_hook(None, lambda state, bucket: self._ddp_hook(state, bucket))
            return
        fsdp_modules = [module for module in model.modules() if hasattr(type(module), "set_custom_reduce_scatter")]
        if fsdp_modules:
            comm = self._fsdp_reduce_scatter()
            for module in fsdp_modules:
                module.set_custom_reduce_scatter(comm)  # type: ignore[operator]

    def _count(self, tensor: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()

    def _ddp_hook(self, state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self._count(bucket.buffer())
        return allreduce_hook(state, bucket)

    def _fsdp_reduce_scatter(self) -> Any:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

        count = self._count

        class CountingReduceScatter(DefaultReduceScatter):
            def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, *args: Any, **kw: Any) -> Any:
                count(input_tensor)
                return super().__call__(output_tensor, input_tensor, *args, **kw)

        return CountingReduceScatter()

    def __repr__(self) -> str:
        return f"GradientTraffic(calls={self.calls}, bytes={self.bytes})"
