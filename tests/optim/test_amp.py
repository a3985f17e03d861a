"""AmpOptimWrapper on CPU against the plain autocast/GradScaler loop, bitwise."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from engine_opt import AmpOptimWrapper
from engine_opt.optim.amp import parse_dtype

from helpers import roundtrip, run_wrapper
from oracle import (
    OPTIMIZERS,
    Plan,
    assert_same_model,
    assert_same_tensors,
    loss_fn,
    make_batches,
    make_model,
    plain_loop,
)

FP16 = torch.float16
CONFIGS = {
    "bf16": (Plan(amp_dtype=torch.bfloat16), {"dtype": "bfloat16"}, 5),
    "bf16_accumulate_3_clip": (
        Plan(amp_dtype=torch.bfloat16, accumulate=3, clip_norm=0.05),
        {"dtype": "bf16", "accumulative_counts": 3, "clip_grad": {"max_norm": 0.05}},
        7,
    ),
    "fp16_dynamic": (Plan(amp_dtype=FP16, scaler_kwargs={}), {"dtype": "float16"}, 5),
    "fp16_static": (Plan(amp_dtype=FP16, scaler_kwargs={"init_scale": 256.0}), {"dtype": FP16, "loss_scale": 256}, 5),
    "fp16_dict_scale": (
        Plan(amp_dtype=FP16, scaler_kwargs={"init_scale": 8.0, "growth_interval": 2}),
        {"dtype": "fp16", "loss_scale": {"init_scale": 8.0, "growth_interval": 2}},
        6,
    ),
    "fp16_accumulate_3_clip_norm": (
        Plan(amp_dtype=FP16, scaler_kwargs={"init_scale": 1024.0}, accumulate=3, clip_norm=0.05),
        {
            "dtype": "fp16",
            "loss_scale": {"init_scale": 1024.0},
            "accumulative_counts": 3,
            "clip_grad": {"max_norm": 0.05},
        },
        7,
    ),
    "fp16_clip_value": (
        Plan(amp_dtype=FP16, scaler_kwargs={"init_scale": 1024.0}, clip_value=0.01),
        {"dtype": "fp16", "loss_scale": {"init_scale": 1024.0}, "clip_grad": {"type": "value", "clip_value": 0.01}},
        5,
    ),
}


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_plain_autocast_loop_bitwise(optimizer_name, config):
    plan, kwargs, n = CONFIGS[config]
    batches = make_batches(n)
    expected_model = make_model()
    expected_optimizer = OPTIMIZERS[optimizer_name](expected_model.parameters())
    result = plain_loop(expected_model, expected_optimizer, batches, plan)

    model = make_model()
    wrapper = AmpOptimWrapper(optimizer=OPTIMIZERS[optimizer_name](model.parameters()), **kwargs)
    wrapper.initialize_count_status(model, 0, n)
    run_wrapper(model, wrapper, batches)

    assert_same_model(model, expected_model)
    assert_same_tensors(wrapper.optimizer.state_dict(), expected_optimizer.state_dict())
    if result["scaler"] is None:
        assert wrapper.loss_scaler is None and wrapper.skipped_steps == 0
    else:
        assert wrapper.loss_scaler.get_scale() == result["scaler"].get_scale()
        assert wrapper.skipped_steps == result["skipped"]
    assert wrapper.applied_steps + wrapper.skipped_steps == -(-n // plan.accumulate)


def test_the_default_dynamic_scale_skips_and_reports_like_the_plain_loop():
    """65536 overflows the float16 gradients of this problem at first: both loops skip the same steps."""
    batches = [(x, y * 100) for x, y in make_batches(8, batch_size=64)]
    expected = make_model()
    expected_optimizer = OPTIMIZERS["sgd_momentum"](expected.parameters())
    result = plain_loop(expected, expected_optimizer, batches, Plan(amp_dtype=FP16, scaler_kwargs={}))
    model = make_model()
    wrapper = AmpOptimWrapper(optimizer=OPTIMIZERS["sgd_momentum"](model.parameters()), dtype="float16")
    skipped = []
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)
        skipped.append(wrapper.step_was_skipped)
    assert_same_model(model, expected)
    assert sum(skipped) == result["skipped"] == wrapper.skipped_steps
    assert 0 < sum(skipped) < 8 and wrapper.applied_steps == 8 - sum(skipped)


@pytest.mark.parametrize("optimizer_name", ["adamw", "adamw_fused", "sgd_momentum"])
@pytest.mark.parametrize("clip", [None, {"max_norm": 0.05}])
def test_injected_inf_skips_the_step_and_says_so(optimizer_name, clip):
    batches = make_batches(4)
    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=OPTIMIZERS[optimizer_name](model.parameters()),
        dtype="fp16",
        loss_scale={"init_scale": 512.0},
        clip_grad=clip,
    )
    run_wrapper(model, wrapper, batches[:2])
    assert not wrapper.step_was_skipped
    params = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(wrapper.optimizer.state_dict())
    norm_before = None if wrapper.grad_norm is None else wrapper.grad_norm.clone()
    scale = wrapper.loss_scaler.get_scale()

    x, y = batches[2]
    x = x.clone()
    x[0, 0] = float("inf")
    run_wrapper(model, wrapper, [(x, y)])

    assert wrapper.step_was_skipped
    assert_same_tensors(dict(model.state_dict()), params)
    assert_same_tensors(wrapper.optimizer.state_dict(), optimizer_state)
    assert wrapper.loss_scaler.get_scale() == scale / 2
    assert (wrapper.skipped_steps, wrapper.applied_steps) == (1, 2)
    if clip is not None:
        assert torch.equal(wrapper.grad_norm, norm_before)  # norm of the last applied step
    assert all(p.grad is None for p in model.parameters())

    run_wrapper(model, wrapper, batches[3:])
    assert not wrapper.step_was_skipped and wrapper.applied_steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_static_scale_stays_after_a_skip():
    model = make_model()
    wrapper = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype="fp16", loss_scale=64)
    x, y = make_batches(1)[0]
    x = x.clone()
    x[0] = float("nan")
    run_wrapper(model, wrapper, [(x, y)])
    assert wrapper.step_was_skipped and wrapper.loss_scaler.get_scale() == 64.0


def test_dtypes_and_autocast_device():
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert parse_dtype(None, "cpu") is torch.bfloat16 and parse_dtype(None, "cuda") is torch.float16
    for alias, dtype in [
        ("fp16", FP16),
        ("bf16", torch.bfloat16),
        ("float32", torch.float32),
        ("float64", torch.float64),
        (torch.bfloat16, torch.bfloat16),
    ]:
        assert parse_dtype(alias, "cpu") is dtype
    default = AmpOptimWrapper(optimizer=sgd)
    assert default.cast_dtype is torch.bfloat16 and default.loss_scaler is None
    with default.optim_context(model):
        assert model(torch.ones(2, 4)).dtype is torch.bfloat16
    full = AmpOptimWrapper(optimizer=sgd, dtype="float32", loss_scale=128.0)
    assert full.loss_scaler is None
    with full.optim_context(model):
        assert model(torch.ones(2, 4)).dtype is torch.float32
    half = AmpOptimWrapper(optimizer=sgd, dtype="float16")
    assert isinstance(half.loss_scaler, torch.amp.GradScaler) and half.loss_scaler._device == "cpu"
    assert "dtype=torch.float16" in repr(half) and "AmpOptimWrapper(" in repr(half)


def test_resume_mid_window_restores_the_scale_and_matches_the_plain_loop():
    batches = make_batches(6)
    scaler_kwargs = {"init_scale": 4.0, "growth_interval": 1}
    expected = make_model()
    expected_optimizer = OPTIMIZERS["adamw"](expected.parameters())
    result = plain_loop(
        expected, expected_optimizer, batches, Plan(amp_dtype=FP16, scaler_kwargs=scaler_kwargs, accumulate=2)
    )

    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=OPTIMIZERS["adamw"](model.parameters()), dtype="fp16", loss_scale=scaler_kwargs, accumulative_counts=2
    )
    run_wrapper(model, wrapper, batches[:3])
    state = roundtrip({"model": model.state_dict(), "wrapper": wrapper.state_dict()})
    assert state["wrapper"]["loss_scaler"]["scale"] == 8.0 and "accumulated_grads" in state["wrapper"]

    resumed_model = make_model(seed=3)
    resumed_model.load_state_dict(state["model"])
    resumed = AmpOptimWrapper(
        optimizer=OPTIMIZERS["adamw"](resumed_model.parameters()), dtype="fp16", accumulative_counts=2
    )
    resumed.load_state_dict(state["wrapper"])
    assert resumed.loss_scaler.get_scale() == 8.0
    run_wrapper(resumed_model, resumed, batches[3:])
    assert_same_model(resumed_model, expected)
    assert_same_tensors(resumed.optimizer.state_dict(), expected_optimizer.state_dict())
    assert resumed.loss_scaler.state_dict() == result["scaler"].state_dict()


def test_bf16_state_has_an_empty_scaler_entry_and_loads_across_precisions():
    model = make_model()
    bf16 = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    state = bf16.state_dict()
    assert state["loss_scaler"] == {}
    fp16 = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype="fp16")
    fp16.load_state_dict(state)
    assert fp16.loss_scaler.get_scale() == 65536.0
    bf16.load_state_dict(fp16.state_dict())


def test_failed_load_leaves_the_scaler_as_it_was():
    model = make_model()
    wrapper = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype="fp16", loss_scale=32.0)
    state = wrapper.state_dict()
    bad = dict(state, loss_scaler={"scale": 2.0})
    optimizer_bad = dict(state, loss_scaler=dict(state["loss_scaler"], scale=2.0), param_groups=[])
    for candidate, error in [(bad, "loss_scaler"), (optimizer_bad, "param group")]:
        with pytest.raises(ValueError, match=error):
            wrapper.load_state_dict(candidate)
        assert wrapper.loss_scaler.get_scale() == 32.0
    with pytest.raises(TypeError, match="loss_scaler"):
        wrapper.load_state_dict(dict(state, loss_scaler=3))
    with pytest.raises(TypeError, match=r"state_dict\['loss_scaler'\]\['scale'\] must be a number, got 'big'"):
        wrapper.load_state_dict(dict(state, loss_scaler=dict(state["loss_scaler"], scale="big"), state={}))
    assert wrapper.loss_scaler.get_scale() == 32.0


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"dtype": "int8"}, ValueError, ["dtype", "'int8'", "bfloat16"]),
        ({"dtype": torch.int32}, ValueError, ["dtype", "torch.int32"]),
        ({"loss_scale": "auto"}, ValueError, ["loss_scale", "'auto'", "dynamic"]),
        ({"loss_scale": 0}, ValueError, ["loss_scale", "0"]),
        ({"loss_scale": float("nan")}, ValueError, ["loss_scale", "nan"]),
        ({"loss_scale": True}, ValueError, ["loss_scale", "True"]),
        ({"loss_scale": {"init": 2.0}}, ValueError, ["loss_scale", "init", "init_scale"]),
        ({"loss_scale": {"growth_factor": 1.0}}, ValueError, ["growth_factor", "1.0"]),
        ({"loss_scale": {"backoff_factor": 1.5}}, ValueError, ["backoff_factor", "1.5"]),
        ({"loss_scale": {"growth_interval": 0}}, ValueError, ["growth_interval", "0"]),
        ({"loss_scale": {"init_scale": "big"}}, TypeError, ["init_scale", "'big'", "number"]),
        ({"loss_scale": {"init_scale": float("inf")}}, ValueError, ["init_scale", "inf"]),
        ({"accumulative_counts": 0}, ValueError, ["accumulative_counts", "0"]),
    ],
)
def test_bad_arguments(kwargs, error, words):
    with pytest.raises(error) as info:
        AmpOptimWrapper(optimizer=torch.optim.SGD(make_model().parameters(), lr=0.1), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_optimizer_passed_positionally_gets_a_clear_error():
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="by keyword"):
        AmpOptimWrapper(optimizer)
    with pytest.raises(TypeError, match="needs optimizer"):
        AmpOptimWrapper()


def test_loss_scale_dict_is_not_mutated():
    loss_scale = {"init_scale": 8.0}
    AmpOptimWrapper(optimizer=torch.optim.SGD(make_model().parameters(), lr=0.1), dtype="fp16", loss_scale=loss_scale)
    assert loss_scale == {"init_scale": 8.0}


@pytest.mark.cuda
def test_cuda_defaults_to_float16_with_a_scaler_and_no_host_sync():
    model = make_model().cuda()
    wrapper = AmpOptimWrapper(optimizer=torch.optim.AdamW(model.parameters(), lr=0.01, fused=True))
    assert wrapper.cast_dtype is FP16 and wrapper.loss_scaler is not None
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(4)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_wrapper(model, wrapper, batches)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert wrapper.applied_steps + wrapper.skipped_steps == 4


def test_a_disabled_scaler_means_no_scaler():
    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype="fp16", loss_scale={"enabled": False}
    )
    assert wrapper.loss_scaler is None
    run_wrapper(model, wrapper, make_batches(2))
    assert wrapper.applied_steps == 2 and wrapper.state_dict()["loss_scaler"] == {}


def test_use_fsdp_builds_a_sharded_scaler():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    assert isinstance(AmpOptimWrapper(optimizer=optimizer, dtype="fp16", use_fsdp=True).loss_scaler, ShardedGradScaler)
    assert AmpOptimWrapper(optimizer=optimizer, dtype="bf16", use_fsdp=True).loss_scaler is None


def test_a_scheduler_on_the_amp_wrapper_moves_per_window_without_warning_on_a_skipped_first_step():
    """torch's scheduler counts the wrapper's step calls: a window whose float16 step was skipped still counts."""
    batches = make_batches(6)
    batches[1] = (torch.full_like(batches[1][0], float("nan")), batches[1][1])  # the first window is skipped
    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        dtype="fp16",
        loss_scale={"init_scale": 256.0},
        accumulative_counts=2,
    )
    assert isinstance(wrapper, torch.optim.Optimizer) and "fp16" in AmpOptimWrapper.valid_dtypes
    scheduler = torch.optim.lr_scheduler.StepLR(wrapper, step_size=1, gamma=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches:
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)
            if wrapper.should_update():
                scheduler.step()
    assert not [w for w in caught if "optimizer.step()" in str(w.message)]
    assert (wrapper.applied_steps, wrapper.skipped_steps) == (2, 1)
    assert wrapper.get_lr() == {"lr": [0.125]}
    assert roundtrip(wrapper.state_dict())["loss_scaler"]["scale"] == 128.0
