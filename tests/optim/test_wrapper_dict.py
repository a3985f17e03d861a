"""OptimWrapperDict: a GAN's two optimizers against two plain optimizers, state, mapping behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine_opt import OptimWrapper, OptimWrapperDict

from helpers import train_some
from oracle import assert_same_model, assert_same_tensors, gan_losses, make_batches, make_gan


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


# ---------------------------------------------------------------------- optim_context(model, member=...)


def isolated_gan_oracle(gan, batches, disc_accumulate=2):
    """From the maths: each network steps on the gradient of its own loss with respect to its own parameters.

    The discriminator's window gradient is the sum over its micro-steps of d(disc_loss)/d(disc params) divided
    by ``disc_accumulate``; the generator's is d(gen_loss)/d(gen params). Every gradient comes from
    ``torch.autograd.grad`` on one loss and one network's parameters, so no pass can touch another's.
    """
    gen_params, disc_params = list(gan["gen"].parameters()), list(gan["disc"].parameters())
    gen_opt = torch.optim.Adam(gen_params, lr=0.01, betas=(0.5, 0.9))
    disc_opt = torch.optim.SGD(disc_params, lr=0.05, momentum=0.9)
    window = []
    for idx, x in enumerate(batches):
        disc_loss = (gan["disc"](gan["gen"](x).detach()) - gan["disc"](x)).mean()
        window.append(torch.autograd.grad(disc_loss, disc_params))
        if (idx + 1) % disc_accumulate == 0:
            for param, *grads in zip(disc_params, *window, strict=True):
                total = grads[0] / disc_accumulate
                for grad in grads[1:]:
                    total = total + grad / disc_accumulate
                param.grad = total
            disc_opt.step()
            disc_opt.zero_grad()
            window = []
        gen_loss = -gan["disc"](gan["gen"](x)).mean()
        for param, grad in zip(gen_params, torch.autograd.grad(gen_loss, gen_params), strict=True):
            param.grad = grad
        gen_opt.step()
        gen_opt.zero_grad()


def train_gan_by_member(gan, wrappers, batches, isolate):
    """The discriminator's micro-step, then the generator's update; ``isolate``: through the dict's context."""
    for x in batches:
        context = wrappers.optim_context if isolate else lambda model, member: wrappers[member].optim_context(model)
        with context(gan["disc"], member="disc"):
            _, disc_loss = gan_losses(gan, x)
        wrappers["disc"].update_params(disc_loss)
        with context(gan["gen"], member="gen"):
            gen_loss = -gan["disc"](gan["gen"](x)).mean()
        wrappers["gen"].update_params(gen_loss)


@pytest.mark.parametrize("isolate", [True, False], ids=["member_context", "member_own_context_only"])
def test_member_context_keeps_the_generator_out_of_the_discriminator_window(isolate):
    batches = [x for x, _ in make_batches(6)]
    reference = make_gan()
    isolated_gan_oracle(reference, batches)
    gan = make_gan()
    wrappers = make_wrappers(gan)
    train_gan_by_member(gan, wrappers, batches, isolate)
    assert wrappers["disc"].applied_steps == 3 and wrappers["gen"].applied_steps == 6
    if isolate:
        assert_same_model(gan, reference)
        assert all(param.requires_grad for param in gan.parameters())
    else:  # the control: the generator's backward leaks into the discriminator's window and changes its updates
        assert not torch.equal(gan["disc"].weight, reference["disc"].weight)


def test_member_context_applies_the_member_own_context():
    from engine_opt import AmpOptimWrapper

    gan = make_gan()
    wrappers = OptimWrapperDict(
        gen=AmpOptimWrapper(optimizer=torch.optim.SGD(gan["gen"].parameters(), lr=0.1), dtype="bfloat16"),
        disc=OptimWrapper(torch.optim.SGD(gan["disc"].parameters(), lr=0.1)),
    )
    with wrappers.optim_context(gan["gen"], member="gen"):
        assert torch.is_autocast_enabled("cpu")
        assert not any(p.requires_grad for p in gan["disc"].parameters())
        assert all(p.requires_grad for p in gan["gen"].parameters())
    with wrappers.optim_context(gan["disc"], member="disc"):
        assert not torch.is_autocast_enabled("cpu")
        assert not any(p.requires_grad for p in gan["gen"].parameters())
    assert all(p.requires_grad for p in gan.parameters())


