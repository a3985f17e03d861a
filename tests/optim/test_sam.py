"""Sharpness-aware minimisation (SAM, adaptive SAM) through the wrapper, against the published two-pass loop.

The oracle is SAM's algorithm written out by hand: the batch's gradient, each weight moved by
``rho * T(w)^2 g / ||T(w) g||`` (``T(w) = |w|`` for adaptive SAM, else 1), the gradient at the moved weights,
the weights put back, then the optimizer's step (after clipping, where clipping is configured).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from engine_opt import AmpOptimWrapper, OptimWrapper, StepEvent, build_optim_wrapper, create_trainer
from engine_opt.optim.sam import SharpnessAware, check_unsharded

from oracle import (
    OPTIMIZERS,
    assert_same_model,
    assert_same_tensors,
    item_loss_sum,
    loss_fn,
    make_batches,
    make_model,
    sam_perturb,
)
from oracle import sam_loop as published_sam_loop

RHO = {False: 0.05, True: 0.5}


def sam_loop(model, optimizer, batches, adaptive, clip=None, autocast=None):
    return published_sam_loop(model, optimizer, batches, RHO[adaptive], adaptive, clip, autocast)


def returning_loss(wrapper, model, x, y):
    """The second pass as the wrapper prefers it: the loss, whose backward the wrapper runs."""

    def closure():
        with wrapper.optim_context(model):
            return loss_fn(model(x), y)

    return closure


def torch_style(wrapper, model, x, y):
    """The second pass as torch's closures are written: zero the gradients, evaluate, backward, return."""

    def closure():
        wrapper.optimizer.zero_grad()
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def wrapper_loop(wrapper, model, batches, how="update_params", closure_for=returning_loss):
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        closure = closure_for(wrapper, model, x, y)
        if how == "update_params":
            wrapper.update_params(loss, closure=closure)
        elif how == "step_kwargs":
            wrapper.update_params(loss, step_kwargs={"closure": closure})
        else:
            wrapper.backward(loss)
            wrapper.step(closure=closure)
            wrapper.zero_grad()


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("kind", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_sam_through_the_wrapper_is_the_published_two_pass_loop_bitwise(adaptive, kind, clip):
    batches = make_batches(4)
    expected, model = make_model(), make_model()
    optimizer = OPTIMIZERS[kind](expected.parameters())
    norms = sam_loop(expected, optimizer, batches, adaptive, clip)
    clip_grad = None if clip is None else {"max_norm": clip}
    wrapper = OptimWrapper(
        OPTIMIZERS[kind](model.parameters()), clip_grad=clip_grad, sam={"rho": RHO[adaptive], "adaptive": adaptive}
    )
    wrapper_loop(wrapper, model, batches)
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict()["state"], optimizer.state_dict()["state"])
    assert (wrapper.step_count, wrapper.applied_steps, wrapper.inner_count) == (4, 4, 4)
    if clip is not None:  # the norm of the gradients the step used: the second pass's
        assert_same_tensors(wrapper.grad_norm, norms[-1])


@pytest.mark.parametrize("how", ["update_params", "step_kwargs", "step"])
@pytest.mark.parametrize("closure_for", [returning_loss, torch_style])
def test_every_way_of_giving_the_second_pass_gives_the_same_update(how, closure_for):
    batches = make_batches(3)
    expected, model = make_model(), make_model()
    sam_loop(expected, OPTIMIZERS["sgd_momentum"](expected.parameters()), batches, adaptive=False)
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()), sam={"rho": RHO[False]})
    wrapper_loop(wrapper, model, batches, how, closure_for)
    assert_same_model(model, expected)


