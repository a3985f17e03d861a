"""The ``engine-opt`` command: train your model, or a built-in synthetic task, with any wrapper configuration.

    engine-opt train                                   # classifier, fp32, a few seconds on 2 CPU cores
    engine-opt train --dtype bf16 --accumulate 4 --clip-norm 1.0
    engine-opt train --task gan --dtype fp16
    engine-opt train --config wrapper.json             # a build_optim_wrapper config, as JSON
    engine-opt train --config my_run.py                # your model and data: a Python run config
    engine-opt train --resume                          # continue from the newest checkpoint
    engine-opt train --nproc-per-node 2                # data-parallel (DDP) in 2 processes
    torchrun --nproc-per-node 2 -m engine_opt train    # the same, launched by torchrun (or across machines)

It shows a progress bar, logs to TensorBoard, checkpoints, and ends with a
summary. Exit status: 0 done; 2 bad options (a message says which) or a
checkpoint directory another run holds (refused before the set-up); 1 an
error (an unwritable or full disk) or a run a
guard stopped (``--nonfinite stop``; ``--spike-guard rollback`` after its
last rollback, which saves the last good state first); 130 or 143 stopped
by SIGINT or SIGTERM: at an iteration's end with a checkpoint to
``--resume`` from, or, on a second signal before that iteration ended, at
once (even during a save, which then leaves the checkpoint before it), with
the newest checkpoint named.

Distributed runs go through ``ignite.distributed``: ``idist.Parallel``
spawns the processes (or joins those ``torchrun`` started), ``auto_model``
wraps the networks in ``DistributedDataParallel`` and each rank trains on its
share of every global batch (``--batch-size`` is the global batch size). Rank
0 alone logs, shows progress, writes checkpoints and prints the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.distributed.launcher import Parallel
from torch.multiprocessing.spawn import ProcessExitedException

from ..checkpoint import RunDirectoryBusy, RunDirectoryConflict, latest_checkpoint
from ..handlers import SpikesPersist
from ..optim.distributed import rank, world_size
from .arguments import DEFAULT_BATCH_SIZE, build_parser, is_python_config
from .config import UsageError
from .launcher import FromLauncher, RankLink, launch_ranks
from .report import summary
from .run_directories import raised_by_tensorboard
from .signals import EXIT_STATUS, StopNow, StopRequest
from .train import check_batch_size, run_paths, train


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``engine-opt`` and ``python -m engine_opt``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with _quiet_unless_verbose(args):
        status = _launch(parser, args)
    if status:
        raise SystemExit(status)
    return 0


def entry() -> None:
    """The ``engine-opt`` executable: ``main``, and a process that ends quietly once a signal stopped the run.

    After a run a signal stopped, its checkpoint saved and the line printed, a
    further Ctrl-C while the interpreter shuts down would print a traceback:
    the process ignores SIGINT and SIGTERM from then on (it is ending anyway).
    """
    try:
        main()
    except SystemExit as end:
        if end.code in EXIT_STATUS.values():
            for number in (signal.SIGINT, signal.SIGTERM):
                signal.signal(number, signal.SIG_IGN)
        raise


def _launch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run in this process, or spawn the ranks and wait for them; the exit status."""
    under_torchrun = all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    distributed = args.nproc_per_node is not None or under_torchrun
    if not distributed:
        return _run(args)
    if args.nproc_per_node is not None and not is_python_config(args.config):  # refused before the processes start
        try:
            check_batch_size(args.batch_size or DEFAULT_BATCH_SIZE, args.nproc_per_node)
        except UsageError as error:
            return _fail(2, f"engine-opt: error: {error}")
    backend = args.backend or ("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        parser.exit(2, "engine-opt: error: --backend nccl needs GPUs; use --backend gloo on CPU\n")
    if args.nproc_per_node is None:  # under torchrun: this process is one of the ranks
        try:
            with Parallel(backend=backend) as parallel:
                parallel.run(_worker, args, None)
        except KeyboardInterrupt:  # while the process group forms
            return _fail(EXIT_STATUS["SIGINT"], "engine-opt: interrupted by SIGINT before training; nothing was saved")
        return 0
    try:
        return launch_ranks(_worker, args, backend, args.nproc_per_node)
    except StopNow as stop:
        return _stopped_now(args, stop)
    except ProcessExitedException as error:  # a spawned rank ended with an error status, or was killed
        if error.signal_name is None:  # the rank printed why
            return error.exit_code
        number = int(getattr(signal, error.signal_name))
        print(
            f"engine-opt: rank {error.error_index} was killed by {error.signal_name}; the run "
            "stopped there (resume it from its last checkpoint with --resume)",
            file=sys.stderr,
        )
        return 128 + number


def _worker(local_rank: int, args: argparse.Namespace, link: RankLink | None) -> None:
    """One rank of a distributed run: a signal's status left to the launcher that spawned it, any other exits."""
    with _quiet_unless_verbose(args):
        status = _run(args, None if link is None else FromLauncher(link))
    # The run's objects (DDP's reducer among them) sit in reference cycles; free them while the process
    # group still exists, or its threads are torn down at interpreter exit and the process aborts.
    gc.collect()
    if link is not None and status in EXIT_STATUS.values():  # every rank stopped on it at the same iteration
        link.status.value = status
    elif status:
        sys.exit(status)


@contextlib.contextmanager
def _quiet_unless_verbose(args: argparse.Namespace) -> Iterator[None]:
    """While the command runs: Ignite's and torch's INFO messages on stderr with ``--verbose``, else none.

    Without it, INFO messages (Ignite's multi-line launcher dumps) are off, and
    so are Ignite's own logs of the errors the command reports. With
    it, a handler on the ``ignite`` and ``torch`` loggers prints them; both are
    put back as they were when the command ends.
    """
    if not args.verbose:
        # Ignite logs the error that ends a run, and TensorBoard's writer thread prints its own, before they
        # reach the command, which prints one line for each
        quiet = logging.NullHandler()
        logging.getLogger("ignite").addHandler(quiet)
        logging.disable(logging.INFO)
        previous_hook = threading.excepthook
        threading.excepthook = functools.partial(_quiet_log_writer, previous_hook)
        try:
            yield
        finally:
            threading.excepthook = previous_hook
            logging.disable(logging.NOTSET)
            logging.getLogger("ignite").removeHandler(quiet)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("ignite", "torch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def _quiet_log_writer(previous: Callable[[threading.ExceptHookArgs], Any], hook: threading.ExceptHookArgs) -> None:
    """A thread's uncaught exception, printed unless it is TensorBoard's writer failing to write (a full disk):
    the training thread raises that one again, and the command reports it."""
    if not (isinstance(hook.exc_value, OSError) and raised_by_tensorboard(hook.exc_traceback)):
        previous(hook)


def _run(args: argparse.Namespace, stop: StopRequest | None = None) -> int:
    """Train, print the summary (rank 0), return the exit status."""
    name = "engine-opt" if world_size() == 1 else f"engine-opt (rank {rank()})"
    try:
        result = train(args, stop)
    except StopNow as now:
        return _stopped_now(args, now)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, which StopOnSignal covers
        status = EXIT_STATUS["SIGINT"] if stop is None else 1  # a spawned rank's is no stop the ranks agreed on
        saved = _newest_saved(args) or "; nothing was saved for it"
        return _fail(status, f"{name}: interrupted by SIGINT outside the training loop{saved}")
    except (UsageError, RunDirectoryBusy) as error:  # a directory another run holds, found once set up
        return _fail(2, f"{name}: error: {error}")
    except (FloatingPointError, SpikesPersist) as error:  # a guard stopped the run
        return _fail(1, f"{name}: training stopped: {error}")
    except OSError as error:  # an unwritable directory, a full disk: what is saved stays
        return _fail(1, f"{name}: error: {error}{_newest_saved(args)}")
    except RunDirectoryConflict as error:
        return _fail(1, f"{name}: error: {error}")
    if rank() == 0:
        print(summary(result), file=sys.stderr if result.stopped_by else sys.stdout)
    return EXIT_STATUS.get(result.stopped_by or "", 0)


def _newest(args: argparse.Namespace) -> Path | None:
    """The run's newest checkpoint (None if none, or if the directory cannot be read: said elsewhere)."""
    _, checkpoint_dir = run_paths(args)
    try:
        return latest_checkpoint(checkpoint_dir, kind="file") if checkpoint_dir.is_dir() else None
    except OSError:
        return None


def _newest_saved(args: argparse.Namespace) -> str:
    newest = _newest(args)
    return "" if newest is None else f"; the newest checkpoint is {newest} (--resume continues from it)"


def _stopped_now(args: argparse.Namespace, stop: StopNow) -> int:
    """A second signal stopped the run before its iteration ended: say so, and what is saved."""
    newest = _newest(args)
    during = "" if stop.iteration is None else f" during iteration {stop.iteration}, before it ended"
    saved = f"the newest checkpoint is {newest}; continue from it with --resume" if newest else "nothing is saved"
    return _fail(
        EXIT_STATUS[stop.signal_name], f"engine-opt: stopped at once by a second {stop.signal_name}{during}; {saved}"
    )


def _fail(status: int, message: str) -> int:
    print(message, file=sys.stderr)
    return status