def test_member_context_restores_flags_after_an_exception_and_keeps_user_frozen_parameters_frozen():
    gan = make_gan()
    wrappers = make_wrappers(gan)
    gan["disc"].bias.requires_grad_(False)  # frozen by the user, still in the discriminator's optimizer
    gan["gen"].bias.requires_grad_(False)
    with pytest.raises(ZeroDivisionError), wrappers.optim_context(gan["gen"], member="gen"):
        assert not gan["disc"].weight.requires_grad and not gan["gen"].bias.requires_grad
        raise ZeroDivisionError
    assert gan["disc"].weight.requires_grad and gan["gen"].weight.requires_grad
    assert not gan["disc"].bias.requires_grad and not gan["gen"].bias.requires_grad
    with wrappers.optim_context(gan["disc"], member="disc"):  # usable again after the exception
        assert not gan["gen"].weight.requires_grad and not gan["disc"].bias.requires_grad
    assert [p.requires_grad for p in gan.parameters()] == [True, False, True, False]


def test_member_context_names_the_members_of_an_unknown_name():
    wrappers = make_wrappers(make_gan())
    with pytest.raises(KeyError, match=r"member='dis'.*members: \['gen', 'disc'\]"):
        wrappers.optim_context(nn.Linear(1, 1), member="dis")
    with pytest.raises(NotImplementedError, match="member=NAME"):
        wrappers.optim_context(nn.Linear(1, 1))


@pytest.mark.parametrize("inner", ["gen", "disc"])
def test_member_context_refuses_nesting_and_restores_the_outer_flags(inner):
    gan = make_gan()
    wrappers = make_wrappers(gan)
    with wrappers.optim_context(gan["gen"], member="gen"):
        nested = wrappers.optim_context(gan["disc"], member=inner)
        with pytest.raises(RuntimeError, match=rf"member='{inner}'.*inside.*member='gen'"), nested:
            pass
        assert not any(p.requires_grad for p in gan["disc"].parameters())  # the outer context still holds
        assert all(p.requires_grad for p in gan["gen"].parameters())
    assert all(p.requires_grad for p in gan.parameters())


@pytest.mark.slow
def test_member_context_under_ddp_and_fsdp2(tmp_path):
    """2 gloo processes (tests/support/dist_gan_worker.py): each rank's result is the one-process oracle's."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from dist_gan_worker import GLOBAL_BATCH, ITERATIONS

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    worker = root / "tests" / "support" / "dist_gan_worker.py"
    result = subprocess.run(
        [sys.executable, str(worker), str(tmp_path)],
        env={**env, "MASTER_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    reference = make_gan()
    isolated_gan_oracle(reference, [x for x, _ in make_batches(ITERATIONS, batch_size=GLOBAL_BATCH)])
    expected = [param.detach() for param in reference.parameters()]
    for key in ("per_network", "whole_model", "fsdp2"):
        assert_same_tensors(ranks[1][key]["params"], ranks[0][key]["params"], key)  # the ranks agree bitwise
        for actual, wanted in zip(ranks[0][key]["params"], expected, strict=True):
            torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6)  # rounding: halves vs whole
    for rank in ranks:
        assert rank["per_network"]["disc_calls"] == rank["fsdp2"]["disc_calls"] == 2  # no_sync mid-window held
        assert rank["per_network"]["disc_steps"] == 2
        assert rank["whole_model"]["error"] == ""
        # one DDP over both networks needs find_unused_parameters=True: the frozen network's parameters are unused
        assert "find_unused_parameters=True" in rank["whole_model_control"]["error"]
