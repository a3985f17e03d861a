"""The ``engine-opt`` command: train a built-in synthetic task with any wrapper configuration.

    engine-opt train                                   # classifier, fp32, a few seconds on 2 CPU cores
    engine-opt train --dtype bf16 --accumulate 4 --clip-norm 1.0
    engine-opt train --task gan --dtype fp16
    engine-opt train --config wrapper.json             # a build_optim_wrapper config, as JSON
    engine-opt train --resume                          # continue from the newest checkpoint
    engine-opt train --nproc-per-node 2                # data-parallel (DDP) in 2 processes
    torchrun --nproc-per-node 2 -m engine_opt train    # the same, launched by torchrun (or across machines)

It shows a progress bar, logs to TensorBoard, checkpoints, and ends with a
summary. Bad options end with a message and exit status 2.

Distributed runs go through ``ignite.distributed``: ``idist.Parallel``
spawns the processes (or joins those ``torchrun`` started), ``auto_model``
wraps the networks in ``DistributedDataParallel`` and each rank trains on its
share of every global batch (``--batch-size`` is the global batch size). Rank
0 alone logs, shows progress, writes checkpoints and prints the summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import ignite.distributed as idist
import torch
from ignite.distributed.launcher import Parallel
from ignite.engine import Engine, Events
from ignite.handlers.tensorboard_logger import OutputHandler, TensorboardLogger
from torch.multiprocessing.spawn import ProcessExitedException

from . import __version__
from .build import build_optim_wrapper
from .events import OptimEvents
from .handlers import (
    NonFiniteGuard,
    OptimParamsHandler,
    ResumableLoader,
    SchedulerHandler,
    attach_checkpoint,
    attach_progress_bar,
    latest_checkpoint,
    resume_from_latest,
)
from .parallel import world_size
from .tasks import TASKS, Task, make_task
from .trainer import create_trainer
from .wrapper import OptimWrapper
from .wrapper_dict import OptimWrapperDict

_DTYPES = ("fp32", "bf16", "fp16")
_WRAPPER_FLAGS = ("wrapper", "dtype", "accumulate", "clip_norm", "optimizer", "lr")


class UsageError(Exception):
    """A bad option or config: reported as a message, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``engine-opt``."""
    parser = argparse.ArgumentParser(prog="engine-opt", description="Train with engine_opt's optimizer wrappers.")
    parser.add_argument("--version", action="version", version=f"engine-opt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a built-in synthetic task (no downloads)")
    task = train.add_argument_group("task")
    task.add_argument("--task", choices=TASKS, default="classifier", help="what to train (default: classifier)")
    task.add_argument("--epochs", type=_positive_int, default=5, help="epochs to train, in total (default: 5)")
    task.add_argument(
        "--batch-size",
        type=_positive_int,
        default=64,
        help="batch size of one iteration, over all processes (default: 64)",
    )
    task.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default: 0)")
    task.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parallel = train.add_argument_group("distributed (ignite.distributed)")
    parallel.add_argument(
        "--nproc-per-node", type=_positive_int, help="spawn this many data-parallel processes (default: 1)"
    )
    parallel.add_argument(
        "--backend", choices=("gloo", "nccl"), help="torch.distributed backend (default: nccl on GPUs, else gloo)"
    )
    wrapper = train.add_argument_group("wrapper (or --config)")
    wrapper.add_argument("--config", type=Path, help="a JSON file holding a build_optim_wrapper config")
    wrapper.add_argument("--wrapper", choices=("OptimWrapper", "AmpOptimWrapper"), help="wrapper type")
    wrapper.add_argument("--dtype", choices=_DTYPES, help="fp32, or bf16/fp16 mixed precision (default: fp32)")
    wrapper.add_argument("--accumulate", type=_positive_int, help="micro-batches per update (default: 1)")
    wrapper.add_argument("--clip-norm", type=_positive_float, help="clip the gradient norm to this value")
    wrapper.add_argument("--optimizer", help="any torch.optim name (default: the task's)")
    wrapper.add_argument("--lr", type=_positive_float, help="learning rate (default: the task's)")
    strategies = train.add_argument_group("strategies")
    strategies.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="lr schedule")
    strategies.add_argument(
        "--nonfinite", choices=("off", "skip", "stop"), default="off", help="guard against nan/inf updates"
    )
    output = train.add_argument_group("output")
    output.add_argument("--log-dir", type=Path, help="TensorBoard log directory (default: runs/TASK)")
    output.add_argument("--checkpoint-dir", type=Path, help="checkpoint directory (default: LOG_DIR/checkpoints)")
    output.add_argument("--checkpoint-every", type=_positive_int, help="save every N iterations (default: each epoch)")
    output.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _load_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except OSError as error:
        raise UsageError(f"--config: cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--config: {path} is not valid JSON: {error}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--config: {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def wrapper_config(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    """The ``build_optim_wrapper`` config that the options describe."""
    if args.config is not None:
        given = [f"--{flag.replace('_', '-')}" for flag in _WRAPPER_FLAGS if getattr(args, flag) is not None]
        if given:
            raise UsageError(f"--config holds the whole wrapper config; drop {', '.join(given)} or edit the file")
        return _load_config(args.config)
    if args.wrapper == "OptimWrapper" and args.dtype in ("bf16", "fp16"):
        raise UsageError(f"--dtype {args.dtype} needs --wrapper AmpOptimWrapper (or no --wrapper)")
    if task.make_train_step is None:
        return _one_config(args, task.default_cfg)
    return {name: _one_config(args, default) for name, default in task.default_cfg.items()}


def _one_config(args: argparse.Namespace, default: dict[str, Any]) -> dict[str, Any]:
    amp = args.wrapper == "AmpOptimWrapper" or args.dtype in ("bf16", "fp16")
    cfg: dict[str, Any] = {"type": "AmpOptimWrapper" if amp else "OptimWrapper"}
    cfg["optimizer"] = dict(default["optimizer"])
    if args.optimizer is not None:
        cfg["optimizer"] = {"type": args.optimizer, "lr": cfg["optimizer"]["lr"]}
    if args.lr is not None:
        cfg["optimizer"]["lr"] = args.lr
    if amp and args.dtype is not None:
        cfg["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]
    if args.accumulate is not None:
        cfg["accumulative_counts"] = args.accumulate
    if args.clip_norm is not None:
        cfg["clip_grad"] = {"max_norm": args.clip_norm}
    return cfg


def _build(args: argparse.Namespace, task: Task) -> OptimWrapper | OptimWrapperDict:
    cfg = wrapper_config(args, task)
    try:
        return build_optim_wrapper(task.model, cfg)
    except (TypeError, ValueError) as error:
        source = f"--config {args.config}" if args.config is not None else "the wrapper options"
        raise UsageError(f"{source}: {error}") from None


def _schedulers(args: argparse.Namespace, wrappers: list[OptimWrapper], iterations: int) -> list[Any]:
    if args.schedule == "constant":
        return []
    return [
        torch.optim.lr_scheduler.CosineAnnealingLR(
            wrapper.optimizer, T_max=max(1, -(-iterations // wrapper.accumulative_counts))
        )
        for wrapper in wrappers
    ]


class _LossTracker:
    """Mean of each loss over the last epoch, summed on the device and read once at the end."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def reset(self, engine: Engine) -> None:
        self.sums, self.count = {}, 0

    def update(self, engine: Engine) -> None:
        values: dict[str, torch.Tensor] = _as_losses(engine.state.output)
        for name in self.names:
            value = values[name].detach().float()
            self.sums[name] = value if name not in self.sums else self.sums[name] + value
        self.count += 1

    def means(self) -> dict[str, float]:
        """The means over all ranks (a collective call in a distributed run)."""
        means = {name: total / max(self.count, 1) for name, total in self.sums.items()}
        if world_size() > 1:
            means = {name: cast(torch.Tensor, idist.all_reduce(mean)) / world_size() for name, mean in means.items()}
        return {name: mean.item() for name, mean in means.items()}


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``engine-opt train``; return the summary's figures."""
    device = _device(args)
    log_dir = args.log_dir or Path("runs") / args.task
    checkpoint_dir = args.checkpoint_dir or log_dir / "checkpoints"
    if not args.resume and latest_checkpoint(checkpoint_dir) is not None:
        raise UsageError(
            f"{checkpoint_dir} holds checkpoints of an earlier run; pass --resume to continue it, "
            "or choose another --checkpoint-dir"
        )

    task = make_task(args.task, args.seed, args.batch_size)  # the same data and weights on every rank
    task.model.to(device)
    if world_size() > 1:
        torch.manual_seed(args.seed + idist.get_rank())  # each rank its own dropout and noise
        random.seed(args.seed + idist.get_rank())
    optim_wrapper = _build(args, task)
    members = list(optim_wrapper.values()) if isinstance(optim_wrapper, OptimWrapperDict) else [optim_wrapper]
    data = ResumableLoader(task.data)
    if task.make_train_step is not None:
        try:
            train_step = task.make_train_step(optim_wrapper, _parallel_model)
        except ValueError as error:
            raise UsageError(f"--config {args.config}: {error}") from None
        trainer = create_trainer(task.model, optim_wrapper, train_step=train_step)
    else:
        trainer = create_trainer(_parallel_model(task.model), optim_wrapper, task.loss_fn, device=device)
    schedulers = _schedulers(args, members, args.epochs * len(data))
    for scheduler in schedulers:
        SchedulerHandler(scheduler).attach(trainer)
    if args.nonfinite != "off":
        NonFiniteGuard(args.nonfinite).attach(trainer)

    to_save: dict[str, Any] = {"model": task.model, "optim_wrapper": optim_wrapper, "trainer": trainer, "data": data}
    to_save.update({f"scheduler_{index}": scheduler for index, scheduler in enumerate(schedulers)})
    try:
        resumed = resume_from_latest(to_save, checkpoint_dir) if args.resume else None
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"--resume: {error}; resume with the options of the interrupted run") from None
    if args.resume and resumed is None:
        print(f"engine-opt: no checkpoint in {checkpoint_dir}; starting a new run", file=sys.stderr)
    if resumed is not None and trainer.state.max_epochs is not None and args.epochs < trainer.state.max_epochs:
        raise UsageError(f"--epochs {args.epochs} is less than the resumed run's {trainer.state.max_epochs}")
    if resumed is not None and trainer.state.epoch >= args.epochs:  # Ignite would start a finished run over
        raise UsageError(
            f"the run in {checkpoint_dir} is complete ({trainer.state.epoch} epochs); "
            f"pass --epochs above {trainer.state.epoch} to train it further"
        )

    tracker = _LossTracker(task.loss_names)
    trainer.add_event_handler(Events.EPOCH_STARTED, tracker.reset)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, tracker.update)
    checkpoint = attach_checkpoint(trainer, to_save, checkpoint_dir, every=args.checkpoint_every)  # rank 0 writes
    tb_logger = None
    if idist.get_rank() == 0:
        tb_logger = TensorboardLogger(log_dir=str(log_dir))
        tb_logger.attach(trainer, OptimParamsHandler(optim_wrapper), OptimEvents.OPTIM_STEP_COMPLETED(every=10))
        tb_logger.attach(
            trainer,
            OutputHandler(
                tag="train", output_transform=_as_losses, global_step_transform=lambda e, _: e.state.iteration
            ),
            Events.ITERATION_COMPLETED(every=10),
        )
        if not args.no_progress:
            attach_progress_bar(trainer, optim_wrapper, every=5, persist=True)

    start = time.perf_counter()
    try:
        state = trainer.run(data, max_epochs=args.epochs)
    finally:
        if tb_logger is not None:
            tb_logger.close()
    return {
        "task": args.task,
        "epochs": state.epoch,
        "iterations": state.iteration,
        "seconds": time.perf_counter() - start,
        "losses": tracker.means(),
        "processes": world_size(),
        "applied": sum(wrapper.applied_steps for wrapper in members),
        "skipped": sum(wrapper.skipped_steps for wrapper in members),
        "log_dir": log_dir,
        "checkpoint": checkpoint.last_checkpoint,
        "resumed_from": resumed,
    }


