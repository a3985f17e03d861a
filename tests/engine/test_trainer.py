"""create_trainer: the Ignite trainer against the plain loop, bitwise; GAN and MMEngine models; bad arguments."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from engine_opt import AmpOptimWrapper, OptimEvents, OptimWrapper, create_trainer

from helpers import gan_step, make_amp_gan_wrappers
from oracle import (
    OPTIMIZERS,
    Plan,
    assert_same_model,
    assert_same_tensors,
    closure_loop,
    loss_fn,
    make_batches,
    make_gan,
    make_model,
    plain_gan_loop,
    plain_loop,
)

PLANS = {
    "fp32": (Plan(), {}),
    "accumulate3_short_last_window": (Plan(accumulate=3), {"accumulative_counts": 3}),
    "clip_norm": (Plan(clip_norm=0.5), {"clip_grad": {"max_norm": 0.5}}),
    "bf16_accumulate2": (Plan(accumulate=2, amp_dtype=torch.bfloat16), {"accumulative_counts": 2, "dtype": "bf16"}),
    "fp16_dynamic": (
        Plan(amp_dtype=torch.float16, scaler_kwargs={"init_scale": 2.0**14, "growth_interval": 3}),
        {"dtype": "fp16", "loss_scale": {"init_scale": 2.0**14, "growth_interval": 3}},
    ),
    "fp16_accumulate2_clip": (
        Plan(accumulate=2, clip_norm=1.0, amp_dtype=torch.float16, scaler_kwargs={"init_scale": 256.0}),
        {
            "accumulative_counts": 2,
            "clip_grad": {"max_norm": 1.0},
            "dtype": "fp16",
            "loss_scale": {"init_scale": 256.0},
        },
    ),
}


def build_wrapper(model, optimizer_name, kwargs):
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    if "dtype" in kwargs:
        return AmpOptimWrapper(optimizer=optimizer, **kwargs)
    return OptimWrapper(optimizer, **kwargs)


@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adamw", "adamw_fused"])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_trainer_matches_the_plain_loop_over_two_epochs(plan_name, optimizer_name):
    plan, kwargs = PLANS[plan_name]
    batches = make_batches(7)
    expected = make_model()
    expected_optimizer = OPTIMIZERS[optimizer_name](expected.parameters())
    plain = plain_loop(expected, expected_optimizer, batches * 2, plan)  # windows run across the epoch boundary

    model = make_model()
    wrapper = build_wrapper(model, optimizer_name, kwargs)
    trainer = create_trainer(model, wrapper, loss_fn)
    state = trainer.run(batches, max_epochs=2)  # no initialize_count_status: the trainer sets the run length

    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict(), expected_optimizer.state_dict())
    if plain["scaler"] is not None:
        assert wrapper.loss_scaler.state_dict() == plain["scaler"].state_dict()
    assert state.optim_backwards == 14
    windows = -(-14 // plan.accumulate)
    skipped = plain["skipped"]
    assert (state.optim_steps, state.optim_updates, state.optim_skipped) == (windows, windows - skipped, skipped)
    assert isinstance(state.output, torch.Tensor) and not state.output.requires_grad  # no .item() per iteration


def test_gan_train_step_updates_each_member_like_two_plain_optimizers():
    batches = [x for x, _ in make_batches(6)]
    expected = make_gan()
    gen_opt, disc_opt, scaler = plain_gan_loop(expected, batches)

    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale={"init_scale": 64.0, "growth_interval": 1})
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: gan_step(gan, wrappers, x))
    state = trainer.run(batches)

    assert_same_model(gan, expected)
    assert_same_tensors(wrappers["gen"].optimizer.state_dict(), gen_opt.state_dict())
    assert_same_tensors(wrappers["disc"].optimizer.state_dict(), disc_opt.state_dict())
    assert wrappers["gen"].loss_scaler.state_dict() == scaler.state_dict()
    assert set(state.output) == {"disc_loss", "gen_loss"}
    growths = int(torch.log2(torch.tensor(scaler.get_scale() / 64.0)))  # growth_interval 1: x2 applied, /2 skipped
    gen_skipped = (6 - growths) // 2
    assert (state.optim_backwards, state.optim_skipped, state.optim_updates) == (12, gen_skipped, 9 - gen_skipped)
    assert wrappers["gen"].skipped_steps == gen_skipped


class MMEngineStyleModel(nn.Module):
    """A model that runs its own update, as MMEngine's BaseModel.train_step does."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def train_step(self, data, optim_wrapper):
        x, y = data
        with optim_wrapper.optim_context(self):
            loss = loss_fn(self.net(x), y)
        optim_wrapper.update_params(loss)
        return {"loss": loss.detach()}


