"""RunDirectory: only the run's own files, odd entries skipped, leftovers removed, one run (process) at a time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_opt.checkpoint.run_directory import RunDirectory, RunDirectoryBusy

ROOT = Path(__file__).resolve().parents[2]
OTHERS = [
    "best_checkpoint_30.pt",
    "pretrained_checkpoint_1.pt",
    "checkpoint_3.pt.bak",
    "checkpoint_x.pt",
    "ckpt_9.pt",
    "checkpoint_0000.pt",  # a user's: the run never writes leading zeros
    "checkpoint_\u0669\u0669.pt",  # digits, but not ASCII ones (Arabic-Indic, full-width)
    "checkpoint_\uff19\uff19.pt",
]


def populate(path: Path, steps=(2, 4, 6)) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name in [f"checkpoint_{step}.pt" for step in steps] + OTHERS:
        torch.save({"name": name}, path / name)


def test_only_files_named_exactly_like_the_runs_are_listed_and_rotated(tmp_path):
    populate(tmp_path)
    directory = RunDirectory(tmp_path)
    assert [step for step, _ in directory.checkpoints()] == [2, 4, 6]
    assert directory.newest() == tmp_path / "checkpoint_6.pt"
    assert [path.name for path in directory.rotate(keep=1)] == ["checkpoint_2.pt", "checkpoint_4.pt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["checkpoint_6.pt", *OTHERS])
    assert directory.rotate(keep=None) == []


def test_a_directory_or_a_dangling_link_named_like_a_checkpoint_is_skipped_with_a_warning(tmp_path):
    populate(tmp_path, steps=(2,))
    (tmp_path / "checkpoint_9.pt").mkdir()
    (tmp_path / "checkpoint_7.pt").symlink_to(tmp_path / "gone.pt")
    with pytest.warns(RuntimeWarning) as warned:
        assert RunDirectory(tmp_path).newest() == tmp_path / "checkpoint_2.pt"
    assert sorted(str(warning.message) for warning in warned) == [
        f"{tmp_path / 'checkpoint_7.pt'} is a link to nothing, not a checkpoint: skipped",
        f"{tmp_path / 'checkpoint_9.pt'} is a directory, not a checkpoint: skipped",
    ]


def test_a_link_to_an_older_checkpoint_is_never_taken_for_the_newest(tmp_path):
    populate(tmp_path, steps=(2, 4))
    (tmp_path / "checkpoint_3").mkdir()
    (tmp_path / "checkpoint_3" / ".metadata").write_bytes(b"")
    (tmp_path / "checkpoint_9.pt").symlink_to(tmp_path / "checkpoint_2.pt")
    (tmp_path / "checkpoint_11").symlink_to(tmp_path / "checkpoint_3")
    with pytest.warns(RuntimeWarning) as warned:
        found = RunDirectory(tmp_path).checkpoints()
    assert [path.name for _, path in found] == ["checkpoint_2.pt", "checkpoint_3", "checkpoint_4.pt"]
    assert sorted(str(warning.message) for warning in warned) == [
        f"{tmp_path / 'checkpoint_11'} is a link to {tmp_path / 'checkpoint_3'}, not a checkpoint: skipped",
        f"{tmp_path / 'checkpoint_9.pt'} is a link to {tmp_path / 'checkpoint_2.pt'}, not a checkpoint: skipped",
    ]
    with pytest.warns(RuntimeWarning):
        assert RunDirectory(tmp_path, "sharded").newest() == tmp_path / "checkpoint_3"
    with pytest.warns(RuntimeWarning, match="checkpoint_9.pt is a link") as warned:  # the sharded link: not looked at
        assert RunDirectory(tmp_path, "file").newest() == tmp_path / "checkpoint_4.pt"
    assert len(warned) == 1


def test_prepare_creates_the_directory_and_removes_only_partial_files(tmp_path):
    directory = RunDirectory(tmp_path / "new" / "run")
    assert directory.prepare() == []
    populate(directory.path, steps=(1,))
    partial = directory.path / ".checkpoint_2.pt.123.partial"
    partial.write_bytes(b"half a checkpoint")
    (directory.path / ".hidden_notes").write_text("mine")
    assert directory.prepare() == [partial]
    assert sorted(path.name for path in directory.path.iterdir()) == sorted(
        [".hidden_notes", "checkpoint_1.pt", *OTHERS]
    )


def test_a_file_in_the_way_is_refused_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"cannot write checkpoints to .*file/checkpoints"):
        RunDirectory(tmp_path / "file" / "checkpoints").prepare()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_refused_naming_the_path(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=r"cannot write checkpoints to"):
            RunDirectory(tmp_path).prepare()
    finally:
        tmp_path.chmod(0o700)


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    first, second = RunDirectory(tmp_path), RunDirectory(tmp_path)
    with first.lock(), second.lock():
        assert (tmp_path / ".engine_opt.lock.owner").exists()
    assert not (tmp_path / ".engine_opt.lock.owner").exists()


HOLDER = """
import sys, time
from engine_opt.checkpoint.run_directory import RunDirectory
directory = RunDirectory(sys.argv[1])  # held while referenced: the lock goes with its object, or its process
directory.acquire()
print("holding", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_another_process_is_refused_while_the_holder_lives_and_not_after_it_is_killed(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(RunDirectoryBusy) as refused:
            RunDirectory(tmp_path).acquire()
        assert str(refused.value).startswith(f"{tmp_path} is in use by another run (process {holder.pid} on")
        assert socket.gethostname() in str(refused.value)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    directory = RunDirectory(tmp_path)
    directory.acquire()  # the killed holder's lock went with its process
    directory.release()


@pytest.mark.slow
def test_a_lock_file_removed_under_a_live_holder_does_not_let_a_second_run_in(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout.readline() == "holding\n"
        (tmp_path / ".engine_opt.lock").unlink()  # a clean-up script, a user tidying the directory
        with pytest.raises(RunDirectoryBusy, match=rf"process {holder.pid} on .*its lock file was removed"):
            RunDirectory(tmp_path).acquire()
        assert RunDirectory(tmp_path).discard_if_unused() is False  # the holder's owner file is there
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    directory = RunDirectory(tmp_path)
    directory.acquire()  # the owner file names a dead process now: no block
    directory.release()


def test_removing_a_sharded_checkpoint_renames_it_to_a_partial_name_first_and_a_partial_one_in_place(tmp_path):
    from unittest import mock

    import engine_opt.checkpoint.run_directory as run_directory

    for name in ("checkpoint_3", ".checkpoint_5.12.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".metadata").write_bytes(b"")
    with mock.patch.object(run_directory.shutil, "rmtree", side_effect=OSError("crashed")), pytest.raises(OSError):
        run_directory.remove(tmp_path / "checkpoint_3")
    with mock.patch.object(run_directory.shutil, "rmtree", side_effect=OSError("crashed")), pytest.raises(OSError):
        run_directory.remove(tmp_path / ".checkpoint_5.12.partial")
    directory = RunDirectory(tmp_path)
    assert directory.checkpoints() == []  # neither is a checkpoint any more
    assert sorted(path.name for path in directory.prepare()) == [
        f".checkpoint_3.{os.getpid()}.partial",
        ".checkpoint_5.12.partial",
    ]
    assert os.listdir(tmp_path) == []


def test_held_elsewhere_tells_without_writing_anything(tmp_path):
    import filelock

    assert RunDirectory(tmp_path / "absent").held_elsewhere() is None and not (tmp_path / "absent").exists()
    assert RunDirectory(tmp_path).held_elsewhere() is None and list(tmp_path.iterdir()) == []  # no lock file: free
    with RunDirectory(tmp_path).lock():
        pass
    left = sorted(path.name for path in tmp_path.iterdir())
    assert RunDirectory(tmp_path).held_elsewhere() is None
    assert sorted(path.name for path in tmp_path.iterdir()) == left
    with filelock.FileLock(str(tmp_path / ".engine_opt.lock"), timeout=0):  # as another process holds it
        assert RunDirectory(tmp_path).held_elsewhere().startswith(f"{tmp_path} is in use by another run")


def test_held_elsewhere_finds_a_live_holder_whose_lock_file_was_removed(tmp_path):
    import json

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".engine_opt.lock.owner").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert f"process {holder.pid}" in RunDirectory(tmp_path).held_elsewhere()
    finally:
        holder.kill()
        holder.wait()
