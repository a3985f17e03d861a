"""What the wrappers need from ``torch.distributed``, and what every rank must agree on.

- ``initialized``, ``rank``, ``world_size``, ``gather_objects``: the process group's basics.
- ``optimizer_state_dict``: a ``ZeroRedundancyOptimizer``'s state is
  consolidated on every rank before it is read, so a checkpoint holds all of it.
- ``check_same_length``: ranks that would run different numbers of iterations
  hang in their next all-reduce; a run refuses to start instead.
- ``all_ranks_agree``: a decision that changes the weights (skip a non-finite
  update) is taken by all ranks together, so they cannot diverge.
- ``all_reduce_sum``: a window's item count (``num_items``), summed over the ranks.
- ``grad_sync_context``: no gradient all-reduce on micro-steps inside a window
  (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``).

Every function is a no-op (and talks to nobody) in a single process.

Examples:
    >>> rank(), world_size(), gather_objects("mine")
    (0, 1, ['mine'])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

NO_CONTEXT: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def initialized() -> bool:
    """Whether ``torch.distributed`` has a process group (else every function here works alone)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the run (1 when ``torch.distributed`` is not initialised)."""
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    """This process's rank (0 when ``torch.distributed`` is not initialised)."""
    return dist.get_rank() if initialized() else 0


def collective_device() -> torch.device:
    """Where tensors for a collective must live: this rank's GPU under NCCL, else the CPU."""
    if initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def state_holder(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``state`` holds the parameters' state: a ``ZeroRedundancyOptimizer``'s local one.

    Examples:
        >>> sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> state_holder(sgd) is sgd
        True
    """
    return optimizer.optim if _is_zero(optimizer) else optimizer  # type: ignore[attr-defined]


def _is_zero(optimizer: torch.optim.Optimizer) -> bool:
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(optimizer, ZeroRedundancyOptimizer)


def check_same_length(epoch_length: int | None) -> None:
    """Raise on every rank if the ranks' epochs differ in length (a collective call).

    Examples:
        >>> check_same_length(8)    # one process: nothing to compare
    """
    lengths = [-1 if length is None else length for length in gather_objects(epoch_length)]
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
    agreed = flag.to(collective_device(), torch.int32)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return agreed.bool()


def all_reduce_sum(value: int | torch.Tensor) -> torch.Tensor:
    """``value`` summed over all ranks, as an int64 tensor on ``collective_device()`` (a collective call).

    Examples:
        >>> all_reduce_sum(3)    # one process: the value itself
        tensor(3)
    """
    total = torch.as_tensor(value).to(collective_device(), torch.int64, copy=True)
    if world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def any_sharded(params: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``params`` is sharded across ranks (a ``DTensor``, as FSDP2's parameters).

    Examples:
        >>> any_sharded(torch.nn.Linear(2, 2).parameters())
        False
    """
    return any(hasattr(param, "full_tensor") for param in params)


def replicated_value(value: torch.Tensor) -> torch.Tensor:
    """A value every rank holds whole (a replicated ``DTensor``, as FSDP2's global gradient norm) as a plain tensor.

    Other tensors are returned as they are. No communication: a replicated
    ``DTensor``'s full tensor is its local one.

    Examples:
        >>> replicated_value(torch.tensor(2.0))
        tensor(2.)
    """
    full_tensor = getattr(value, "full_tensor", None)
    return value if full_tensor is None else full_tensor()


def grad_sync_context(
    model: nn.Module, sync: bool, each_micro_step: bool = False
) -> contextlib.AbstractContextManager[None]:
    """The context that stops gradient reduction for ``model`` when ``sync`` is False.

    FSDP2 decides during the backward, so its flags are set now and outlive
    the forward; DDP decides during the forward, inside ``no_sync()``. With
    ``each_micro_step`` gradients are reduced anyway, and HSDP's all-reduce
    across replicas waits for ``sync``. Looked up on the class:
    ``nn.Module.__getattr__`` is slow for missing names.
    """
    if hasattr(type(model), "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync or each_micro_step)  # type: ignore[operator]
        if each_micro_step:
            model.set_requires_all_reduce(sync)  # type: ignore[operator]
        return NO_CONTEXT
    if not (sync or each_micro_step) and hasattr(type(model), "no_sync"):
        return model.no_sync()  # type: ignore[operator,no-any-return]
    return NO_CONTEXT