def test_a_model_with_train_step_is_used_as_is():
    batches = make_batches(5)
    expected = make_model()
    expected_optimizer = OPTIMIZERS["adam"](expected.parameters())
    plain_loop(expected, expected_optimizer, batches, Plan(accumulate=2))

    model = MMEngineStyleModel()
    wrapper = OptimWrapper(OPTIMIZERS["adam"](model.parameters()), accumulative_counts=2)
    state = create_trainer(model, wrapper).run(batches)
    assert_same_model(model.net, expected)
    assert set(state.output) == {"loss"}


def test_the_run_length_is_set_on_resume():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=4)
    trainer = create_trainer(model, wrapper, loss_fn)
    trainer.load_state_dict({"iteration": 5, "epoch_length": 3, "max_epochs": 2})
    seen = []
    trainer.add_event_handler(Events.STARTED, lambda engine: seen.append((wrapper.inner_count, wrapper.max_counts)))
    trainer.run(make_batches(3), max_epochs=3)
    assert seen == [(5, 9)]


def test_a_plain_engine_event_handler_still_sees_ignite_events():
    model = make_model()
    trainer = create_trainer(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)), loss_fn)
    assert isinstance(trainer, Engine)
    iterations = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: iterations.append(engine.state.iteration))
    trainer.run(make_batches(2), max_epochs=2)
    assert iterations == [1, 2, 3, 4]


