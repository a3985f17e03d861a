"""Schedule-free optimizers through the trainer, against the ``schedulefree`` package used by hand as its README says.

By hand: ``optimizer.train()`` before the training steps, ``optimizer.eval()`` before evaluating and before
saving. The trainer does it: train mode for each iteration, eval mode when an epoch or the run ends (before
the handlers attached after it: an evaluation, a checkpoint); the checkpoint handlers save in eval mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Events, create_supervised_evaluator
from ignite.metrics import Loss

from engine_opt import OptimWrapper, OptimWrapperDict, create_trainer
from engine_opt.checkpoint import attach_checkpoint, load_checkpoint
from engine_opt.engine import ResumableLoader

from oracle import assert_same_model, assert_same_tensors, closure_loop, loss_fn, make_batches, make_model

schedulefree = pytest.importorskip("schedulefree")

EPOCHS = 3


def make_optimizer(model):
    return schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01, warmup_steps=2)


def by_hand(batches, validation):
    """The README's loop: train mode for the epoch's steps, eval mode to evaluate; the evaluations' losses."""
    model = make_model()
    optimizer = make_optimizer(model)
    losses = []
    for _ in range(EPOCHS):
        model.train()
        optimizer.train()
        for x, y in batches:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        model.eval()
        optimizer.eval()
        with torch.no_grad():
            losses.append(sum(loss_fn(model(x), y).item() * len(y) for x, y in validation) / 15)
    return model, optimizer, losses


def test_an_ignite_evaluation_sees_the_weights_the_optimizer_means_and_so_does_the_end_of_the_run():
    batches, validation = make_batches(8), make_batches(3, seed=7)
    expected, optimizer, expected_losses = by_hand(batches, validation)
    model = make_model()
    wrapper = OptimWrapper(make_optimizer(model))
    trainer = create_trainer(model, wrapper, loss_fn)
    evaluator = create_supervised_evaluator(model, metrics={"loss": Loss(loss_fn)})
    losses = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: losses.append(evaluator.run(validation).metrics["loss"]))
    trainer.run(batches, max_epochs=EPOCHS)
    assert losses == pytest.approx(expected_losses, rel=1e-6)  # the mean over samples, summed in another order
    assert_same_model(model, expected)  # eval mode at the end of the run: the averaged weights
    assert_same_tensors(wrapper.optimizer.state_dict(), optimizer.state_dict())
    assert wrapper.optimizer.param_groups[0]["train_mode"] is False


def test_a_member_of_a_dict_switches_and_the_wrapper_has_train_and_eval():
    model = make_model()
    sgd = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    sgd.train()  # no modes: nothing happens
    sgd.eval()
    other = make_model(seed=3)
    wrappers = OptimWrapperDict(free=OptimWrapper(make_optimizer(other)))
    wrappers.train()
    assert wrappers["free"].optimizer.param_groups[0]["train_mode"] is True
    wrappers.eval()
    assert wrappers["free"].optimizer.param_groups[0]["train_mode"] is False


def build(batches):
    model = make_model()
    wrapper = OptimWrapper(make_optimizer(model))
    trainer = create_trainer(model, wrapper, loss_fn)
    return {"model": model, "optim_wrapper": wrapper, "trainer": trainer, "data": ResumableLoader(batches)}


@pytest.mark.parametrize("saved_at", [3, 8, 11])  # mid-epoch, an epoch's end, mid-epoch of the second
def test_a_checkpoint_is_saved_in_eval_mode_and_resumes_bitwise(tmp_path, saved_at):
    batches = make_batches(8)
    whole = build(batches)
    attach_checkpoint(whole["trainer"], whole, tmp_path, every=saved_at, n_saved=None)
    whole["trainer"].run(whole["data"], max_epochs=EPOCHS)
    saved = torch.load(tmp_path / f"checkpoint_{saved_at}.pt", weights_only=True)
    assert saved["optim_wrapper"]["param_groups"][0]["train_mode"] is False  # the weights it means
    resumed = build(batches)
    load_checkpoint(resumed, tmp_path / f"checkpoint_{saved_at}.pt")
    # saving as often as the run it resumes: each save's trip to eval mode and back rounds the weights
    attach_checkpoint(resumed["trainer"], resumed, tmp_path / "resumed", every=saved_at, n_saved=None)
    resumed["trainer"].run(resumed["data"], max_epochs=EPOCHS)
    assert_same_model(resumed["model"], whole["model"])
    assert_same_tensors(resumed["optim_wrapper"].state_dict(), whole["optim_wrapper"].state_dict())


def test_a_state_saved_in_train_mode_resumes_bitwise_too():
    batches = make_batches(8)
    whole, saved = build(batches), {}

    def keep(engine):  # by hand, mid-epoch: the optimizer is in train mode here
        if engine.state.iteration == 5:
            saved.update({name: copy.deepcopy(obj.state_dict()) for name, obj in whole.items()})

    whole["trainer"].add_event_handler(Events.ITERATION_COMPLETED, keep)
    whole["trainer"].run(whole["data"], max_epochs=EPOCHS)
    assert saved["optim_wrapper"]["param_groups"][0]["train_mode"] is True
    resumed = build(batches)
    for name, obj in resumed.items():
        obj.load_state_dict(saved[name])
    resumed["trainer"].run(resumed["data"], max_epochs=EPOCHS)
    assert_same_model(resumed["model"], whole["model"])


def test_a_closure_variant_steps_as_by_hand_through_the_trainer():
    """The closure variants move the weights before they evaluate: the closure runs anew, as by hand."""
    batches = make_batches(6)
    expected = make_model()
    optimizer = schedulefree.SGDScheduleFreeClosure(expected.parameters(), lr=0.1)  # no modes: it keeps y itself
    closure_loop(expected, optimizer, batches)
    model = make_model()
    wrapper = OptimWrapper(schedulefree.SGDScheduleFreeClosure(model.parameters(), lr=0.1))
    create_trainer(model, wrapper, loss_fn).run(batches)
    assert_same_model(model, expected)


@pytest.mark.parametrize("how", ["terminate", "raise"])
def test_a_run_that_ends_early_ends_in_eval_mode_too(how):
    model = make_model()
    wrapper = OptimWrapper(make_optimizer(model))
    trainer = create_trainer(model, wrapper, loss_fn)

    def stop(engine):
        if engine.state.iteration == 3:
            if how == "raise":
                raise RuntimeError("a failing handler")
            engine.terminate(skip_completed=True)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)
    if how == "raise":
        with pytest.raises(RuntimeError, match="a failing handler"):
            trainer.run(make_batches(8))
    else:
        trainer.run(make_batches(8))
    assert wrapper.optimizer.param_groups[0]["train_mode"] is False


def test_a_sharded_checkpoint_refuses_a_schedule_free_optimizer_by_name(tmp_path):
    from engine_opt.checkpoint import attach_sharded_checkpoint

    built = build(make_batches(2))
    with pytest.raises(ValueError, match=r"\['optim_wrapper'\] holds a schedule-free optimizer \(AdamWScheduleFree\)"):
        attach_sharded_checkpoint(built["trainer"], built, tmp_path)
