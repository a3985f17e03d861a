"""load_checkpoint and check_entry: every entry is asked before any is loaded, by the objects' own public checks."""

from __future__ import annotations

import copy
import errno
import threading
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint, DiskSaver

from engine_opt import OptimWrapper, create_trainer
from engine_opt.checkpoint.files import check_entry, load_checkpoint, write_checkpoint
from engine_opt.engine import ResumableLoader

from helpers import make_amp_gan_wrappers, train_some
from oracle import (
    assert_same_model,
    assert_same_tensors,
    loss_fn,
    make_batches,
    make_gan,
    make_model,
    plain_gan_loop,
)


def saved_run(path):
    model = make_model()
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.01))
    trainer = create_trainer(model, wrapper, loss_fn)
    data = ResumableLoader(make_batches(4))
    trainer.run(data)
    objects = {"model": model, "optim_wrapper": wrapper, "trainer": trainer, "data": data}
    torch.save({name: obj.state_dict() for name, obj in objects.items()}, path)
    return objects


def fresh():
    model = make_model(seed=3)
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.01))
    return {
        "model": model,
        "optim_wrapper": wrapper,
        "trainer": create_trainer(model, wrapper, loss_fn),
        "data": ResumableLoader(make_batches(4)),
    }


def test_a_checkpoint_loads_into_every_object(tmp_path):
    saved = saved_run(tmp_path / "checkpoint_4.pt")
    objects = fresh()
    load_checkpoint(objects, tmp_path / "checkpoint_4.pt")
    for name in ("model", "optim_wrapper"):
        assert_same_tensors(objects[name].state_dict(), saved[name].state_dict(), name)
    assert objects["trainer"].state.iteration == 4


def test_validation_builds_no_throwaway_wrapper_or_engine(tmp_path, monkeypatch):
    saved_run(tmp_path / "checkpoint_4.pt")
    objects = fresh()
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    plain_engine = Engine(lambda engine, batch: None)

    built = []

    def refuse(self, *args, **kwargs):
        built.append(type(self).__name__)  # seen even if the error below were caught on the way
        raise AssertionError("a throwaway object was built to validate a checkpoint")

    monkeypatch.setattr(OptimWrapper, "__init__", refuse)
    monkeypatch.setattr(Engine, "__init__", refuse)
    state = torch.load(tmp_path / "checkpoint_4.pt", weights_only=True)
    for name, obj in objects.items():
        check_entry(obj, state[name])
    check_entry(plain_engine, state["trainer"])
    check_entry(optimizer, torch.optim.SGD(make_model(seed=1).parameters(), lr=0.1).state_dict())
    load_checkpoint(objects, tmp_path / "checkpoint_4.pt")
    monkeypatch.undo()
    assert built == []
    for name in ("model", "optim_wrapper", "data"):  # validated, then loaded: each object holds what was saved
        assert_same_tensors(objects[name].state_dict(), state[name], name)
    assert objects["trainer"].state_dict() == state["trainer"]


class Asked:
    """A stateful object with its own public check."""

    def __init__(self):
        self.asked = []

    def state_dict(self):
        return {"value": 1}

    def check_state_dict(self, state):
        self.asked.append(state)
        if state.get("value") != 1:
            raise ValueError(f"value must be 1, got {state.get('value')!r}")

    def load_state_dict(self, state):
        raise AssertionError("loaded although another entry did not fit")


def test_an_object_with_its_own_check_is_asked_and_a_refusal_loads_nothing(tmp_path):
    model, other = make_model(), make_model(seed=4)
    torch.save({"model": other.state_dict(), "asked": {"value": 2}}, tmp_path / "checkpoint_1.pt")
    asked = Asked()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint_1.pt: 'asked' does not match this run: value must be 1, got 2"):
        load_checkpoint({"model": model, "asked": asked}, tmp_path / "checkpoint_1.pt")
    assert asked.asked == [{"value": 2}]
    assert_same_tensors(dict(model.state_dict()), before)


@pytest.mark.parametrize(
    ("obj", "saved", "message"),
    [
        (make_model(), {"weight": torch.ones(1)}, "the model lacks"),
        (torch.optim.SGD(make_model().parameters(), lr=0.1), {"state": {}}, "lacks the optimizer key"),
        (Engine(lambda engine, batch: None), {"iteration": 1}, "needs 'epoch_length'"),
    ],
)
def test_torch_and_ignite_objects_are_checked_here(obj, saved, message):
    with pytest.raises(ValueError, match=message):
        check_entry(obj, saved)


