"""OptimWrapperDict: a GAN's two optimizers against two plain optimizers, state, mapping behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from engine_opt import OptimWrapper, OptimWrapperDict

from helpers import make_amp_gan_wrappers, train_some
from oracle import assert_same_model, assert_same_tensors, gan_losses, make_batches, make_gan, plain_gan_loop


def make_wrappers(gan):
    return OptimWrapperDict(
        gen=OptimWrapper(torch.optim.Adam(gan["gen"].parameters(), lr=0.01, betas=(0.5, 0.9))),
        disc=OptimWrapper(torch.optim.SGD(gan["disc"].parameters(), lr=0.05, momentum=0.9), accumulative_counts=2),
    )


def test_gan_training_matches_two_plain_optimizers():
    batches = [x for x, _ in make_batches(4)]
    reference = make_gan()
    gen_opt = torch.optim.Adam(reference["gen"].parameters(), lr=0.01, betas=(0.5, 0.9))
    disc_opt = torch.optim.SGD(reference["disc"].parameters(), lr=0.05, momentum=0.9)
    for idx, x in enumerate(batches):
        _, disc_loss = gan_losses(reference, x)
        (disc_loss / 2).backward()
        if (idx + 1) % 2 == 0:
            disc_opt.step()
            disc_opt.zero_grad()
        gen_loss = -reference["disc"](reference["gen"](x)).mean()
        gen_opt.zero_grad()
        gen_loss.backward()
        gen_opt.step()
        gen_opt.zero_grad()

    gan = make_gan()
    wrappers = make_wrappers(gan)
    for x in batches:
        with wrappers["disc"].optim_context(gan["disc"]):
            _, disc_loss = gan_losses(gan, x)
        wrappers["disc"].update_params(disc_loss)
        with wrappers["gen"].optim_context(gan["gen"]):
            gen_loss = -gan["disc"](gan["gen"](x)).mean()
        wrappers["gen"].zero_grad()
        wrappers["gen"].update_params(gen_loss)
    # the generator's loss also leaves grads in the discriminator, as in the plain loop
    assert_same_model(gan, reference)


def test_tutorial_lr_and_momentum():
    gen, disc = nn.Linear(1, 1), nn.Linear(1, 1)
    wrappers = OptimWrapperDict(
        gen=OptimWrapper(optimizer=torch.optim.SGD(gen.parameters(), lr=0.01)),
        disc=OptimWrapper(optimizer=torch.optim.SGD(disc.parameters(), lr=0.01)),
    )
    assert wrappers.get_lr() == {"gen.lr": [0.01], "disc.lr": [0.01]}
    assert wrappers.get_momentum() == {"gen.momentum": [0], "disc.momentum": [0]}
    assert list(wrappers.get_lr()) == ["gen.lr", "disc.lr"]


def test_several_param_groups_keep_the_base_lr_with_a_prefix():
    gan = make_gan()
    wrappers = OptimWrapperDict(
        gen=OptimWrapper(
            torch.optim.SGD([{"params": [gan["gen"].weight], "lr": 0.5}, {"params": [gan["gen"].bias]}], lr=0.1)
        )
    )
    assert wrappers.get_lr() == {"gen.base_lr": [0.1], "gen.lr": [0.5, 0.1]}


def test_behaves_like_a_read_only_mapping():
    wrappers = make_wrappers(make_gan())
    assert list(wrappers) == ["gen", "disc"] and len(wrappers) == 2
    assert "gen" in wrappers and "other" not in wrappers
    assert list(wrappers.keys()) == ["gen", "disc"]
    assert [w.accumulative_counts for w in wrappers.values()] == [1, 2]
    assert dict(wrappers.items()) == {"gen": wrappers["gen"], "disc": wrappers["disc"]}
    with pytest.raises(KeyError, match=r"'dis'.*known names.*'gen', 'disc'"):
        wrappers["dis"]
    assert "gen: OptimWrapper(" in repr(wrappers)


@pytest.mark.parametrize("method", ["update_params", "backward", "step", "optim_context"])
def test_update_methods_name_the_members(method):
    wrappers = make_wrappers(make_gan())
    with pytest.raises(NotImplementedError, match=rf"optim_wrapper\['gen'\]\.{method}"):
        getattr(wrappers, method)(torch.zeros(()))


def test_zero_grad_passes_keyword_arguments_to_every_member():
    gan = make_gan()
    wrappers = make_wrappers(gan)
    x = make_batches(1)[0][0]
    gan["disc"](gan["gen"](x)).sum().backward()
    wrappers.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in gan.parameters())
    wrappers.zero_grad()
    assert all(p.grad is None for p in gan.parameters())


def test_initialize_count_status_reaches_every_member():
    gan = make_gan()
    wrappers = make_wrappers(gan)
    wrappers.initialize_count_status(gan, 3, 9)
    assert [(w.inner_count, w.max_counts) for w in wrappers.values()] == [(3, 9), (3, 9)]


def test_state_round_trip_and_mismatches_load_nothing():
    gan = make_gan()
    wrappers = make_wrappers(gan)
    train_some(gan, wrappers, [x for x, _ in make_batches(3)])
    state = wrappers.state_dict()
    assert set(state) == {"gen", "disc"} and "accumulated_grads" in state["disc"]

    other_gan = make_gan(seed=1)
    other = make_wrappers(other_gan)
    before = copy.deepcopy(other.state_dict())
    broken_member = {"gen": state["gen"], "disc": dict(state["disc"], param_groups=[])}
    for bad, pattern in [
        ({"gen": state["gen"]}, r"missing \['disc'\]"),
        ({**state, "critic": state["disc"]}, r"unexpected \['critic'\]"),
        (broken_member, r"state_dict\['disc'\].*param group"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            other.load_state_dict(bad)
        assert_same_tensors(other.state_dict(), before)  # 'gen' was valid and still not loaded
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        other.load_state_dict([state])
    other.load_state_dict(state)
    assert_same_tensors(other.state_dict(), state)


def test_checkpoints_as_one_object_through_ignite(tmp_path):
    batches = [x for x, _ in make_batches(6)]
    expected = make_gan()
    gen_opt, disc_opt, scaler = plain_gan_loop(expected, batches)

    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale={"init_scale": 64.0, "growth_interval": 1})
    train_some(gan, wrappers, batches[:3])
    trainer = Engine(lambda engine, batch: None)
    checkpoint = Checkpoint({"model": gan, "optim_wrapper": wrappers}, DiskSaver(str(tmp_path), require_empty=False))
    trainer.state.iteration = 3
    checkpoint(trainer)

    resumed_gan = make_gan(seed=7)
    resumed = make_amp_gan_wrappers(resumed_gan)
    Checkpoint.load_objects({"model": resumed_gan, "optim_wrapper": resumed}, tmp_path / checkpoint.last_checkpoint)
    assert resumed["gen"].loss_scaler.get_scale() == 64.0 * 2**3  # three applied steps, growth_interval 1
    train_some(resumed_gan, resumed, batches[3:])
    assert_same_model(resumed_gan, expected)
    assert_same_tensors(resumed["gen"].optimizer.state_dict(), gen_opt.state_dict())
    assert_same_tensors(resumed["disc"].optimizer.state_dict(), disc_opt.state_dict())
    assert resumed["gen"].loss_scaler.state_dict() == scaler.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({}, ValueError, "at least one"),
        ({"gen": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)}, TypeError, "'gen' must be an OptimWrapper"),
        ({"gen": "sgd"}, TypeError, "'gen' must be an OptimWrapper.*'sgd'"),
    ],
)
def test_bad_members(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        OptimWrapperDict(**kwargs)


def test_a_dict_is_not_a_member():
    wrappers = make_wrappers(make_gan())
    with pytest.raises(TypeError, match="'inner' must be an OptimWrapper"):
        OptimWrapperDict(inner=wrappers)


def test_param_groups_are_the_members_live_lists_by_name_as_in_mmengine():
    gan = make_gan()
    wrappers = make_wrappers(gan)
    groups = wrappers.param_groups
    assert list(groups) == ["gen", "disc"]
    assert groups["gen"] is wrappers["gen"].optimizer.param_groups
    assert groups["disc"] is wrappers["disc"].optimizer.param_groups
    assert not isinstance(wrappers, torch.optim.Optimizer)  # a dict of groups: schedule one member instead
    mmengine_optim = pytest.importorskip("mmengine.optim")
    theirs = mmengine_optim.OptimWrapperDict(
        gen=mmengine_optim.OptimWrapper(torch.optim.SGD(make_gan()["gen"].parameters(), lr=0.1))
    )
    assert list(theirs.param_groups) == ["gen"] and isinstance(theirs.param_groups["gen"], list)


@pytest.mark.parametrize("method", ["should_update", "should_sync", "scale_loss"])
def test_window_questions_name_the_members(method):
    wrappers = make_wrappers(make_gan())
    args = (torch.ones(()),) if method == "scale_loss" else ()
    with pytest.raises(NotImplementedError, match=rf"optim_wrapper\['gen'\]\.{method}"):
        getattr(wrappers, method)(*args)


def test_every_mmengine_name_that_works_there_exists_here():
    """MMEngine's OptimWrapperDict inherits OptimWrapper; the names left out raise AttributeError there."""
    mmengine_optim = pytest.importorskip("mmengine.optim")
    theirs = mmengine_optim.OptimWrapperDict(
        gen=mmengine_optim.OptimWrapper(torch.optim.SGD(make_gan()["gen"].parameters(), lr=0.1))
    )
    ours = make_wrappers(make_gan())
    missing = {name for name in dir(theirs) if not name.startswith("_") and not hasattr(ours, name)}
    assert missing == {"defaults", "inner_count"}
    for name in missing:
        with pytest.raises(AttributeError):
            getattr(theirs, name)
