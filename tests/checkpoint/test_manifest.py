"""A sharded checkpoint's manifest: any flipped bit, cut, missing, extra or linked file of it loads nothing.

DCP's own files carry no checksum: without the manifest a flipped bit in a tensor's data loads silently
(the first test shows it, as the oracle that the damage below is real). Every file of a real checkpoint,
saved synchronously and in the background, is damaged in turn (seeded random bit flips and cuts); each load
must be refused naming that file, with every object left as it was.
"""

from __future__ import annotations

import copy
import json
import random
import warnings

import pytest
import torch

from engine_opt import OptimWrapper
from engine_opt.checkpoint import load_sharded_checkpoint
from engine_opt.checkpoint.manifest import MANIFEST_FILE
from engine_opt.checkpoint.sharded_files import ShardedLayout, save_sharded

from oracle import OPTIMIZERS, assert_same_tensors, make_model

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def objects(seed=0):
    model = make_model(seed)
    return {"model": model, "optim_wrapper": OptimWrapper(OPTIMIZERS["adamw"](model.parameters()))}


def saved_checkpoint(path, async_save=False):
    saved = objects()
    saved["optim_wrapper"].update_params(saved["model"](torch.ones(2, 4)).sum())
    future = save_sharded(ShardedLayout.of(saved), path, async_save=async_save)
    if future is not None:
        future.result()
    return saved


def files_of(path):
    return sorted(entry.name for entry in path.iterdir() if entry.name != MANIFEST_FILE)


def refused_unchanged(path, match):
    to_load = objects(seed=1)
    before = {name: copy.deepcopy(obj.state_dict()) for name, obj in to_load.items()}
    with pytest.raises(ValueError, match=match):
        load_sharded_checkpoint(to_load, path)
    for name, obj in to_load.items():
        assert_same_tensors(obj.state_dict(), before[name], name)


def flip_a_bit(path, rng):
    data = bytearray(path.read_bytes())
    position = rng.randrange(len(data))
    data[position] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def test_without_the_manifest_a_flipped_bit_in_a_shards_tensor_data_loads_silently(tmp_path):
    saved = saved_checkpoint(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    shard = next(tmp_path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    weight = saved["model"].state_dict()["0.weight"].numpy().tobytes()
    data[data.index(weight) + 1] ^= 0x40  # inside the first layer's weight
    shard.write_bytes(bytes(data))
    loaded = objects(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        load_sharded_checkpoint(loaded, tmp_path)
    assert not torch.equal(loaded["model"][0].weight, saved["model"][0].weight)  # loaded, and wrong


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_complete_checkpoint_has_a_manifest_and_loads_without_a_warning(tmp_path, async_save):
    saved = saved_checkpoint(tmp_path, async_save)
    assert sorted(json.loads((tmp_path / MANIFEST_FILE).read_text())["files"]) == files_of(tmp_path)
    loaded = objects(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        load_sharded_checkpoint(loaded, tmp_path)
    assert_same_tensors(loaded["model"].state_dict(), saved["model"].state_dict())


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_every_file_flipped_or_cut_anywhere_is_refused_naming_it(tmp_path, async_save):
    rng = random.Random(2026)
    template = tmp_path / "template"
    saved_checkpoint(template, async_save)
    for name in files_of(template):
        for trial in range(3):
            damaged = tmp_path / f"{name}-{trial}"
            damaged.mkdir()
            for entry in template.iterdir():
                (damaged / entry.name).write_bytes(entry.read_bytes())
            target = damaged / name
            if trial < 2:
                flip_a_bit(target, rng)
            else:
                target.write_bytes(target.read_bytes()[: rng.randrange(target.stat().st_size)])
            refused_unchanged(damaged, rf"{damaged}/{name} is damaged")


def test_a_missing_an_extra_or_a_linked_file_is_refused(tmp_path):
    saved_checkpoint(tmp_path / "missing")
    (tmp_path / "missing" / "objects.pt").unlink()
    refused_unchanged(tmp_path / "missing", r"missing/objects\.pt is missing: .*manifest\.json lists it")
    saved_checkpoint(tmp_path / "extra")
    (tmp_path / "extra" / "__1_0.distcp").write_bytes(b"planted")
    refused_unchanged(tmp_path / "extra", r"extra holds files its manifest\.json does not list: \['__1_0\.distcp'\]")
    saved_checkpoint(tmp_path / "linked")
    shard = next((tmp_path / "linked").glob("*.distcp"))
    (tmp_path / "elsewhere.distcp").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(tmp_path / "elsewhere.distcp")  # the same bytes, through a link
    refused_unchanged(tmp_path / "linked", r"linked holds links \(__0_0\.distcp\)")


@pytest.mark.parametrize(
    "manifest",
    ["{not json", json.dumps({"format": 99, "files": {}}), json.dumps({"format": 1, "files": {"../x": {}}}), "[]"],
)
def test_a_damaged_manifest_is_refused_by_name(tmp_path, manifest):
    saved_checkpoint(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(manifest)
    refused_unchanged(tmp_path, rf"{tmp_path}/manifest\.json is damaged")


def test_a_checkpoint_of_an_earlier_release_without_a_manifest_loads_with_a_warning(tmp_path):
    saved = saved_checkpoint(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    loaded = objects(seed=1)
    with pytest.warns(RuntimeWarning, match=r"has no manifest\.json \(a sharded checkpoint of an earlier release\)"):
        load_sharded_checkpoint(loaded, tmp_path)
    assert_same_tensors(loaded["model"].state_dict(), saved["model"].state_dict())
