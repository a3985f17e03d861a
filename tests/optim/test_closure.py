"""Optimizers that re-evaluate the model in their step (LBFGS), through the wrapper, against torch's own loop.

The oracle is torch's documented LBFGS loop, written out in tests/support/oracle.py (``closure_loop``): a
closure that zeroes the gradients, evaluates the model, runs backward and returns the loss, given to
``optimizer.step`` once per batch.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine_opt import AmpOptimWrapper, OptimWrapper

from oracle import assert_same_model, assert_same_tensors, closure_loop, loss_fn, make_batches, make_model

SEARCHES = [None, "strong_wolfe"]


def lbfgs(model, line_search_fn=None):
    return torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=3, line_search_fn=line_search_fn)


def closure_for(wrapper, model, x, y):
    def closure():
        wrapper.optimizer.zero_grad()
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def wrapper_loop(wrapper, model, batches, how="update_params"):
    for x, y in batches:
        closure = closure_for(wrapper, model, x, y)
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        if how == "update_params":  # the loss is the first evaluation: as many as torch's loop
            wrapper.update_params(loss, closure=closure)
        elif how == "step_kwargs":  # MMEngine's way: the closure among the step's arguments
            wrapper.update_params(loss, step_kwargs={"closure": closure})
        else:  # by hand: backward, step, zero_grad
            wrapper.backward(loss)
            wrapper.step(closure=closure)
            wrapper.zero_grad()


@pytest.mark.parametrize("line_search_fn", SEARCHES)
@pytest.mark.parametrize("how", ["update_params", "step_kwargs", "step"])
def test_lbfgs_through_the_wrapper_is_torchs_loop_bitwise(line_search_fn, how):
    batches = make_batches(4)
    expected, model = make_model(), make_model()
    optimizer = lbfgs(expected, line_search_fn)
    closure_loop(expected, optimizer, batches)
    wrapper = OptimWrapper(lbfgs(model, line_search_fn))
    wrapper_loop(wrapper, model, batches, how)
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict()["state"], optimizer.state_dict()["state"])
    assert (wrapper.step_count, wrapper.applied_steps, wrapper.inner_count) == (4, 4, 4)


def test_the_first_evaluation_is_the_given_loss_so_the_model_runs_as_often_as_in_torchs_loop():
    batches, forwards = make_batches(3), []
    for run in ("torch", "wrapper"):
        model, seen = make_model(), []
        model.register_forward_hook(lambda *_, seen=seen: seen.append(None))
        if run == "torch":
            closure_loop(model, lbfgs(model), batches)
        else:
            wrapper_loop(OptimWrapper(lbfgs(model)), model, batches)
        forwards.append(len(seen))
    assert forwards[0] == forwards[1] > len(batches)


@pytest.mark.parametrize("line_search_fn", SEARCHES)
def test_each_evaluations_gradients_are_clipped_as_configured(line_search_fn):
    batches = make_batches(4)
    expected, model = make_model(), make_model()
    optimizer = lbfgs(expected, line_search_fn)
    closure_loop(expected, optimizer, batches, clip=0.05)
    wrapper = OptimWrapper(lbfgs(model, line_search_fn), clip_grad={"max_norm": 0.05})
    wrapper_loop(wrapper, model, batches)
    assert_same_model(model, expected)
    assert wrapper.grad_norm is not None and wrapper.grad_norm > 0.05  # the norm before clipping, as always


def test_bfloat16_autocast_in_the_closure_is_torchs_loop_bitwise():
    batches = make_batches(3)
    expected, model = make_model(), make_model()
    optimizer = lbfgs(expected)
    closure_loop(expected, optimizer, batches, autocast=torch.bfloat16)
    wrapper = AmpOptimWrapper(optimizer=lbfgs(model), dtype="bfloat16")
    wrapper_loop(wrapper, model, batches)
    assert_same_model(model, expected)


def test_a_checkpoint_between_updates_resumes_bitwise():
    batches = make_batches(6)
    expected, model = make_model(), make_model()
    whole = OptimWrapper(lbfgs(expected, "strong_wolfe"))
    wrapper_loop(whole, expected, batches)
    first = OptimWrapper(lbfgs(model, "strong_wolfe"))
    wrapper_loop(first, model, batches[:3])
    saved = copy.deepcopy((model.state_dict(), first.state_dict()))
    resumed_model = make_model(seed=5)
    resumed = OptimWrapper(lbfgs(resumed_model, "strong_wolfe"))
    resumed_model.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    wrapper_loop(resumed, resumed_model, batches[3:])
    assert_same_model(resumed_model, expected)
    assert_same_tensors(resumed.state_dict(), whole.state_dict())


def test_sgd_with_a_closure_steps_once_per_update_like_torch():
    batches = make_batches(3)
    expected, model = make_model(), make_model()
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.9)
    closure_loop(expected, optimizer, batches)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert not wrapper.needs_closure and OptimWrapper(lbfgs(make_model())).needs_closure
    wrapper_loop(wrapper, model, batches, how="step")
    assert_same_model(model, expected)


def refused(wrapper, model, **kwargs):
    x, y = make_batches(1)[0]
    return lambda: wrapper.update_params(loss_fn(model(x), y), **kwargs)


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"),
    [
        (lambda m: OptimWrapper(lbfgs(m)), {}, TypeError, r"LBFGS re-evaluates the model during its step: pass"),
        (lambda m: OptimWrapper(lbfgs(m)), {"closure": 3}, TypeError, r"closure must be callable .* got 3"),
        (
            lambda m: OptimWrapper(torch.optim.SGD(m.parameters(), lr=0.1), accumulative_counts=2),
            {"closure": lambda: None},
            ValueError,
            r"accumulative_counts=2 sums several; use accumulative_counts=1",
        ),
        (
            lambda m: OptimWrapper(lbfgs(m)),
            {"closure": lambda: None, "num_items": 5},
            ValueError,
            r"num_items weights the micro-steps",
        ),
        (
            lambda m: AmpOptimWrapper(optimizer=torch.optim.SGD(m.parameters(), lr=0.1), dtype="float16"),
            {"closure": lambda: None},
            ValueError,
            r"a float16 loss scale cannot go through a step that re-evaluates the model.*bfloat16",
        ),
    ],
)
def test_what_a_reevaluating_step_cannot_honour_is_refused_before_anything_changes(make, kwargs, error, message):
    model = make_model()
    wrapper = make(model)
    before = copy.deepcopy((model.state_dict(), wrapper.state_dict()))
    with pytest.raises(error, match=message):
        refused(wrapper, model, **kwargs)()
    assert_same_tensors((model.state_dict(), wrapper.state_dict()), before)
    assert all(param.grad is None for param in model.parameters())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: OptimWrapper(lbfgs(m), accumulative_counts=2), r"accumulative_counts=2 sums several"),
        (lambda m: AmpOptimWrapper(optimizer=lbfgs(m), dtype="float16"), r"a float16 loss scale cannot go"),
    ],
)
def test_an_lbfgs_wrapper_that_could_never_step_is_refused_when_it_is_made(make, message):
    with pytest.raises(ValueError, match=message):
        make(make_model())


def test_closure_none_is_no_closure_and_a_window_with_num_items_takes_none():
    model = make_model()
    x, y = make_batches(1)[0]
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    wrapper.update_params(loss_fn(model(x), y), step_kwargs={"closure": None})  # torch's default, passed on
    wrapper.backward(loss_fn(model(x), y) * len(y), num_items=len(y))
    with pytest.raises(ValueError, match=r"num_items weights the micro-steps"):
        wrapper.step(closure=closure_for(wrapper, model, x, y))
    assert wrapper.step_count == 1


def test_a_cancelled_step_takes_back_the_history_lbfgs_keeps_under_a_frozen_first_parameter():
    """LBFGS keeps its state under its first parameter; frozen, it has no gradient, and its state is still put
    back when a guard cancels the step on the device."""
    from engine_opt import StepEvent

    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    param = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 3))
    wrapper = OptimWrapper(torch.optim.LBFGS([frozen, param], lr=0.5, max_iter=3))

    def loss():
        return ((param - 1) ** 2).sum() + (param**4).sum()

    def closure():
        wrapper.optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    wrapper.update_params(loss(), closure=closure)
    before = copy.deepcopy(wrapper.optimizer.state_dict())
    wrapper.register_step_hook(
        lambda w, event, _: w.cancel_step(when=torch.tensor(True)), [StepEvent.BEFORE_OPTIM_STEP]
    )
    wrapper.update_params(loss(), closure=closure)
    assert_same_tensors(wrapper.optimizer.state_dict(), before)
    assert wrapper.skipped_steps == 1