def sgd_wrapper(model):
    """An OptimWrapper around a plain SGD (lr 0.1) over the model's parameters."""
    return OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (
            lambda m: create_trainer("model", sgd_wrapper(m), loss_fn),
            TypeError,
            "model must be a torch.nn.Module, got 'model'",
        ),
        (
            lambda m: create_trainer(m, torch.optim.SGD(m.parameters(), lr=0.1), loss_fn),
            TypeError,
            r"(?s)optim_wrapper must be an OptimWrapper or an OptimWrapperDict, got SGD.*OptimWrapper\(SGD",
        ),
        (lambda m: create_trainer(m, sgd_wrapper(m)), ValueError, "needs loss_fn, or train_step.*Sequential has none"),
        (lambda m: create_trainer(m, sgd_wrapper(m), loss_fn, train_step=lambda e, b: None), ValueError, "not both"),
        (
            lambda m: create_trainer(
                m, sgd_wrapper(m), train_step=lambda e, b: None, model_fn=lambda model, x: model(x)
            ),
            ValueError,
            "model_fn is for the default process function, which train_step replaces, and would be ignored",
        ),
        (
            lambda m: create_trainer(
                m, sgd_wrapper(m), train_step=lambda e, b: None, device="cpu", prepare_batch=tuple
            ),
            ValueError,
            "^device, prepare_batch are for",
        ),
        (
            lambda m: create_trainer(
                MMEngineStyleModel(), sgd_wrapper(m), output_transform=lambda x, y, y_pred, loss: loss
            ),
            ValueError,
            "output_transform is for the default process function, which MMEngineStyleModel.train_step replaces",
        ),
        (
            lambda m: create_trainer(m, sgd_wrapper(m), "mse"),
            TypeError,
            r"loss_fn must be callable as loss_fn\(y_pred, y\)",
        ),
        (
            lambda m: create_trainer(m, sgd_wrapper(m), lambda y_pred: y_pred),
            TypeError,
            "loss_fn must accept 2 positional",
        ),
        (
            lambda m: create_trainer(m, sgd_wrapper(m), train_step=lambda batch: None),
            TypeError,
            r"train_step\(engine, batch\)",
        ),
        (
            lambda m: create_trainer(m, sgd_wrapper(m), loss_fn, output_transform=lambda loss: loss),
            TypeError,
            "output_transform must accept 4",
        ),
    ],
)
def test_bad_arguments(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(make_model())


def test_a_wrapper_dict_needs_a_train_step():
    gan = make_gan()
    with pytest.raises(ValueError, match=r"OptimWrapperDict \(members \['gen', 'disc'\]\) needs train_step"):
        create_trainer(gan, make_amp_gan_wrappers(gan), loss_fn)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_trainer_with_its_schedule_handler_never_waits_for_the_gpu(dtype):
    """torch raises on any host-device synchronisation while the trainer runs (after a warm-up run)."""
    from engine_opt.handlers import SchedulerHandler

    model = make_model().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    kwargs = {"accumulative_counts": 2, "clip_grad": {"max_norm": 1.0}}
    wrapper = (
        OptimWrapper(optimizer, **kwargs)
        if dtype == "fp32"
        else AmpOptimWrapper(optimizer=optimizer, dtype=dtype, **kwargs)
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    SchedulerHandler(torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)).attach(trainer)
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(8)]
    trainer.run(batches[:2])  # lazy CUDA initialisation may synchronise once
    before = wrapper.applied_steps
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.run(batches)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert wrapper.applied_steps - before == 4


def test_the_trainer_and_its_wrapper_form_no_reference_cycle():
    """Freed as soon as the last reference goes (a DDP model must not outlive its process group)."""

    def build():
        model = make_model()
        wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
        trainer = create_trainer(model, wrapper, loss_fn)
        trainer.run(make_batches(2))
        return weakref.ref(model), weakref.ref(wrapper), weakref.ref(trainer)

    build()  # first calls fill lazy caches
    gc.disable()
    try:
        refs = build()
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        gc.enable()


@pytest.fixture
def fired(monkeypatch):
    """The optimizer events the trainers fire, in order."""
    import engine_opt.engine.trainer as trainer_module

    events = []
    real_fire = trainer_module.fire_registered
    monkeypatch.setattr(
        trainer_module, "fire_registered", lambda engine, event: (events.append(event), real_fire(engine, event))
    )
    return events


def test_an_optimizer_event_is_fired_only_while_a_handler_listens(fired):
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    trainer = create_trainer(model, wrapper, loss_fn)
    assert isinstance(trainer, Engine)
    trainer.run(make_batches(4))
    assert fired == []  # nothing listens: no event, no hook on the wrapper
    updates = []
    handle = trainer.add_event_handler(
        OptimEvents.OPTIM_STEP_COMPLETED(every=1), lambda e: updates.append(e.state.optim_updates)
    )
    trainer.run(make_batches(4), max_epochs=2)
    assert fired == [OptimEvents.OPTIM_STEP_COMPLETED] * 2 and updates == [3, 4]
    handle.remove()
    trainer.run(make_batches(4), max_epochs=3)
    assert len(fired) == 2 and trainer.state.optim_updates == 6


@pytest.mark.cuda
def test_a_float16_trainer_nobody_listens_to_never_waits_for_the_gpu():
    model = make_model().cuda()
    wrapper = AmpOptimWrapper(
        optimizer=torch.optim.AdamW(model.parameters(), lr=0.01, fused=True), dtype="fp16", accumulative_counts=2
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(8)]
    trainer.run(batches[:2])  # lazy CUDA initialisation may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.run(batches)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert wrapper.applied_steps + wrapper.skipped_steps == 5


