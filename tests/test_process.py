"""The process functions: the supervised step, prepare_batch, and errors that say which batch failed."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from engine_opt import OptimWrapper, create_trainer
from engine_opt.engine.process import check_callable, prepare_batch, supervised_step

from oracle import loss_fn, make_batches, make_model


def test_prepare_batch_splits_and_moves_a_pair():
    x, y = prepare_batch([torch.ones(2, 3, dtype=torch.float64), torch.zeros(2)], "cpu", False)
    assert (x.dtype, x.shape, y.shape) == (torch.float64, (2, 3), (2,))


def test_a_torch_error_in_the_step_carries_a_note_naming_the_batch():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    step = supervised_step(model, wrapper, loss_fn, prepare_batch, None, False, lambda x, y, y_pred, loss: loss)
    engine = Engine(step)
    with pytest.raises(RuntimeError) as caught:
        engine.run([(torch.ones(2, 3), torch.ones(2, 2))])
    assert caught.value.__notes__ == [
        "engine_opt: iteration 1 failed on x = float32 tensor (2, 3) on cpu, y = float32 tensor (2, 2) on cpu"
    ]
    assert wrapper.inner_count == 0  # nothing was counted


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3, r"loss_fn must be callable as loss_fn\(y_pred, y\), got 3"),
        (lambda y_pred: y_pred, r"loss_fn must accept 2 positional argument\(s\), as loss_fn\(y_pred, y\)"),
    ],
)
def test_callables_are_checked_for_their_arity(value, message):
    with pytest.raises(TypeError, match=message):
        check_callable("loss_fn", value, 2, "loss_fn(y_pred, y)")
    check_callable("loss_fn", lambda *args: None, 2, "loss_fn(y_pred, y)")
    check_callable("loss_fn", max, 2, "loss_fn(y_pred, y)")  # no signature: trusted


def test_custom_prepare_batch_output_transform_and_train_mode():
    batches = [{"x": x, "y": y} for x, y in make_batches(3)]
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = create_trainer(
        model,
        wrapper,
        loss_fn,
        device="cpu",
        prepare_batch=lambda batch, device, non_blocking: (batch["x"].to(device), batch["y"].to(device)),
        output_transform=lambda x, y, y_pred, loss: {"loss": loss.detach(), "y_pred": y_pred.detach()},
    )
    modes = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: modes.append(model.training))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: model.eval())  # as an evaluator would
    state = trainer.run(batches)
    assert modes == [True, True, True]
    assert state.output["y_pred"].shape == (5, 2)


def test_the_default_prepare_batch_names_the_layout_it_expects():
    model = make_model()
    trainer = create_trainer(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)), loss_fn)
    with pytest.raises(ValueError, match=r"(?s)batches of \(x, y\).*prepare_batch=\.\.\."):
        trainer.run([torch.ones(2, 4)])


def test_an_error_of_an_optimizer_event_handler_is_not_blamed_on_the_batch():
    from engine_opt import OptimEvents

    model = make_model()
    trainer = create_trainer(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)), loss_fn)

    def broken_logger(engine):
        raise ValueError("the logger's own error")

    trainer.add_event_handler(OptimEvents.OPTIM_STEP_COMPLETED, broken_logger)
    with pytest.raises(ValueError, match="the logger's own error") as caught:
        trainer.run(make_batches(1))
    assert getattr(caught.value, "__notes__", []) == []
