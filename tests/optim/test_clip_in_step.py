"""Clipping (and float16 unscaling) folded into a fused step, against torch's unfolded loop written out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine_opt import AmpOptimWrapper, OptimWrapper, StepEvent
from engine_opt.optim.clip_in_step import ClipInStep
from engine_opt.optim.clipping import GradClipper

from oracle import assert_same_model, assert_same_tensors, loss_fn, make_batches, make_model

FP16 = torch.float16
EPS = torch.finfo(torch.float32).eps
FUSED = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4, fused=True),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, fused=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=True),
}


def unfolded_loop(model, optimizer, batches, max_norm, scaler=None):
    """torch's clipped update written out: (unscale,) norm and clip, step (the scaler's), zero; norms and skips."""
    norms, skipped = [], []
    for x, y in batches:
        with torch.autocast("cpu", dtype=FP16, enabled=scaler is not None):
            loss = loss_fn(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        if scaler is None:
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped.append(scaler.get_scale() < scale)
        optimizer.zero_grad()
    return norms, skipped


def folded_loop(model, wrapper, batches):
    norms, skipped = [], []
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)
        norms.append(wrapper.grad_norm.clone())
        skipped.append(wrapper.step_was_skipped)
    return norms, skipped


def assert_within(actual: nn.Module, expected: nn.Module, ulps: float) -> None:
    """Each parameter within ``ulps`` float32 units of the largest weight of its tensor."""
    for (name, a), b in zip(actual.named_parameters(), expected.parameters(), strict=True):
        worst = ((a - b).abs().max() / (EPS * b.abs().max())).item()
        assert worst <= ulps, f"{name}: {worst:.2f} ulps"


@pytest.mark.parametrize("name", sorted(FUSED))
@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # cutting every step; never cutting
def test_float32_folded_clipping_against_torchs_loop(name, max_norm):
    """Never cutting: bitwise. Cutting: the first norm bitwise, then within 8 ulps (the weights moved apart)."""
    batches = make_batches(8)
    expected = make_model()
    expected_norms, _ = unfolded_loop(expected, FUSED[name](expected.parameters()), batches, max_norm)
    model = make_model()
    clip = {"max_norm": max_norm, "fold_into_step": True}
    norms, skipped = folded_loop(model, OptimWrapper(FUSED[name](model.parameters()), clip_grad=clip), batches)
    assert not any(skipped)
    if max_norm > max(norms):
        assert_same_tensors(norms, expected_norms)
        assert_same_model(model, expected)
    else:
        assert min(norms) > max_norm
        assert_same_tensors(norms[0], expected_norms[0])
        assert max(abs(a / b - 1).item() for a, b in zip(norms, expected_norms, strict=True)) <= 8 * EPS
        assert_within(model, expected, ulps=8)


@pytest.mark.parametrize("name", sorted(FUSED))
def test_one_cutting_step_gives_each_gradient_within_one_ulp_of_torchs_clipped_one(name):
    """``g / fl(1/c)`` against ``fl(g * c)``: at most 1 ulp apart (measured; 2 ulps is the rounding bound)."""
    x, y = make_batches(1)[0]
    expected, model = make_model(), make_model()
    loss_fn(expected(x), y).backward()
    loss_fn(model(x), y).backward()
    norm = nn.utils.clip_grad_norm_(expected.parameters(), 0.05)
    wrapper = OptimWrapper(FUSED[name](model.parameters()), clip_grad={"max_norm": 0.05, "fold_into_step": True})
    wrapper.step()  # the fused kernel writes the divided gradients back
    assert_same_tensors(wrapper.grad_norm, norm)
    for a, b in zip(model.parameters(), expected.parameters(), strict=True):
        ulps = ((a.grad - b.grad).abs() / (EPS * b.grad.abs()).clamp_min(torch.finfo(torch.float32).tiny)).max()
        assert ulps <= 1.0


@pytest.mark.parametrize("hook", [False, True])
def test_float16_folds_unscaling_too_and_skips_and_backs_off_as_torch(hook):
    """A scale that overflows at first: the same steps skipped and scales, norms bitwise, weights within 8 ulps."""
    batches = [(x, y * 100) for x, y in make_batches(8, batch_size=64)]
    expected = make_model()
    scaler = torch.amp.GradScaler("cpu")
    expected_norms, expected_skipped = unfolded_loop(
        expected, FUSED["adamw"](expected.parameters()), batches, 0.5, scaler
    )
    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=FUSED["adamw"](model.parameters()), dtype="fp16", clip_grad={"max_norm": 0.5, "fold_into_step": True}
    )
    seen = []
    if hook:  # a hook that reads the gradients: they are unscaled before it, and the step folds the clipping only
        wrapper.register_step_hook(lambda wrapper, event, loss: seen.append(event), [StepEvent.BEFORE_OPTIM_STEP])
    norms, skipped = folded_loop(model, wrapper, batches)
    assert skipped == expected_skipped and 0 < sum(skipped) < 8
    assert wrapper.skipped_steps == sum(expected_skipped)
    assert wrapper.loss_scaler.get_scale() == scaler.get_scale()
    applied = [index for index, skip in enumerate(skipped) if not skip]
    assert_same_tensors([norms[i] for i in applied], [expected_norms[i] for i in applied])
    assert_within(model, expected, ulps=8)
    assert len(seen) == 8 * hook


def test_the_fold_reads_nothing_on_the_host(monkeypatch):
    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=FUSED["adamw"](model.parameters()),
        dtype="fp16",
        loss_scale={"init_scale": 1024.0},
        clip_grad={"max_norm": 0.5, "fold_into_step": True},
    )
    folded_loop(model, wrapper, make_batches(1))  # the scaler's first iteration

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor read on the host")

    for name in ("item", "__bool__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for x, y in make_batches(3):
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)
    monkeypatch.undo()
    assert wrapper.applied_steps == 4


def test_the_optimizer_keeps_no_grad_scale_after_a_step_or_a_failed_one():
    model = make_model()
    optimizer = FUSED["adamw"](model.parameters())
    wrapper = OptimWrapper(optimizer, clip_grad={"max_norm": 0.5, "fold_into_step": True})
    wrapper.register_step_hook(lambda wrapper, event, loss: None, [StepEvent.OPTIM_STEP_COMPLETED])
    x, y = make_batches(1)[0]
    wrapper.update_params(loss_fn(model(x), y))
    assert not hasattr(optimizer, "grad_scale")
    loss_fn(model(x), y).backward()
    with pytest.raises(TypeError):
        wrapper.step(unknown=1)  # the optimizer's step raises
    assert not hasattr(optimizer, "grad_scale")


@pytest.mark.parametrize(
    ("optimizer", "clip_grad", "error", "words"),
    [
        (
            lambda ps: torch.optim.AdamW(ps),
            {"max_norm": 1.0, "fold_into_step": True},
            ValueError,
            ["AdamW", "build it with fused=True"],
        ),
        (
            lambda ps: torch.optim.RMSprop(ps),
            {"max_norm": 1.0, "fold_into_step": True},
            ValueError,
            ["RMSprop", "it has no fused step: drop fold_into_step"],
        ),
        (FUSED["adamw"], {"type": "value", "clip_value": 1.0, "fold_into_step": True}, ValueError, ["by value"]),
        (FUSED["adamw"], {"max_norm": 1.0, "fold_into_step": 1}, TypeError, ["clip_grad['fold_into_step']", "1"]),
    ],
)
def test_refusals_name_the_argument(optimizer, clip_grad, error, words):
    with pytest.raises(error) as caught:
        OptimWrapper(optimizer(make_model().parameters()), clip_grad=clip_grad)
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_a_state_dict_that_turns_fused_off_is_refused_at_the_step():
    model = make_model()
    optimizer = FUSED["adamw"](model.parameters())
    folded = ClipInStep(GradClipper.parse({"max_norm": 1.0, "fold_into_step": True}), optimizer)
    optimizer.param_groups[0]["fused"] = None
    with pytest.raises(RuntimeError, match="fused"):
        folded.prepare(optimizer, list(model.parameters()), None)


def test_a_step_given_a_closure_clips_once_as_unfolded():
    """The closure's evaluations are clipped in place; a fold on top would clip the gradients twice."""
    x = torch.ones(3, 4)

    def updated(fold):
        model = make_model()
        clip = {"max_norm": 0.1, **({"fold_into_step": True} if fold else {})}
        wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1.0, fused=True), clip_grad=clip)

        def closure():
            wrapper.optimizer.zero_grad()
            loss = model(x).sum()
            loss.backward()
            return loss

        wrapper.update_params(model(x).sum(), closure=closure)
        return model

    assert_same_model(updated(fold=True), updated(fold=False))


def test_a_replaced_optimizer_is_folded_into_or_refused_at_the_step():
    x, max_norm = torch.ones(3, 4), 0.1
    model = make_model()
    clip = {"max_norm": max_norm, "fold_into_step": True}
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1.0, fused=True), clip_grad=clip)
    wrapper.optimizer = torch.optim.SGD(model.parameters(), lr=1.0, fused=True)
    before = [param.detach().clone() for param in model.parameters()]
    wrapper.update_params(model(x).sum())
    moved = torch.cat([(param.detach() - old).flatten() for param, old in zip(model.parameters(), before, strict=True)])
    assert moved.norm() == pytest.approx(max_norm, rel=1e-5)  # lr 1: the update is the clipped gradient
    wrapper.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(RuntimeError, match=r"fold_into_step.*SGD does not divide the gradients in its step"):
        wrapper.update_params(model(x).sum())
