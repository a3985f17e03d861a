"""StepUndo: a step taken back where a flag is true leaves parameters and optimizer state as before it, bitwise."""

from __future__ import annotations

import copy

import pytest
import torch

from engine_opt.optim.step_undo import StepUndo

from oracle import OPTIMIZERS, assert_same_tensors, loss_fn, make_batches, make_model


@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adam", "adamw_fused"])
@pytest.mark.parametrize("steps_before", [0, 2])  # 0: the step creates the optimizer state
@pytest.mark.parametrize("flag", [True, False])
def test_a_step_taken_back_is_as_if_never_run_and_one_kept_is_untouched(optimizer_name, steps_before, flag):
    model = make_model()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    batches = make_batches(steps_before + 1)
    for x, y in batches[:steps_before]:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    x, y = batches[-1]
    loss_fn(model(x), y).backward()
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    undo = StepUndo(optimizer)
    optimizer.step()
    after = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    undo.where(torch.tensor(flag))
    expected = before if flag else after
    assert_same_tensors(model.state_dict(), expected[0])
    assert_same_tensors(optimizer.state_dict(), expected[1])
    assert not torch.equal(before[0]["0.weight"], after[0]["0.weight"])  # the step did change something


def test_parameters_without_a_gradient_are_neither_saved_nor_touched():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = make_batches(1)[0]
    loss_fn(model(x), y).backward()
    frozen = next(model.parameters())
    frozen.grad = None
    undo = StepUndo(optimizer)
    assert all(live is not frozen for live, _ in undo.params) and frozen not in undo.states


class ReplacingSGD(torch.optim.Optimizer):
    """Momentum SGD that assigns a new buffer each step (``state['buf'] = ...``) and keeps a Python step count."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                state["buf"] = state.get("buf", torch.zeros_like(param)) * 0.9 + param.grad
                state["steps"] = state.get("steps", 0) + 1
                param.sub_(state["buf"], alpha=group["lr"])


class NestedSGD(ReplacingSGD):
    """The same with its buffer inside a dict, updated in place."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                moments = self.state[param].setdefault("moments", {"buf": torch.zeros_like(param)})
                moments["buf"].mul_(0.9).add_(param.grad)
                param.sub_(moments["buf"], alpha=group["lr"])


class GroupCountingSGD(ReplacingSGD):
    """Keeps a counter and an estimate in its param group, as schedule-free, Prodigy and D-Adaptation do."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["k"] = group.get("k", 0) + 1
            group["d"] = group.get("d", 1.0) * 1.5
            for param in group["params"]:
                param.sub_(param.grad, alpha=group["lr"] * group["d"])


class Float64SGD(ReplacingSGD):
    """Replaces its float32 buffer with a float64 one."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                state["buf"] = state.get("buf", torch.zeros_like(param)).double() * 0.9 + param.grad
                param.sub_(state["buf"].float(), alpha=group["lr"])


@pytest.mark.parametrize("optimizer_class", [ReplacingSGD, NestedSGD, GroupCountingSGD, Float64SGD])
@pytest.mark.parametrize("flag", [True, False])
def test_state_the_step_replaces_or_nests_is_taken_back_too(optimizer_class, flag):
    model = make_model()
    optimizer = optimizer_class(model.parameters())
    x, y = make_batches(1)[0]
    for _ in range(2):  # the state exists before the step under test
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    undo = StepUndo(optimizer)
    optimizer.step()
    after = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    undo.where(torch.tensor([flag]))  # any one-element flag
    expected = before if flag else after
    assert_same_tensors(model.state_dict(), expected[0])
    assert_same_tensors(optimizer.state_dict(), expected[1])


def test_a_zero_redundancy_optimizers_local_state_is_taken_back(tmp_path):
    """ZeRO keeps the state in its local optimizer (``optimizer.optim``), not in its own ``state``."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = make_model()
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.01)
        x, y = make_batches(1)[0]
        loss_fn(model(x), y).backward()
        optimizer.step()
        before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.optim.state_dict()))
        undo = StepUndo(optimizer)
        optimizer.step()
        undo.where(torch.tensor(True))
        assert_same_tensors(model.state_dict(), before[0])
        assert_same_tensors(optimizer.optim.state_dict(), before[1])  # the Adam moments and step too
    finally:
        dist.destroy_process_group()
