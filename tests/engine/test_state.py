"""The trainer's typed state: OptimState, the counters read from the wrappers, and check_engine_state against Ignite."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ignite.engine import Engine

from engine_opt import OptimEvents, OptimWrapper, create_trainer
from engine_opt.engine.state import check_engine_state, optim_state
from engine_opt.handlers import NonFiniteGuard

from helpers import gan_step, make_amp_gan_wrappers
from oracle import loss_fn, make_batches, make_gan, make_model

counts = st.one_of(st.none(), st.integers(-2, 12), st.just(True), st.just(2.5), st.just("3"))
keys = st.sampled_from(["iteration", "epoch", "epoch_length", "max_epochs", "max_iters"])


@settings(max_examples=300, deadline=None)
@given(state=st.dictionaries(keys, counts, max_size=5))
def test_a_state_the_check_accepts_loads_into_ignites_engine_and_changes_nothing(state):
    """Ignite's own load_state_dict is the oracle: nothing the check passes may fail there (or corrupt it)."""
    engine = Engine(lambda engine, batch: None)
    before = copy.deepcopy(engine.state_dict())
    try:
        check_engine_state(engine, state)
    except ValueError:
        assert engine.state_dict() == before
        return
    engine.load_state_dict(state)
    assert engine.state.iteration >= 0 and engine.state.epoch >= 0


@pytest.mark.parametrize(
    "state",
    [
        {"iteration": 5, "epoch_length": 4, "max_epochs": 3},
        {"epoch": 2, "epoch_length": 4, "max_iters": 20},
        {"iteration": 0, "epoch_length": None, "max_epochs": None},
    ],
)
def test_what_ignite_saves_is_accepted(state):
    """Ignite's own load_state_dict is the oracle: it reads back every value the check accepted; and what Ignite
    saves then is accepted too, and loads back into a fresh engine unchanged."""
    engine = Engine(lambda engine, batch: None)
    check_engine_state(engine, state)
    engine.load_state_dict(state)
    assert {key: getattr(engine.state, key) for key in state} == state
    saved = engine.state_dict()
    resumed = Engine(lambda engine, batch: None)
    check_engine_state(resumed, saved)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == saved


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"iteration": 5, "epoch": 1, "epoch_length": 4, "max_epochs": 3}, "one of 'iteration'/'epoch'"),
        ({"iteration": 5, "max_epochs": 3}, "needs 'epoch_length'"),
        ({"iteration": -1, "epoch_length": 4, "max_epochs": 3}, r"'iteration' must be an int >= 0, got -1"),
        ({"iteration": 9, "epoch_length": 4, "max_epochs": 1}, r"max_epochs = 1, behind its position \(2\)"),
        ({"iteration": 3, "epoch_length": 4, "max_iters": True}, r"'max_iters' must be an int >= 1"),
        ({"iteration": 1, "epoch_length": None, "max_epochs": None}, r"gives 'iteration' 1 without an 'epoch_length'"),
    ],
)
def test_states_ignite_would_refuse_or_misread_are_refused_by_name(state, message):
    with pytest.raises(ValueError, match=message):
        check_engine_state(Engine(lambda engine, batch: None), state)


def test_user_keys_are_required():
    engine = Engine(lambda engine, batch: None)
    engine.state_dict_user_keys.append("alpha")
    with pytest.raises(ValueError, match=r"the user keys \['alpha'\]"):
        check_engine_state(engine, {"iteration": 1, "epoch_length": 4, "max_epochs": 2})


def test_the_counters_are_the_sums_of_the_members_counts_and_include_the_event_being_handled():
    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale=64.0)
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: gan_step(gan, wrappers, x))
    seen = {event: [] for event in OptimEvents}
    for event, attr in [
        (OptimEvents.BACKWARD_COMPLETED, "optim_backwards"),
        (OptimEvents.BEFORE_OPTIM_STEP, "optim_steps"),
        (OptimEvents.OPTIM_STEP_COMPLETED, "optim_updates"),
    ]:
        trainer.add_event_handler(
            event, lambda engine, event=event, attr=attr: seen[event].append(getattr(engine.state, attr))
        )
    state = trainer.run([x for x, _ in make_batches(4)])
    # disc: 4 backwards, 2 windows; gen: 4 backwards, 4 windows; counted in the order they happen
    assert seen[OptimEvents.BACKWARD_COMPLETED] == list(range(1, 9))
    assert seen[OptimEvents.BEFORE_OPTIM_STEP] == list(range(1, 7))
    assert seen[OptimEvents.OPTIM_STEP_COMPLETED] == list(range(1, 7))
    assert (state.optim_backwards, state.optim_steps, state.optim_updates, state.optim_skipped) == (8, 6, 6, 0)
    expected = sum(w.applied_steps for w in wrappers.values()), sum(w.inner_count for w in wrappers.values())
    assert (state.optim_updates, state.optim_backwards) == expected


def test_the_member_is_known_only_while_an_optimizer_event_is_handled():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = create_trainer(model, wrapper, loss_fn)
    with pytest.raises(RuntimeError, match="no optimizer event is being handled"):
        optim_state(trainer).member()
    members = []
    trainer.add_event_handler(OptimEvents.OPTIM_STEP_COMPLETED, lambda e: members.append(optim_state(e).member()))
    trainer.run(make_batches(2))
    assert members == [(None, wrapper), (None, wrapper)]
    assert optim_state(trainer).members == {None: wrapper}


def test_handlers_refuse_an_engine_not_built_by_create_trainer():
    engine = Engine(lambda engine, batch: None)
    with pytest.raises(TypeError, match=r"needs a trainer built by engine_opt\.create_trainer"):
        optim_state(engine)
    with pytest.raises(TypeError, match=r"needs a trainer built by engine_opt\.create_trainer"):
        NonFiniteGuard().attach(engine)