def test_a_complete_run_loaded_from_a_checkpoint_is_not_trained_again_but_can_be_extended():
    batches = make_batches(4)
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = create_trainer(model, wrapper, loss_fn)
    trainer.run(batches, max_epochs=2)
    saved = {
        "model": copy.deepcopy(model.state_dict()),
        "wrapper": wrapper.state_dict(),
        "trainer": trainer.state_dict(),
    }

    def resumed():
        fresh = make_model(seed=9)
        fresh.load_state_dict(saved["model"])
        fresh_wrapper = OptimWrapper(torch.optim.SGD(fresh.parameters(), lr=0.1))
        fresh_wrapper.load_state_dict(saved["wrapper"])
        fresh_trainer = create_trainer(fresh, fresh_wrapper, loss_fn)
        fresh_trainer.load_state_dict(saved["trainer"])
        return fresh, fresh_trainer

    again, again_trainer = resumed()
    state = again_trainer.run(batches, max_epochs=2)  # Ignite alone would start over from iteration 0
    assert (state.iteration, state.epoch) == (8, 2)
    assert_same_model(again, model)
    further, further_trainer = resumed()
    assert further_trainer.run(batches, max_epochs=3).iteration == 12
    trainer.run(batches, max_epochs=3)
    assert_same_model(further, model)


def test_a_wrapper_shared_by_two_trainers_fires_only_the_running_ones_events():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    first, second = create_trainer(model, wrapper, loss_fn), create_trainer(model, wrapper, loss_fn)
    seen = {"first": [], "second": []}
    first.add_event_handler(OptimEvents.OPTIM_STEP_COMPLETED, lambda e: seen["first"].append(e.state.optim_updates))
    second.add_event_handler(OptimEvents.OPTIM_STEP_COMPLETED, lambda e: seen["second"].append(e.state.optim_updates))
    first.run(make_batches(2))
    second.run(make_batches(3))
    for x, y in make_batches(2):  # by hand, outside any run
        wrapper.update_params(loss_fn(model(x), y))
    assert seen == {"first": [1, 2], "second": [3, 4, 5]}


def test_a_handler_added_twice_and_removed_once_is_gone_as_ignite_removes_every_copy(fired):
    model = make_model()
    trainer = create_trainer(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)), loss_fn)

    def handler(engine):
        pass

    trainer.add_event_handler(OptimEvents.BEFORE_OPTIM_STEP, handler)
    trainer.add_event_handler(OptimEvents.BEFORE_OPTIM_STEP(every=2), handler)
    trainer.remove_event_handler(handler, OptimEvents.BEFORE_OPTIM_STEP)
    assert not trainer.has_event_handler(handler)
    trainer.run(make_batches(3))
    assert fired == []


def test_after_a_run_that_raised_a_resumed_run_trains():
    batches = make_batches(3)
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = create_trainer(model, wrapper, loss_fn)
    saved = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=3),  # an epoch's end: a plain loader resumes there exactly
        lambda e: saved.update(
            model=copy.deepcopy(model.state_dict()), wrapper=wrapper.state_dict(), trainer=e.state_dict()
        ),
    )
    failures = [OSError("disk full")]

    def fail_once():
        if failures:
            raise failures.pop()

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=4), fail_once)
    with pytest.raises(OSError):
        trainer.run(batches, max_epochs=2)
    model.load_state_dict(saved["model"])
    wrapper.load_state_dict(saved["wrapper"])
    trainer.load_state_dict(saved["trainer"])
    state = trainer.run(batches, max_epochs=2)  # Ignite alone would return None here and train nothing
    assert (state.iteration, wrapper.applied_steps) == (6, 6)
    expected = make_model()
    plain_loop(expected, torch.optim.SGD(expected.parameters(), lr=0.1), batches * 2, Plan())
    assert_same_model(model, expected)