def _device(args: argparse.Namespace) -> torch.device:
    if world_size() > 1:  # each rank's device is chosen by ignite.distributed
        device = idist.device()
        if args.device is not None and torch.device(args.device).type != device.type:
            raise UsageError(f"--device {args.device}: this distributed run places each rank on {device.type}")
        return device
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    return device


def _parallel_model(model: torch.nn.Module) -> torch.nn.Module:
    """``idist.auto_model(model)`` (DDP) in a distributed run; the model itself in one process."""
    return idist.auto_model(model) if world_size() > 1 else model


def _as_losses(output: Any) -> dict[str, Any]:
    return dict(output) if isinstance(output, dict) else {"loss": output}


def summary(result: dict[str, Any]) -> str:
    """The lines printed at the end of ``engine-opt train``."""
    losses = ", ".join(f"{name} {value:.4f}" for name, value in result["losses"].items())
    processes = f" on {result['processes']} processes" if result["processes"] > 1 else ""
    lines = [
        f"engine-opt: trained {result['task']} to epoch {result['epochs']} "
        f"({result['iterations']} iterations) in {result['seconds']:.1f} s{processes}",
    ]
    if result["resumed_from"] is not None:
        lines.append(f"  resumed from:     {result['resumed_from']}")
    lines += [
        f"  last epoch loss:  {losses}",
        f"  updates:          {result['applied']} applied, {result['skipped']} skipped",
        f"  checkpoint:       {result['checkpoint']}",
        f"  TensorBoard logs: {result['log_dir']}   (view: tensorboard --logdir {result['log_dir']})",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``engine-opt`` and ``python -m engine_opt``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    distributed = args.nproc_per_node is not None or "WORLD_SIZE" in os.environ  # spawn, or under torchrun
    if not distributed:
        status = _run(args)
        if status:
            raise SystemExit(status)
        return 0
    backend = args.backend or ("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        parser.exit(2, "engine-opt: error: --backend nccl needs GPUs; use --backend gloo on CPU\n")
    try:
        with Parallel(backend=backend, nproc_per_node=args.nproc_per_node) as launcher:
            launcher.run(_worker, args)
    except ProcessExitedException as error:  # a spawned rank exited with an error status
        parser.exit(error.exit_code, "")
    return 0


def _worker(local_rank: int, args: argparse.Namespace) -> None:
    """One rank of a distributed run: exit with ``_run``'s status if it is not 0."""
    status = _run(args)
    # The run's objects (DDP's reducer among them) sit in reference cycles; free them while the process
    # group still exists, or its threads are torn down at interpreter exit and the process aborts.
    gc.collect()
    if status:
        sys.exit(status)


def _run(args: argparse.Namespace) -> int:
    """Train, print the summary (rank 0), return the exit status."""
    name = "engine-opt" if world_size() == 1 else f"engine-opt (rank {idist.get_rank()})"
    try:
        result = train(args)
    except UsageError as error:
        return _fail(2, f"{name}: error: {error}")
    except FloatingPointError as error:
        return _fail(1, f"{name}: training stopped: {error}")
    except OSError as error:  # an unwritable log or checkpoint directory, a full disk
        return _fail(1, f"{name}: error: {error}")
    if idist.get_rank() == 0:
        print(summary(result))
    return 0


def _fail(status: int, message: str) -> int:
    print(message, file=sys.stderr)
    return status