def test_a_lone_objects_file_saved_by_ignite_loads(tmp_path):
    model = make_model(seed=7)
    checkpoint = Checkpoint({"model": model}, DiskSaver(str(tmp_path), require_empty=False))
    checkpoint(Engine(lambda engine, batch: None))
    target = make_model()
    load_checkpoint({"model": target}, tmp_path / checkpoint.last_checkpoint)
    assert_same_tensors(dict(target.state_dict()), dict(model.state_dict()))


def test_a_full_disk_names_the_path_leaves_no_partial_file_and_the_previous_file_as_it_was(tmp_path, monkeypatch):
    previous = tmp_path / "checkpoint_1.pt"
    write_checkpoint({"step": torch.tensor(1)}, previous)
    real_save = torch.save

    def full_disk(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 some bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*checkpoint_2.pt: No space left on device") as caught:
        write_checkpoint({"step": torch.tensor(2)}, tmp_path / "checkpoint_2.pt")
    monkeypatch.setattr(torch, "save", real_save)
    assert caught.value.errno == errno.ENOSPC
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint_1.pt"]
    assert torch.load(previous, weights_only=True)["step"].item() == 1


class FillingDisk:
    """A file whose disk fills up after ``room`` bytes: its writes then fail as a full disk's do."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("room", [0, 100, 5000])
def test_a_disk_filling_up_inside_torchs_writer_is_an_os_error_naming_the_path(tmp_path, monkeypatch, room):
    previous = tmp_path / "checkpoint_1.pt"
    write_checkpoint({"step": torch.tensor(1)}, previous)
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *args, **kwargs: FillingDisk(real_open(self, *args, **kwargs), room))
    with pytest.raises(OSError, match=r"cannot write checkpoint .*checkpoint_2.pt: No space left on device") as caught:
        write_checkpoint({"weights": torch.ones(4096)}, tmp_path / "checkpoint_2.pt")  # torch.save itself
    monkeypatch.setattr(Path, "open", real_open)
    assert caught.value.errno == errno.ENOSPC
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint_1.pt"]
    assert torch.load(previous, weights_only=True)["step"].item() == 1


def test_any_other_failure_of_a_save_leaves_no_partial_file(tmp_path):
    with pytest.raises(Exception, match=r"[Pp]ickle"):
        write_checkpoint({"not saveable": lambda: None}, tmp_path / "checkpoint_2.pt")
    assert list(tmp_path.iterdir()) == []


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


class Counter:
    """A stateful object the checks do not know: its load_state_dict refuses what it cannot take."""

    def __init__(self, lock=False):
        self.count = 0
        self.lock = threading.Lock() if lock else None  # a lock: no copy of it can be made

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = int(state["count"])


def model_and(extra, path, extra_state):
    model = make_model()
    torch.save({"model": make_model(seed=9).state_dict(), "extra": extra_state}, path)
    before = copy.deepcopy(model.state_dict())
    return {"model": model, "extra": extra}, before


@pytest.mark.parametrize(
    ("extra", "saved", "message"),
    [
        (torch.amp.GradScaler("cpu"), {}, r"the saved grad scaler state must have the keys"),  # a disabled one's
        (torch.amp.GradScaler("cpu"), {**torch.amp.GradScaler("cpu").state_dict(), "scale": float("nan")}, "scale"),
        (Counter(), {"total": 3}, r"loading it into a copy of the object failed: KeyError: 'count'"),
    ],
    ids=["a disabled scaler's state", "a nan scale", "an object the checks do not know"],
)
def test_an_entry_no_object_can_take_is_refused_before_any_object_changes(tmp_path, extra, saved, message):
    to_load, before = model_and(extra, tmp_path / "checkpoint_1.pt", saved)
    extra_before = copy.deepcopy(extra.state_dict())
    with pytest.raises(ValueError, match=rf"'extra' does not match this run: .*{message}"):
        load_checkpoint(to_load, tmp_path / "checkpoint_1.pt")
    assert_same_tensors(to_load["model"].state_dict(), before)
    assert extra.state_dict() == extra_before


def test_an_object_that_cannot_be_tried_on_a_copy_is_loaded_before_the_checked_ones(tmp_path):
    to_load, before = model_and(Counter(lock=True), tmp_path / "checkpoint_1.pt", {"total": 3})
    with pytest.raises(KeyError, match="count"):  # its own error, raised before the model was loaded
        load_checkpoint(to_load, tmp_path / "checkpoint_1.pt")
    assert_same_tensors(to_load["model"].state_dict(), before)
    to_load, _ = model_and(Counter(lock=True), tmp_path / "checkpoint_2.pt", {"count": 3})
    load_checkpoint(to_load, tmp_path / "checkpoint_2.pt")
    assert to_load["extra"].count == 3
    assert_same_tensors(to_load["model"].state_dict(), make_model(seed=9).state_dict())