def test_call_at_run_end_runs_however_the_run_ends_and_only_during_a_run():
    model = make_model()
    trainer = create_trainer(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)), loss_fn)
    ended = []
    trainer.add_event_handler(Events.STARTED, lambda e: e.call_at_run_end(lambda: ended.append(e.state.iteration)))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError):
        trainer.run(make_batches(3))
    assert ended == [2]
    with pytest.raises(RuntimeError, match="no run is"):
        trainer.call_at_run_end(print)


def test_num_items_trainer_steps_on_the_mean_over_each_windows_items():
    """create_trainer(..., num_items=...): a summed loss_fn and each batch's item count, nothing in the model."""
    from oracle import item_loss_sum, make_item_batches, plain_item_windows

    batches = make_item_batches([3, 5, 1, 7, 2])  # windows of 8 and 8 items, then a short one of 2
    expected = make_model()
    windows = [batches[0:2], batches[2:4], batches[4:5]]
    plain_item_windows(expected, OPTIMIZERS["adamw"](expected.parameters()), windows, Plan(clip_norm=0.5))
    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS["adamw"](model.parameters()), accumulative_counts=2, clip_grad={"max_norm": 0.5})
    trainer = create_trainer(model, wrapper, item_loss_sum, num_items=lambda x, y: torch.tensor(len(x)))
    state = trainer.run(batches)
    assert state.optim_updates == 3
    for actual, wanted in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6)  # float32 rounding: summed in another order


def test_num_items_trainer_option_is_checked():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"num_items must be callable as num_items\(x, y\)"):
        create_trainer(model, wrapper, nn.functional.mse_loss, num_items=4)
    with pytest.raises(TypeError, match="num_items must accept 2 positional argument"):
        create_trainer(model, wrapper, nn.functional.mse_loss, num_items=lambda batch: 4)
    with pytest.raises(ValueError, match="num_items is for the default process function"):
        create_trainer(model, wrapper, train_step=lambda engine, batch: None, num_items=lambda x, y: 4)


def test_a_wrapper_of_another_models_parameters_is_refused_at_construction():
    model, other = make_model(), make_model(seed=1)
    wrapper = OptimWrapper(torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"updates none of the model's parameters \(6 in its param groups, 6 in Seq"):
        create_trainer(model, wrapper, loss_fn)
    head_only = OptimWrapper(torch.optim.SGD(model[3].parameters(), lr=0.1))  # some of them (a frozen body): fine
    before = [param.clone() for param in model[3].parameters()]
    create_trainer(model, head_only, loss_fn).run(make_batches(1))
    assert not any(torch.equal(now, then) for now, then in zip(model[3].parameters(), before, strict=True))
    gan = make_gan()  # a dict's members, each over a part of the model
    create_trainer(gan, make_amp_gan_wrappers(gan), train_step=lambda engine, batch: None)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_trains_through_the_default_step_like_torchs_loop(line_search_fn):
    """The default step gives LBFGS torch's closure for the batch: the run is torch's documented loop."""
    batches = make_batches(6)

    def make_lbfgs(model):
        return torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, line_search_fn=line_search_fn)

    expected = make_model()
    optimizer = make_lbfgs(expected)
    closure_loop(expected, optimizer, batches)
    model = make_model()
    wrapper = OptimWrapper(make_lbfgs(model))
    updates = []
    trainer = create_trainer(model, wrapper, loss_fn)
    trainer.add_event_handler(OptimEvents.OPTIM_STEP_COMPLETED, lambda engine: updates.append(None))
    trainer.run(batches)
    assert_same_model(model, expected)
    assert len(updates) == wrapper.applied_steps == len(batches)
    with pytest.raises(ValueError, match=r"num_items weights the micro-steps .* LBFGS re-evaluates one batch"):
        create_trainer(model, wrapper, loss_fn, num_items=lambda x, y: len(y))
