"""engine_opt.app.launcher: spawned ranks ignore SIGINT while they start; the launcher notes it for them."""

from __future__ import annotations

import argparse
import os
import signal

import pytest
from torch.multiprocessing.spawn import ProcessExitedException

from engine_opt.app.launcher import RankLink, launch_ranks


def interrupt_the_launcher(local_rank: int, args: argparse.Namespace, link: RankLink) -> None:
    """Each rank records its SIGINT disposition, sends SIGINT to the launcher, waits to be told, leaves 130."""
    (args.out / f"rank{local_rank}").write_text(str(signal.getsignal(signal.SIGINT) is signal.SIG_IGN))
    os.kill(os.getppid(), signal.SIGINT)
    if not link.stop.wait(timeout=60):
        raise RuntimeError("the launcher never set stop")
    link.status.value = 130


def fail(local_rank: int, args: argparse.Namespace, link: RankLink) -> None:
    raise SystemExit(3 + local_rank)


@pytest.mark.slow
def test_ranks_start_ignoring_sigint_which_the_launcher_notes_and_their_status_is_returned(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    assert launch_ranks(interrupt_the_launcher, argparse.Namespace(out=tmp_path), "gloo", 2) == 130
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["True", "True"]
    assert signal.getsignal(signal.SIGINT) is previous  # put back


@pytest.mark.slow
def test_a_failing_rank_is_raised_in_the_caller(tmp_path):
    with pytest.raises(ProcessExitedException) as failure:
        launch_ranks(fail, argparse.Namespace(), "gloo", 2)
    assert failure.value.exit_code in (3, 4)
