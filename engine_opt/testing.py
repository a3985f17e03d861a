"""``GradientTraffic``: count a model's gradient communications, for tests, examples and benchmarks.

It checks what the wrappers promise about distributed runs (accumulation
micro-steps do not communicate); training never needs it. Like the core, it
imports torch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class GradientTraffic:
    """Count the gradient communications of a DDP or FSDP2 model: calls and bytes.

    For ``DistributedDataParallel`` it registers a communication hook that
    counts each bucket and then all-reduces it as DDP would; for an FSDP2
    model (``fully_shard``) it installs a counting reduce-scatter on each
    FSDP module (``set_custom_reduce_scatter``), and for HSDP (a 2-D mesh) it
    also counts each all-reduce across replicas (``set_all_reduce_hook``;
    FSDP2 skips a reduce-scatter over a shard group of one). Create it before
    the first forward pass. Parameter all-gathers (FSDP2's forward) are not gradient
    traffic and are not counted.

    Attributes:
        calls: Gradient reductions so far (DDP buckets, FSDP2 reduce-scatters, HSDP all-reduces).
        bytes: Bytes of gradients sent into those reductions.

    Examples:
        >>> # not distributed: nothing to count
        >>> traffic = GradientTraffic(torch.nn.Linear(2, 2))
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
        for module in model.modules():
            if hasattr(type(module), "set_custom_reduce_scatter"):
                module.set_custom_reduce_scatter(_CountingReduceScatter(self))  # type: ignore[operator]
                if _hybrid_sharded(module):  # HSDP: the all-reduce across replicas, after the reduce-scatter
                    module.set_all_reduce_hook(self.count)  # type: ignore[operator]

    def count(self, tensor: torch.Tensor) -> None:
        """Count one reduction of ``tensor``."""
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()

    def _ddp_hook(self, state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.count(bucket.buffer())
        return allreduce_hook(state, bucket)

    def __repr__(self) -> str:
        return f"GradientTraffic(calls={self.calls}, bytes={self.bytes})"


def _hybrid_sharded(module: nn.Module) -> bool:
    """Whether an FSDP2 module shards over a 2-D mesh (HSDP: replicate x shard)."""
    meshes = (getattr(param, "device_mesh", None) for param in module.parameters())
    return any(mesh is not None and mesh.ndim == 2 for mesh in meshes)


class _CountingReduceScatter:
    """FSDP2's reduce-scatter communication (its ``ReduceScatter`` interface), counted, through public calls."""

    def __init__(self, traffic: GradientTraffic) -> None:
        self.traffic = traffic

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> Any:
        self.traffic.count(input_tensor)
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
