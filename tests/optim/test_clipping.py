"""GradClipper: the clip_grad argument checked once, and clipping equal to torch's own functions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine_opt.optim.clipping import GradClipper

from oracle import assert_same_tensors


def params_with_grads(seed):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.zeros(shape, requires_grad=True) for shape in [(3, 4), (4,), (2, 2, 2)]]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator) * 5
    return params


@pytest.mark.parametrize(
    ("clip_grad", "torch_clip"),
    [
        ({"max_norm": 1.0}, lambda params: nn.utils.clip_grad_norm_(params, max_norm=1.0)),
        ({"type": "norm", "max_norm": 2.0, "norm_type": 1}, lambda ps: nn.utils.clip_grad_norm_(ps, 2.0, norm_type=1)),
        ({"max_norm": float("inf")}, lambda params: nn.utils.clip_grad_norm_(params, max_norm=float("inf"))),
        ({"type": "value", "clip_value": 0.5}, lambda params: nn.utils.clip_grad_value_(params, clip_value=0.5)),
    ],
)
@pytest.mark.parametrize("seed", range(3))
def test_clipping_equals_torchs_function(clip_grad, torch_clip, seed):
    expected, actual = params_with_grads(seed), params_with_grads(seed)
    expected_norm = torch_clip(expected)
    norm = GradClipper.parse(clip_grad).clip(actual)
    assert_same_tensors([param.grad for param in actual], [param.grad for param in expected])
    assert_same_tensors(norm, expected_norm)


def test_parsing_leaves_the_callers_dict_and_round_trips():
    given = {"type": "norm", "max_norm": 1.0, "norm_type": 2}
    clipper = GradClipper.parse(given)
    assert given == {"type": "norm", "max_norm": 1.0, "norm_type": 2}
    assert clipper == GradClipper("norm", {"max_norm": 1.0, "norm_type": 2})
    assert GradClipper.parse(clipper.as_config()) == clipper
    assert GradClipper.parse(None) is None


@pytest.mark.parametrize(
    ("clip_grad", "error", "message"),
    [
        ([1.0], TypeError, r"clip_grad must be a dict, got \[1.0\]"),
        (
            {"type": "l2", "max_norm": 1},
            ValueError,
            r"clip_grad\['type'\] must be one of \['norm', 'value'\], got 'l2'",
        ),
        ({"max_norm": 1, "clip_value": 1}, ValueError, r"unknown key\(s\) \['clip_value'\]"),
        ({"type": "value"}, ValueError, r"needs 'clip_value'.*dict\(type='value', clip_value=1.0\)"),
    ],
)
def test_bad_clip_grad_is_refused_naming_what_is_wrong(clip_grad, error, message):
    with pytest.raises(error, match=message):
        GradClipper.parse(clip_grad)
