"""Whether a float16 step was skipped: read from the scaler's own decision, or by the fallback, against a plain loop.

The plain loop knows a step was skipped when the scale went down. Both ways
of reading it in engine_opt (the scaler's found-inf state, and the fallback
used when that private method is missing) must give the same weights, scale
and skip count, bitwise, for random non-finite batches.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine_opt import AmpOptimWrapper

from oracle import assert_same_model, loss_fn, make_batches, make_model

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=0.01, fused=True),
}


def poisoned_batches(seed):
    rng = random.Random(seed)
    batches = make_batches(12, seed=seed)
    for index in rng.sample(range(12), 4):
        x, y = batches[index]
        batches[index] = (
            x.clone().index_fill_(1, torch.tensor([rng.randrange(4)]), rng.choice([float("nan"), 1e30])),
            y,
        )
    return batches


def plain_run(make_optimizer, batches, clip):
    model = make_model()
    optimizer = make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    skipped = []
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped.append(scaler.get_scale() < scale)
        optimizer.zero_grad()
    return model, scaler, skipped


def wrapper_run(make_optimizer, batches, clip):
    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=make_optimizer(model.parameters()),
        dtype="fp16",
        loss_scale={"init_scale": 2.0**10, "growth_interval": 2},
        clip_grad={"max_norm": 1.0} if clip else None,
    )
    skipped = []
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)
        skipped.append(wrapper.step_was_skipped)
    return model, wrapper, skipped


@pytest.mark.parametrize("path", ["scaler_state", "fallback"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("seed", range(3))
def test_skips_are_the_plain_loops_whichever_way_they_are_read(monkeypatch, path, clip, optimizer, seed):
    if path == "fallback":
        monkeypatch.delattr(torch.amp.GradScaler, "_found_inf_per_device")
    elif not hasattr(torch.amp.GradScaler, "_found_inf_per_device"):
        pytest.skip("this torch's GradScaler has no _found_inf_per_device: the fallback is in use")
    batches = poisoned_batches(seed)
    expected, scaler, expected_skips = plain_run(OPTIMIZERS[optimizer], batches, clip)
    model, wrapper, skips = wrapper_run(OPTIMIZERS[optimizer], batches, clip)
    assert skips == expected_skips and any(skips) and not all(skips)
    assert wrapper.skipped_steps == sum(expected_skips)
    assert wrapper.loss_scaler.state_dict() == scaler.state_dict()
    assert_same_model(model, expected)
