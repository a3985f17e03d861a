"""The process functions: the supervised step, prepare_batch, and errors that say which batch failed."""

from __future__ import annotations

import collections

import pytest
import torch
from ignite.engine import Engine, Events, create_supervised_trainer

from engine_opt import OptimWrapper, create_trainer
from engine_opt.engine.process import SupervisedStep, check_callable, prepare_batch, supervised_step

from oracle import assert_same_model, loss_fn, make_batches, make_model


def test_prepare_batch_splits_and_moves_a_pair():
    x, y = prepare_batch([torch.ones(2, 3, dtype=torch.float64), torch.zeros(2)], "cpu", False)
    assert (x.dtype, x.shape, y.shape) == (torch.float64, (2, 3), (2,))


def test_a_torch_error_in_the_step_carries_a_note_naming_the_batch():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    step = supervised_step(model, wrapper, SupervisedStep(loss_fn, prepare_batch))
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
        trainer.run([torch.ones(3, 4)])  # a tensor splits into (x, y) only along a first dimension of 2


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


BATCH_KINDS = {
    "tuple": lambda x, y: (x, y),
    "list": lambda x, y: [x, y],
    "tensor of two": lambda x, y: torch.stack([x, y]),  # Ignite unpacks along the first dimension
    "namedtuple": lambda x, y: Pair(x, y),
}
Pair = collections.namedtuple("Pair", ["x", "y"])


@pytest.mark.parametrize("kind", list(BATCH_KINDS))
def test_the_default_prepare_batch_takes_what_ignites_trainer_takes(kind):
    generator = torch.Generator().manual_seed(0)
    batches = [
        BATCH_KINDS[kind](torch.randn(4, 4, generator=generator), torch.randn(4, 4, generator=generator))
        for _ in range(3)
    ]

    def square_model():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 4)

    expected = square_model()
    ignite_trainer = create_supervised_trainer(expected, torch.optim.SGD(expected.parameters(), lr=0.1), loss_fn)
    ignite_trainer.run(batches)
    model = square_model()
    create_trainer(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)), loss_fn).run(batches)
    assert_same_model(model, expected)


@pytest.mark.parametrize("keys", [("x", "y"), ("input", "target")])
def test_a_dict_batch_is_split_by_its_documented_keys(keys):
    x, y = torch.ones(2, 3), torch.zeros(2)
    assert prepare_batch(dict(zip(keys, (x, y), strict=True))) == (x, y)
    with pytest.raises(
        ValueError, match=r"by its keys 'x' and 'y' \(or 'input' and 'target'\), got keys \['image', 'label'\]"
    ):
        prepare_batch({"image": x, "label": y})
    with pytest.raises(ValueError, match=r"expects batches of \(x, y\), got 'xy'"):
        prepare_batch("xy")


def test_model_fn_and_model_transform_mean_what_they_mean_in_ignite():
    batches = make_batches(3)

    def run(make_trainer):
        model = make_model()
        trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
        trainer.run(batches)
        return model

    def model_fn(model, x):
        return {"out": model(x * 2)}

    def model_transform(output):
        return output["out"] - 1

    expected = run(
        lambda model, opt: create_supervised_trainer(
            model, opt, loss_fn, model_fn=model_fn, model_transform=model_transform
        )
    )
    actual = run(
        lambda model, opt: create_trainer(
            model, OptimWrapper(opt), loss_fn, model_fn=model_fn, model_transform=model_transform
        )
    )
    assert_same_model(actual, expected)
    with pytest.raises(TypeError, match=r"model_fn must accept 2 positional argument"):
        create_trainer(
            make_model(), OptimWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1)), loss_fn, model_fn=len
        )
