"""engine_opt.checkpoint.sharded_files in one process: what goes where, loads of every object or none."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from ignite.engine import Engine

from engine_opt import AmpOptimWrapper, OptimWrapper, OptimWrapperDict, create_trainer
from engine_opt.checkpoint.manifest import MANIFEST_FILE
from engine_opt.checkpoint.sharded_files import (
    OBJECTS_FILE,
    ShardedLayout,
    load_sharded_checkpoint,
    publish,
    save_sharded,
)

from oracle import OPTIMIZERS, assert_same_tensors, loss_fn, make_batches, make_gan, make_model

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def trained(seed=0, steps=3, accumulate=1):
    model = make_model(seed)
    wrapper = AmpOptimWrapper(
        optimizer=OPTIMIZERS["adamw"](model.parameters()),
        dtype=torch.float16,
        accumulative_counts=accumulate,
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    trainer.run(make_batches(steps), max_epochs=1)
    return {"model": model, "optim_wrapper": wrapper, "trainer": trainer}


def state_of(objects):
    return {
        "model": {key: value.clone() for key, value in objects["model"].state_dict().items()},
        "wrapper": objects["optim_wrapper"].state_dict(),
        "iteration": objects["trainer"].state.iteration,
    }


def test_a_sharded_checkpoint_loads_every_object_as_it_was_saved(tmp_path):
    saved = trained()
    save_sharded(ShardedLayout.of(saved), tmp_path / "checkpoint_3")
    fresh = trained(seed=1, steps=1)
    load_sharded_checkpoint(fresh, tmp_path / "checkpoint_3")
    assert_same_tensors(state_of(fresh), state_of(saved))
    assert fresh["optim_wrapper"].state_dict()["loss_scaler"]["scale"] == saved["optim_wrapper"].loss_scaler.get_scale()


def test_the_objects_file_holds_no_per_parameter_optimizer_state(tmp_path):
    saved = trained()
    save_sharded(ShardedLayout.of(saved), tmp_path)
    objects = torch.load(tmp_path / OBJECTS_FILE, weights_only=True)
    assert objects["objects"]["optim_wrapper"]["state"] == {}
    assert objects["objects"]["optim_wrapper"]["counters"]["steps"] == 3
    assert objects["models"] == ["model"] and objects["optimizers"] == ["optim_wrapper"]


def test_each_member_of_a_wrapper_dict_is_saved_with_its_own_model(tmp_path):
    gan = make_gan()
    wrappers = OptimWrapperDict(
        gen=OptimWrapper(torch.optim.Adam(gan["gen"].parameters(), lr=0.01)),
        disc=OptimWrapper(torch.optim.Adam(gan["disc"].parameters(), lr=0.02)),
    )
    gan["disc"](gan["gen"](torch.randn(3, 4))).sum().backward()
    wrappers["gen"].step()
    wrappers["disc"].step()
    to_save = {"gen": gan["gen"], "disc": gan["disc"], "optim": wrappers}
    layout = ShardedLayout.of(to_save)
    assert {key: model for key, (model, _) in layout.optimizers.items()} == {
        "optim.gen": gan["gen"],
        "optim.disc": gan["disc"],
    }
    save_sharded(layout, tmp_path)
    fresh = make_gan(seed=3)
    fresh_wrappers = OptimWrapperDict(
        gen=OptimWrapper(torch.optim.Adam(fresh["gen"].parameters(), lr=0.01)),
        disc=OptimWrapper(torch.optim.Adam(fresh["disc"].parameters(), lr=0.02)),
    )
    load_sharded_checkpoint({"gen": fresh["gen"], "disc": fresh["disc"], "optim": fresh_wrappers}, tmp_path)
    assert_same_tensors(fresh.state_dict(), gan.state_dict())
    assert_same_tensors(fresh_wrappers.state_dict(), wrappers.state_dict())


def test_an_optimizer_whose_model_is_not_saved_is_refused_by_name():
    model = make_model()
    with pytest.raises(ValueError, match=r"to_save\['optim'\] updates parameters of no model there"):
        ShardedLayout.of({"optim": OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))})


def test_an_optimizer_over_several_models_is_refused_with_the_way_out():
    body, head = make_model(), make_model(seed=1)
    wrapper = OptimWrapper(torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.1))
    with pytest.raises(ValueError, match=r"parameters of several models \(\['body', 'head'\]\).*nn.ModuleDict"):
        ShardedLayout.of({"body": body, "head": head, "optim": wrapper})


def test_a_window_in_progress_of_unsharded_parameters_is_saved_and_continues_exactly(tmp_path):
    saved = trained(steps=2, accumulate=2)
    batch = (torch.randn(2, 4), torch.randn(2, 2))
    saved["optim_wrapper"].update_params(loss_fn(saved["model"](batch[0]), batch[1]))  # a window of 2 begun
    save_sharded(ShardedLayout.of(saved), tmp_path)
    fresh = trained(seed=1, steps=2, accumulate=2)
    load_sharded_checkpoint(fresh, tmp_path)
    for run in (saved, fresh):
        run["optim_wrapper"].update_params(loss_fn(run["model"](batch[0]), batch[1]))  # the window ends
    assert_same_tensors(state_of(fresh), state_of(saved))


def test_saving_an_optimizer_that_has_not_stepped_leaves_it_so_and_loads_so(tmp_path):
    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS["adamw"](model.parameters()))
    stepped = []
    wrapper.optimizer.register_step_post_hook(lambda *args: stepped.append(args))
    save_sharded(ShardedLayout.of({"model": model, "optim_wrapper": wrapper}), tmp_path)
    assert not wrapper.optimizer.state and not stepped
    assert all(param.grad is None for param in model.parameters())
    fresh = trained(seed=1)
    load_sharded_checkpoint({"model": fresh["model"], "optim_wrapper": fresh["optim_wrapper"]}, tmp_path)
    assert not fresh["optim_wrapper"].optimizer.state
    assert_same_tensors(fresh["model"].state_dict(), model.state_dict())


def test_the_saved_optimizer_state_loads_into_an_optimizer_whose_parameters_hold_gradients(tmp_path):
    saved = trained()
    save_sharded(ShardedLayout.of(saved), tmp_path)
    model = make_model(seed=4)
    model(torch.ones(1, 4)).sum().backward()  # gradients there, no optimizer state
    wrapper = AmpOptimWrapper(optimizer=OPTIMIZERS["adamw"](model.parameters()), dtype=torch.float16)
    load_sharded_checkpoint({"model": model, "optim_wrapper": wrapper}, tmp_path)
    assert_same_tensors(wrapper.state_dict()["state"], saved["optim_wrapper"].state_dict()["state"])


def damage_a_shard(directory):
    shard = next(directory.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("shape", r"'model' does not match this run: shapes differ: 3.weight: saved \(2, 8\), model \(3, 8\)"),
        ("layer", r"'model' does not match this run: the model lacks \['3.bias', '3.weight'\]"),
        ("dtype", r"'model' does not match this run: dtypes differ"),
        ("optimizer", r"'optim_wrapper' does not match this run"),
        ("name", r"lacks \['extra'\]"),
        ("metadata", "not a complete sharded checkpoint"),
        ("objects", "cannot read checkpoint"),
        ("shard", "reading its models and optimizers failed .*files are damaged"),
    ],
)
def test_a_refused_load_names_the_checkpoint_and_leaves_every_object_as_it_was(tmp_path, change, message):
    save_sharded(ShardedLayout.of(trained()), tmp_path)
    model = make_model(seed=5)
    if change == "shape":
        model[3] = torch.nn.Linear(8, 3)
    model = model.double() if change == "dtype" else model[:3] if change == "layer" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if change == "optimizer" else None
    wrapper = OptimWrapper(optimizer or OPTIMIZERS["adamw"](model.parameters()))
    trainer = Engine(lambda engine, batch: None)
    to_load = {"model": model, "optim_wrapper": wrapper, "trainer": trainer}
    if change == "name":
        to_load["extra"] = torch.nn.Linear(1, 1)
    if change in ("objects", "shard"):  # a checkpoint of an earlier release: no manifest finds it first
        (tmp_path / MANIFEST_FILE).unlink()
    if change in ("metadata", "objects"):
        (tmp_path / (".metadata" if change == "metadata" else OBJECTS_FILE)).unlink()
    if change == "shard":
        damage_a_shard(tmp_path)
    before = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "wrapper": wrapper.state_dict()}
    with pytest.raises(ValueError, match=message) as error, warnings.catch_warnings():
        warnings.filterwarnings("ignore", f".* has no {MANIFEST_FILE}", RuntimeWarning)
        load_sharded_checkpoint(to_load, tmp_path)
    assert str(tmp_path) in str(error.value)
    assert_same_tensors({"model": model.state_dict(), "wrapper": wrapper.state_dict()}, before)
    assert not wrapper.optimizer.state  # reading DCP's form initialises an optimizer: undone
    assert trainer.state.iteration == 0


def test_publishing_renames_a_complete_checkpoint_into_place_and_keeps_one_already_there(tmp_path):
    layout = ShardedLayout.of({"model": make_model()})
    save_sharded(layout, tmp_path / ".checkpoint_4.7.partial")
    assert publish(tmp_path / ".checkpoint_4.7.partial", tmp_path / "checkpoint_4")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_4"]
    (tmp_path / "checkpoint_4" / "kept").write_bytes(b"")
    save_sharded(layout, tmp_path / ".checkpoint_4.8.partial")
    assert not publish(tmp_path / ".checkpoint_4.8.partial", tmp_path / "checkpoint_4")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_4"] and (tmp_path / "checkpoint_4" / "kept").exists()


@pytest.mark.parametrize("entry", ["directory", "file", "link"])
def test_publishing_onto_an_entry_of_the_checkpoints_name_that_is_no_checkpoint_is_refused(tmp_path, entry):
    final = tmp_path / "checkpoint_4"
    if entry == "directory":
        final.mkdir()
    elif entry == "file":
        final.write_bytes(b"mine")
    else:
        final.symlink_to(tmp_path / "nowhere")
    save_sharded(ShardedLayout.of({"model": make_model()}), tmp_path / ".checkpoint_4.7.partial")
    with pytest.raises(FileExistsError, match="checkpoint_4: an entry of that name is there and is no checkpoint"):
        publish(tmp_path / ".checkpoint_4.7.partial", final)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_4"] and os.path.lexists(final)  # theirs, untouched


def two_branches(seed, stepped_branch=None):
    """An Adam over two branches; stepped with gradients on one branch only, it holds state for that one."""
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 3), "unused": torch.nn.Linear(3, 3)})
    wrapper = OptimWrapper(torch.optim.Adam(model.parameters(), lr=0.1))
    if stepped_branch is not None:
        wrapper.update_params(model[stepped_branch](torch.ones(2, 3)).sum())
    return model, wrapper


@pytest.mark.parametrize("fresh_branch", [None, "unused"])
def test_an_optimizer_with_state_for_some_parameters_loads_exactly_that(tmp_path, fresh_branch):
    model, wrapper = two_branches(0, "used")
    save_sharded(ShardedLayout.of({"model": model, "optim": wrapper}), tmp_path)
    fresh_model, fresh = two_branches(1, fresh_branch)  # no state, or state for the other branch
    load_sharded_checkpoint({"model": fresh_model, "optim": fresh}, tmp_path)
    assert len(fresh.optimizer.state) == 2
    assert_same_tensors(fresh.state_dict(), wrapper.state_dict())
