"""``ShardedMuon`` in one process is ``torch.optim.Muon``, bitwise; on two ranks see tests/test_distributed.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine_opt.optim import ShardedMuon
from engine_opt.optim.sharded_muon import _check_layout


def matrices(seed: int = 0) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(4, 4))]


@pytest.mark.parametrize(
    "options",
    [{}, {"nesterov": False}, {"adjust_lr_fn": "match_rms_adamw"}, {"weight_decay": 0.0, "momentum": 0.8}],
)
def test_one_process_is_torchs_muon_bitwise(options):
    expected, actual = matrices(), matrices()
    theirs, ours = torch.optim.Muon(expected, lr=0.02, **options), ShardedMuon(actual, lr=0.02, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(expected, actual, strict=True):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        theirs.step()
        ours.step()
    for a, b in zip(expected, actual, strict=True):
        assert torch.equal(a, b)
    for mine, torchs in zip(ours.state_dict()["state"].values(), theirs.state_dict()["state"].values(), strict=True):
        assert torch.equal(mine["momentum_buffer"], torchs["momentum_buffer"])
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    assert (ours.traffic.calls, ours.traffic.bytes) == (0, 0)  # nothing to gather in one process


def test_layouts_other_than_rows_on_one_mesh_dimension_are_refused():
    replicated = SimpleNamespace(placements=(SimpleNamespace(dim=None, is_shard=lambda: False),), shape=(4, 4))
    with pytest.raises(ValueError, match=r"it takes FSDP2's layout, rows sharded on a 1-D mesh"):
        _check_layout(replicated)
    hybrid = SimpleNamespace(placements=(SimpleNamespace(dim=0, is_shard=lambda: True),) * 2, shape=(4, 4))
    with pytest.raises(ValueError, match=r"HSDP and other layouts are not supported"):
        _check_layout(hybrid)


def test_a_closure_is_refused():
    with pytest.raises(TypeError, match="takes no closure"):
        ShardedMuon(matrices(), lr=0.02).step(lambda: 0.0)
