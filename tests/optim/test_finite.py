"""all_finite / grads_finite: the decision of torch.isfinite over every element, kept on the device."""

from __future__ import annotations

import pytest
import torch

from engine_opt.optim.finite import all_finite, grads_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_all_finite_is_false_exactly_when_one_element_is_not_finite(bad):
    tensors = [torch.ones(3), torch.zeros(2, 2), torch.arange(4.0)]
    if bad is not None:
        tensors[1][1, 0] = bad
    result = all_finite(tensors)
    assert result.dtype is torch.bool and result.shape == ()
    assert bool(result) == all(bool(torch.isfinite(t).all()) for t in tensors)
    assert bool(result) is (bad is None)


def test_grads_finite_looks_at_the_gradients_there_are():
    with_grad, without_grad = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.SGD([with_grad, without_grad], lr=0.1)
    assert bool(grads_finite(optimizer))  # no gradient yet
    with_grad.grad = torch.tensor([1.0, float("nan")])
    assert not bool(grads_finite(optimizer))
    assert bool(all_finite([]))