def sam_item_loop(model, batches):
    """SAM with summed losses written out, the gradients it steps with divided by the batch's count."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches:
        item_loss_sum(model(x), y).backward()
        old = sam_perturb(list(model.parameters()), RHO[False], adaptive=False)
        optimizer.zero_grad()
        item_loss_sum(model(x), y).backward()
        for param, weight in old.items():
            param.data = weight
            param.grad.div_(len(x))
        optimizer.step()
        optimizer.zero_grad()


def test_num_items_divides_the_second_pass_gradients_by_the_batchs_count():
    batches = make_batches(3)
    expected, model = make_model(), make_model()
    sam_item_loop(expected, batches)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), sam={"rho": RHO[False]})
    for x, y in batches:
        wrapper.update_params(
            item_loss_sum(model(x), y), num_items=len(x), closure=lambda x=x, y=y: item_loss_sum(model(x), y)
        )
    assert_same_model(model, expected)


def test_config_and_trainer_run_sam_as_the_published_loop():
    batches = make_batches(4)
    expected, model = make_model(), make_model()
    sam_loop(expected, torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.9), batches, adaptive=True)
    cfg = {"optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9}, "sam": {"rho": RHO[True], "adaptive": True}}
    wrapper = build_optim_wrapper(model, cfg)
    assert wrapper.sam == SharpnessAware(rho=RHO[True], adaptive=True)
    assert "sam" in cfg and cfg["sam"] == {"rho": RHO[True], "adaptive": True}  # the caller's config untouched
    create_trainer(model, wrapper, loss_fn).run(batches)
    assert_same_model(model, expected)
    assert "sam=SharpnessAware(rho=0.5, adaptive=True)" in repr(wrapper)


def test_bfloat16_autocast_in_both_passes_is_the_loop_under_autocast_bitwise():
    batches = make_batches(3)
    expected, model = make_model(), make_model()
    sam_loop(expected, OPTIMIZERS["adamw"](expected.parameters()), batches, False, autocast=torch.bfloat16)
    wrapper = AmpOptimWrapper(optimizer=OPTIMIZERS["adamw"](model.parameters()), dtype="bf16", sam={"rho": 0.05})
    create_trainer(model, wrapper, loss_fn).run(batches)
    assert_same_model(model, expected)


class TwoWeights(torch.nn.Module):
    """``a`` feeds both passes' losses; ``b`` only the first pass's, where it can be made to overflow."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = torch.nn.Parameter(torch.tensor([3.0]))


def fp16_wrapper(model, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return AmpOptimWrapper(optimizer=optimizer, dtype="fp16", loss_scale={"init_scale": 1024.0}, sam={"rho": 0.05})


@pytest.mark.parametrize("overflow", ["first", "second"])
def test_a_float16_overflow_in_either_pass_skips_one_update_and_lowers_the_scale_once(overflow):
    model = TwoWeights()
    wrapper = fp16_wrapper(model)
    before = copy.deepcopy(model.state_dict())
    first = (model.a.sum() + model.b.sum() * (torch.inf if overflow == "first" else 1.0)) * 1.0

    def closure():  # the second pass does not see b: only a carried first-pass overflow can skip the update
        return model.a.sum() * (torch.inf if overflow == "second" else 1.0)

    wrapper.update_params(first, closure=closure)
    assert (wrapper.skipped_steps, wrapper.applied_steps) == (1, 0)
    assert wrapper.loss_scaler.get_scale() == 512.0  # backed off once
    assert_same_model(model, two_weights_from(before))  # put back exactly, nothing stepped
    assert wrapper.optimizer.state_dict()["state"] == {}
    wrapper.update_params(model.a.sum() + model.b.sum(), closure=lambda: model.a.sum())
    assert (wrapper.skipped_steps, wrapper.applied_steps) == (1, 1)
    assert wrapper.loss_scaler.get_scale() == 512.0


def two_weights_from(state):
    """A model holding ``state``, to compare with."""
    model = TwoWeights()
    model.load_state_dict(state)
    return model


def test_float16_with_a_closure_that_runs_its_own_backward_is_refused_and_loses_nothing():
    model = TwoWeights()
    wrapper = fp16_wrapper(model)
    before = copy.deepcopy(model.state_dict())

    def closure():
        loss = model.a.sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="return the loss without calling backward"):
        wrapper.update_params(model.a.sum() + model.b.sum(), closure=closure)
    assert_same_model(model, two_weights_from(before))
    assert all(param.grad is None for param in model.parameters())
    wrapper.update_params(model.a.sum() + model.b.sum(), closure=lambda: model.a.sum())  # the scaler goes on
    assert wrapper.applied_steps == 1


def test_a_closure_that_fails_leaves_the_weights_as_they_were_and_the_next_update_clean():
    batches = make_batches(2)
    model, expected = make_model(), make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), sam={"rho": 0.05})
    x, y = batches[0]

    def failing():
        raise RuntimeError("out of memory in the second pass")

    with pytest.raises(RuntimeError, match="second pass"):
        wrapper.update_params(loss_fn(model(x), y), closure=failing)
    assert_same_model(model, expected)
    assert all(param.grad is None for param in model.parameters())
    sam_loop(expected, torch.optim.SGD(expected.parameters(), lr=0.1), batches[1:], adaptive=False)
    wrapper_loop(wrapper, model, batches[1:])
    assert_same_model(model, expected)


def test_a_checkpoint_between_updates_resumes_bitwise():
    batches = make_batches(6)
    expected, model = make_model(), make_model()
    sam_loop(expected, OPTIMIZERS["adamw"](expected.parameters()), batches, adaptive=False)
    wrapper = OptimWrapper(OPTIMIZERS["adamw"](model.parameters()), sam={"rho": 0.05})
    wrapper_loop(wrapper, model, batches[:3])
    state, weights = copy.deepcopy(wrapper.state_dict()), copy.deepcopy(model.state_dict())
    resumed = make_model(seed=5)
    resumed.load_state_dict(weights)
    again = OptimWrapper(OPTIMIZERS["adamw"](resumed.parameters()), sam={"rho": 0.05})
    again.load_state_dict(state)
    wrapper_loop(again, resumed, batches[3:])
    assert_same_model(resumed, expected)


