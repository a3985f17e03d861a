"""A sharded checkpoint planted in a run's directory runs no code: DCP's .metadata is read by a restricted unpickler.

Each payload, when unpickled by ``pickle.load`` (what DCP does), creates a marker file; the marker must never
appear, the load must be refused naming the checkpoint, and every object must stay as it was. A damaged
``.metadata`` is refused by name too, not with pickle's own error.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch

from engine_opt import OptimWrapper
from engine_opt.checkpoint import latest_checkpoint, load_sharded_checkpoint, resume_from_latest
from engine_opt.checkpoint.dcp_metadata import read_metadata
from engine_opt.checkpoint.manifest import MANIFEST_FILE, write_manifest
from engine_opt.checkpoint.sharded_files import ShardedLayout, save_sharded

from oracle import OPTIMIZERS, assert_same_tensors, make_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning", "ignore:.* has no manifest.json:RuntimeWarning"
)


class Payload:
    """What a planted ``.metadata`` unpickles into: a call, here one that leaves a marker file."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os.system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "open":
            return (open, (str(self.marker), "w"))
        if self.how == "a method of an allowed class":  # pathlib is allowed for the paths DCP records
            return (Path.touch, (self.marker,))
        return (os.makedirs, (str(self.marker),))


HOWS = ["os.system", "open", "a method of an allowed class", "os.makedirs"]


def objects():
    model = make_model()
    return {"model": model, "optim_wrapper": OptimWrapper(OPTIMIZERS["adamw"](model.parameters()))}


def real_checkpoint(path):
    saved = objects()
    saved["optim_wrapper"].update_params(saved["model"](torch.ones(2, 4)).sum())
    save_sharded(ShardedLayout.of(saved), path)
    return saved


def plant(directory, marker, how, with_manifest):
    """A sharded checkpoint whose .metadata is a payload (a real one's other files beside it)."""
    real_checkpoint(directory)
    (directory / ".metadata").write_bytes(pickle.dumps(Payload(marker, how)))
    (directory / MANIFEST_FILE).unlink()
    if with_manifest:  # the attacker writes a manifest of the planted files: no secret stops that
        write_manifest(directory)


def test_the_payloads_run_when_pickle_loads_them(tmp_path):
    for how in HOWS:  # the oracle: each payload does run under plain pickle.load, as DCP reads .metadata
        marker = tmp_path / f"marker-{HOWS.index(how)}"
        pickle.loads(pickle.dumps(Payload(marker, how)))
        assert marker.exists(), how


@pytest.mark.parametrize("with_manifest", [False, True], ids=["no manifest", "the attacker's manifest"])
@pytest.mark.parametrize("how", HOWS)
def test_a_planted_metadata_is_refused_before_it_runs_and_nothing_is_loaded(tmp_path, how, with_manifest):
    marker = tmp_path / "marker"
    plant(tmp_path / "checkpoint_5", marker, how, with_manifest)
    to_load = objects()
    before = {name: copy.deepcopy(obj.state_dict()) for name, obj in to_load.items()}
    with pytest.raises(ValueError, match=r"checkpoint_5/\.metadata holds .*which DCP's metadata never does"):
        load_sharded_checkpoint(to_load, tmp_path / "checkpoint_5")
    assert not marker.exists()
    for name, obj in to_load.items():
        assert_same_tensors(obj.state_dict(), before[name], name)


def test_a_planted_checkpoint_newer_than_the_runs_files_is_never_taken_for_a_file_run(tmp_path):
    marker = tmp_path / "marker"
    saved = objects()
    torch.save({name: obj.state_dict() for name, obj in saved.items()}, tmp_path / "checkpoint_2.pt")
    plant(tmp_path / "checkpoint_9", marker, "os.system", with_manifest=True)
    assert latest_checkpoint(tmp_path).name == "checkpoint_9"
    assert latest_checkpoint(tmp_path, kind="file").name == "checkpoint_2.pt"
    with pytest.raises(ValueError, match="could run code"):
        resume_from_latest(objects(), tmp_path)  # kind="any": the newest is the planted one, refused
    assert resume_from_latest(objects(), tmp_path, kind="file").name == "checkpoint_2.pt"
    assert latest_checkpoint(tmp_path, kind="sharded").name == "checkpoint_9"
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"kind must be one of \['file', 'sharded', 'any'\], got 'files' of type str"):
        latest_checkpoint(tmp_path, kind="files")


def test_the_metadata_of_a_real_checkpoint_reads_as_dcp_reads_it(tmp_path):
    real_checkpoint(tmp_path)
    with open(tmp_path / ".metadata", "rb") as file:
        ours = read_metadata(file, tmp_path)
    with open(tmp_path / ".metadata", "rb") as file:
        theirs = pickle.load(file)  # a file this test wrote: safe to read the unrestricted way
    assert ours == theirs


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty", "a pickled dict"])
def test_a_damaged_metadata_is_refused_by_name_not_with_pickles_error(tmp_path, damage):
    real_checkpoint(tmp_path)
    metadata = tmp_path / ".metadata"
    data = metadata.read_bytes()
    rng = random.Random(damage)
    replaced = {
        "truncated": data[: len(data) // 2],
        "random bytes": bytes(rng.getrandbits(8) for _ in range(len(data))),
        "empty": b"",
        "a pickled dict": pickle.dumps({"state_dict_metadata": {}}),
    }[damage]
    metadata.write_bytes(replaced)
    (tmp_path / MANIFEST_FILE).unlink()  # an earlier release's checkpoint: the manifest would refuse it first
    with pytest.raises(ValueError, match=rf"{tmp_path}/\.metadata (is damaged|holds)"):
        load_sharded_checkpoint(objects(), tmp_path)


def test_read_metadata_refuses_a_global_of_an_allowed_module_under_another_name():
    for planted in (pickle.dumps(torch.load), pickle.dumps(Path.unlink), pickle.dumps(shutil.rmtree)):
        with pytest.raises(ValueError, match="which DCP's metadata never does"):
            read_metadata(io.BytesIO(planted), "ckpt/checkpoint_1")


@pytest.mark.parametrize("where", ["../outside.distcp", "{tmp_path}/outside.distcp", "sub/__0_0.distcp"])
def test_a_metadata_pointing_at_files_outside_its_checkpoint_is_refused(tmp_path, where):
    checkpoint = tmp_path / "checkpoint_3"
    real_checkpoint(checkpoint)
    where = where.format(tmp_path=tmp_path)
    shard = next(checkpoint.glob("*.distcp"))
    for copy_of_the_shard in (tmp_path / "outside.distcp", checkpoint / "sub" / "__0_0.distcp"):
        copy_of_the_shard.parent.mkdir(exist_ok=True)
        copy_of_the_shard.write_bytes(shard.read_bytes())  # the same bytes there: DCP would load them silently
    with open(checkpoint / ".metadata", "rb") as file:
        metadata = pickle.load(file)  # written by this test: safe to read the unrestricted way
    for record in metadata.storage_data.values():
        record.relative_path = where  # DCP would read the tensors from there
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    write_manifest(checkpoint)
    to_load = objects()
    before = {name: copy.deepcopy(obj.state_dict()) for name, obj in to_load.items()}
    with pytest.raises(ValueError, match=r"checkpoint_3/\.metadata points at files outside its checkpoint"):
        load_sharded_checkpoint(to_load, checkpoint)
    for name, obj in to_load.items():
        assert_same_tensors(obj.state_dict(), before[name], name)
