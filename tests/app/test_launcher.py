"""engine_opt.app.launcher: spawned ranks ignore SIGINT while they start; the launcher notes signals for them."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import time

import pytest
from torch.multiprocessing.spawn import ProcessExitedException

from engine_opt.app.launcher import RankLink, launch_ranks
from engine_opt.app.signals import StopNow


def wait_for_request(link: RankLink) -> int:
    deadline = time.monotonic() + 60
    while not link.requested.value:
        if time.monotonic() > deadline:
            raise RuntimeError("the launcher never noted a signal")
        time.sleep(0.01)
    return link.requested.value


def signal_the_launcher(local_rank: int, args: argparse.Namespace, link: RankLink) -> None:
    """Each rank records its SIGINT disposition, signals the launcher, waits to be told, leaves 128 + the number."""
    (args.out / f"rank{local_rank}").write_text(str(signal.getsignal(signal.SIGINT) is signal.SIG_IGN))
    if local_rank == 0:
        os.kill(os.getppid(), args.number)
    link.status.value = 128 + wait_for_request(link)


def fail(local_rank: int, args: argparse.Namespace, link: RankLink) -> None:
    raise SystemExit(3 + local_rank)


def start_forever(local_rank: int, args: argparse.Namespace, link: RankLink) -> None:
    """A rank that never reaches training (as one waiting for a peer): only being terminated ends it."""
    (args.out / f"rank{local_rank}").write_text("started")
    if local_rank == 0:
        os.kill(os.getppid(), signal.SIGINT)
        time.sleep(0.5)
        os.kill(os.getppid(), signal.SIGINT)  # a second Ctrl-C: the ranks are terminated
    time.sleep(120)


def sleep_forever() -> None:
    time.sleep(120)


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_ranks_start_ignoring_sigint_and_the_launcher_notes_a_signal_and_returns_their_status(tmp_path, number):
    previous = [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)]
    namespace = argparse.Namespace(out=tmp_path, number=number)
    assert launch_ranks(signal_the_launcher, namespace, "gloo", 2) == 128 + number
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["True", "True"]
    assert [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)] == previous  # put back


@pytest.mark.slow
def test_other_children_of_the_caller_are_not_taken_for_ranks(tmp_path):
    """The SIGINT disposition is switched only once the ranks themselves run, whatever else the caller runs."""
    other = multiprocessing.get_context("spawn").Process(target=sleep_forever, daemon=True)
    other.start()
    try:
        namespace = argparse.Namespace(out=tmp_path, number=signal.SIGINT)
        assert launch_ranks(signal_the_launcher, namespace, "gloo", 2) == 130
        assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["True", "True"]
        assert other.is_alive()  # and it is left alone
    finally:
        other.kill()


@pytest.mark.slow
def test_a_second_ctrl_c_terminates_ranks_that_never_reach_training_and_is_reported_as_itself(tmp_path):
    start = time.monotonic()
    with pytest.raises(StopNow) as ended:
        launch_ranks(start_forever, argparse.Namespace(out=tmp_path), "gloo", 2)
    assert ended.value.signal_name == "SIGINT"  # what the user sent, not the SIGTERM the ranks got
    assert isinstance(ended.value.__cause__, ProcessExitedException)
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_a_failing_rank_is_raised_in_the_caller(tmp_path):
    with pytest.raises(ProcessExitedException) as failure:
        launch_ranks(fail, argparse.Namespace(), "gloo", 2)
    assert failure.value.exit_code in (3, 4)


def record_the_rendezvous(local_rank: int, args: argparse.Namespace, link: RankLink) -> None:
    import torch.distributed as dist

    (args.out / f"rank{local_rank}").write_text(f"{os.environ['MASTER_PORT']} {dist.get_world_size()}")


@pytest.mark.slow
def test_ranks_meet_on_a_free_port_when_ignites_default_one_is_taken(tmp_path, monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with socket.socket() as other_program:  # another run's ranks (or anything) on Ignite's default port
        other_program.bind(("127.0.0.1", 2222))
        other_program.listen()
        assert launch_ranks(record_the_rendezvous, argparse.Namespace(out=tmp_path), "gloo", 2) == 0
    seen = {(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)}
    assert len(seen) == 1 and seen.pop().split()[1] == "2"
    chosen = free_port()
    monkeypatch.setenv("MASTER_PORT", str(chosen))  # the user's port is kept
    assert launch_ranks(record_the_rendezvous, argparse.Namespace(out=tmp_path), "gloo", 2) == 0
    assert (tmp_path / "rank0").read_text() == f"{chosen} 2"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