def sgd(model=None):
    return torch.optim.SGD((model or make_model()).parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sam": {"rho": -1.0}}, ValueError, r"sam\['rho'\] must be a positive finite number, got -1.0"),
        ({"sam": {"rho": float("nan")}}, ValueError, r"sam\['rho'\] must be a positive finite number, got nan"),
        ({"sam": {"rho": True}}, TypeError, r"sam\['rho'\] must be a positive finite number, got True"),
        ({"sam": {"rho": "0.05"}}, TypeError, r"sam\['rho'\] must be a positive finite number, got '0.05'"),
        ({"sam": {"radius": 0.05}}, ValueError, r"sam got unknown key\(s\) \['radius'\]"),
        ({"sam": {"adaptive": "yes"}}, TypeError, r"sam\['adaptive'\]"),
        ({"sam": 0.05}, TypeError, r"sam must be None or a dict .* got 0.05 of type float"),
        ({"sam": {}, "accumulative_counts": 2}, ValueError, "accumulative_counts=2 would need every micro-batch"),
    ],
)
def test_bad_sam_settings_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        OptimWrapper(sgd(), **kwargs)


@pytest.mark.parametrize(
    ("settings", "error"), [({"rho": float("nan")}, ValueError), ({"rho": -1}, ValueError), ({"rho": "x"}, TypeError)]
)
def test_settings_made_as_an_object_are_checked_as_a_configs_are(settings, error):
    with pytest.raises(error, match=r"sam\['rho'\] must be a positive finite number"):
        OptimWrapper(sgd(), sam=SharpnessAware(**settings))
    with pytest.raises(TypeError, match=r"sam\['adaptive'\]"):
        SharpnessAware(adaptive="yes")


def test_the_wrapper_cannot_be_driven_from_inside_the_second_pass():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), sam={})
    x, y = make_batches(1)[0]

    def reentrant():
        wrapper.update_params(loss_fn(model(x), y), closure=lambda: loss_fn(model(x), y))
        return loss_fn(model(x), y)

    with pytest.raises(RuntimeError, match="called inside SAM's second pass"):
        wrapper.update_params(loss_fn(model(x), y), closure=reentrant)
    assert wrapper.step_count == 0 and wrapper.optimizer.state_dict()["state"] == {}
    assert_same_model(model, make_model())


def test_float16_gradients_unscaled_before_the_step_are_refused():
    model = TwoWeights()
    wrapper = fp16_wrapper(model)
    wrapper.register_step_hook(lambda w, event, loss: w.unscale_grads(), [StepEvent.BACKWARD_COMPLETED])
    with pytest.raises(RuntimeError, match=r"unscale_grads\(\) before a SAM update's step"):
        wrapper.update_params(model.a.sum() + model.b.sum(), closure=lambda: model.a.sum())


def test_num_items_through_the_trainer_divides_by_the_batchs_count():
    batches = make_batches(3)
    expected, model = make_model(), make_model()
    sam_item_loop(expected, batches)
    trained = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), sam={"rho": RHO[False]})
    create_trainer(model, trained, item_loss_sum, num_items=lambda x, y: len(x)).run(batches)
    assert_same_model(model, expected)


def test_sam_around_an_optimizer_that_takes_its_own_closure_is_refused():
    with pytest.raises(ValueError, match="LBFGS takes its own closure"):
        OptimWrapper(torch.optim.LBFGS(make_model().parameters()), sam={})


def test_an_update_without_the_second_pass_is_refused_before_anything_runs():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), sam={})
    x, y = make_batches(1)[0]
    with pytest.raises(TypeError, match="pass that second pass as update_params"):
        wrapper.update_params(loss_fn(model(x), y))
    assert wrapper.inner_count == 0 and all(param.grad is None for param in model.parameters())


def test_a_second_pass_returning_no_loss_is_refused():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), sam={})
    x, y = make_batches(1)[0]
    with pytest.raises(TypeError, match=r"the closure \(the second pass\) must return its loss tensor, got 1.0 of"):
        wrapper.update_params(loss_fn(model(x), y), closure=lambda: 1.0)
    assert_same_model(model, make_model())


def test_sharded_parameters_are_refused_by_name():
    with pytest.raises(ValueError, match=r"sharded \(FSDP2\)"):
        check_unsharded([SimpleNamespace(full_tensor=lambda: None)])
