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
    assert all(live is not frozen for live, _ in undo.saved)
