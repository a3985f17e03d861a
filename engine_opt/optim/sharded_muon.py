"""``ShardedMuon``: torch's Muon where each rank holds a shard of every matrix (FSDP2), or all of them (DDP).

Muon's Newton-Schulz iteration needs whole matrices, and ``torch.optim.Muon``
has no ``DTensor`` support. Here the momentum and the Nesterov blend stay on
each rank's shard (they are elementwise); then, matrix by matrix, the shards of
the update are gathered on one owning rank (the matrices are dealt round the
ranks in turn, so each orthogonalises its share), orthogonalised there, and the
result is scattered back to the shards. With DDP the parameters and their
(already averaged) gradients are whole on every rank: the owner orthogonalises
and broadcasts, so the ranks split the work and stay bitwise equal. In one
process it is ``torch.optim.Muon``, bitwise.

Per step and matrix of ``n x m`` (``c = ceil(n / ranks)`` rows per shard):
FSDP2 gathers ``ranks * c * m`` float32 values on the owner and scatters as many
bfloat16 ones back (one call each); DDP broadcasts ``n * m`` bfloat16 values.
``traffic`` counts each collective a rank joins and the bytes of the whole (padded) matrix it moves.

Examples:
    >>> import torch
    >>> weight = torch.nn.Parameter(torch.ones(3, 2))
    >>> weight.grad = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> optimizer = ShardedMuon([weight], lr=0.1)
    >>> optimizer.step()
    >>> optimizer.traffic
    MuonTraffic(calls=0, bytes=0)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

Orthogonalise = Callable[[torch.Tensor], torch.Tensor]
"""A whole update matrix to its orthogonalised form (``newton_schulz`` with a group's settings)."""


@dataclass
class MuonTraffic:
    """The communication of a ``ShardedMuon``'s steps: collective calls, and the bytes they carried."""

    calls: int = 0
    bytes: int = 0

    def count(self, *tensors: torch.Tensor) -> None:
        """Count one call carrying ``tensors``."""
        self.calls += 1
        self.bytes += sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def newton_schulz(
    update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration Muon orthogonalises with, in bfloat16, as ``torch.optim.Muon`` runs it."""
    a, b, c = coefficients
    ortho = update.bfloat16()
    tall = update.size(0) > update.size(1)
    if tall:
        ortho = ortho.T
    ortho.div_(ortho.norm().clamp(min=eps))
    for _ in range(steps):
        gram = ortho @ ortho.T
        ortho = torch.addmm(ortho, torch.addmm(gram, gram, gram, beta=b, alpha=c), ortho, beta=a)
    return ortho.T if tall else ortho


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's learning rate for a matrix of ``shape``: scaled by its aspect (``'original'``) or to AdamW's RMS."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s shard on this rank (shares its storage), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


class ShardedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` over FSDP2-sharded (``DTensor``, ``Shard(0)`` on a 1-D mesh) or DDP parameters.

    Takes ``torch.optim.Muon``'s arguments; its state dict is Muon's.
    ``build_optim_wrapper`` uses it for ``type='Muon'`` when the parameters are
    sharded. Every rank must step (the matrices' collectives pair up in order).

    Attributes:
        traffic: The collectives of the steps so far (``MuonTraffic``).
    """

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.traffic = MuonTraffic()
        for group in self.param_groups:
            for param in group["params"]:
                _check_layout(param)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One Muon step: momentum on the shards, each matrix orthogonalised whole on its owner, shards updated."""
        if closure is not None:
            raise TypeError("ShardedMuon.step takes no closure")
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - group["momentum"])
                update = param.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                orthogonalise = functools.partial(
                    newton_schulz, coefficients=group["ns_coefficients"], steps=group["ns_steps"], eps=group["eps"]
                )
                ortho = self._orthogonalised(param, _local(update), index, orthogonalise)
                index += 1
                local = _local(param)
                local.mul_(1 - group["lr"] * group["weight_decay"])
                local.add_(ortho, alpha=-adjusted_lr(group["lr"], group["adjust_lr_fn"], param.shape))

    def _orthogonalised(
        self, param: torch.Tensor, update: torch.Tensor, index: int, orthogonalise: Orthogonalise
    ) -> torch.Tensor:
        """This rank's rows of the whole update orthogonalised by the matrix's owner (``index`` dealt round)."""
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None:
            return self._through_shards(mesh.get_group(), param.shape[0], update, index, orthogonalise)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return orthogonalise(update)
        owner = index % dist.get_world_size()
        # contiguous: the collective sends the storage as it lies, and a tall matrix's result is a transpose
        ortho = (
            orthogonalise(update).contiguous()
            if dist.get_rank() == owner
            else torch.empty_like(update, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
        )
        # every rank counts the call it joins
        dist.broadcast(ortho, src=owner)
        self.traffic.count(ortho)
        return ortho

    def _through_shards(
        self, group: Any, rows: int, shard: torch.Tensor, index: int, orthogonalise: Orthogonalise
    ) -> torch.Tensor:
        """Gather the shards (padded to equal rows) on the owner, orthogonalise there, scatter the rows back."""
        ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        owner = index % ranks
        owner_global = dist.get_global_rank(group, owner)
        chunk = math.ceil(rows / ranks)
        padded = shard.new_zeros((chunk, *shard.shape[1:]))
        padded[: shard.shape[0]] = shard
        pieces = [torch.empty_like(padded) for _ in range(ranks)] if rank == owner else None
        dist.gather(padded, pieces, dst=owner_global, group=group)
        self.traffic.count(*[padded] * ranks)
        mine = torch.empty_like(padded, dtype=torch.bfloat16)
        outgoing = None
        if pieces is not None:
            whole = torch.cat(pieces)
            whole[:rows] = orthogonalise(whole[:rows])
            outgoing = list(whole.bfloat16().reshape(ranks, chunk, *whole.shape[1:]).unbind(0))
        dist.scatter(mine, outgoing, src=owner_global, group=group)
        self.traffic.count(*[mine] * ranks)
        return mine[: shard.shape[0]]


def _check_layout(param: torch.Tensor) -> None:
    """Refuse a ``DTensor`` that is not sharded by rows on a 1-D mesh (FSDP2's default layout)."""
    placements = getattr(param, "placements", None)
    if placements is None:
        return
    if len(placements) != 1 or not (getattr(placements[0], "dim", None) == 0 and placements[0].is_shard()):
        raise ValueError(
            f"ShardedMuon: a parameter of shape {tuple(param.shape)} is laid out as {tuple(placements)}; it takes "
            "FSDP2's layout, rows sharded on a 1-D mesh (Shard(0)); HSDP and other layouts are not supported"
        )


__all__ = ["MuonTraffic", "ShardedMuon", "adjusted_lr", "newton_schulz"]
