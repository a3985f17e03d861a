"""``engine-opt train``, step by step: build the run, resume it, attach its handlers, run it, report.

Examples:
    >>> import tempfile
    >>> from engine_opt.app.cli import build_parser
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     args = build_parser().parse_args(["train", "--epochs", "1", "--no-progress", "--log-dir", directory])
    ...     result = train(args)
    >>> result.iterations, result.applied
    (64, 64)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.tensorboard_logger import OutputHandler, TensorboardLogger
from torch.utils.data import DataLoader, DistributedSampler

from ..checkpoint import DamagedCheckpoint, RunDirectory, attach_checkpoint, resume_from_latest
from ..engine import ResumableLoader, sampled_total
from ..engine.events import OptimEvents, member_filter
from ..engine.trainer import Trainer, create_trainer
from ..handlers import (
    NonFiniteGuard,
    OptimParamsHandler,
    SchedulerHandler,
    SpikeGuard,
    SpikesPersist,
    UpdateTelemetryHandler,
    attach_progress_bar,
)
from ..optim import build_optim_wrapper
from ..optim.distributed import gather_objects, rank, world_size
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict, members
from .config import UsageError, wrapper_config
from .run_directories import check_run_directories, logs_named, mark, saved_there_before, way_past_damage
from .run_options import RunOptions
from .signals import StopOnSignal, StopRequest
from .tasks import Task, make_task


@dataclass
class Run:
    """Everything one ``engine-opt train`` trains and saves."""

    task: Task
    optim_wrapper: OptimWrapper | OptimWrapperDict
    trainer: Trainer
    data: ResumableLoader
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    options: RunOptions
    log_dir: Path
    checkpoint_dir: Path
    spike_guard: SpikeGuard | None = None

    def to_save(self) -> dict[str, Any]:
        """What a checkpoint holds, by name; the run's options first, so a resume names what differs first."""
        saved: dict[str, Any] = {"run": self.options, "model": self.task.model, "optim_wrapper": self.optim_wrapper}
        saved.update(trainer=self.trainer, data=self.data)
        saved.update({f"scheduler_{index}": scheduler for index, scheduler in enumerate(self.schedulers)})
        if self.spike_guard is not None:
            saved["spike_guard"] = self.spike_guard
        return saved


@dataclass
class Result:
    """What the summary reports."""

    task: str
    epochs: int
    iterations: int
    seconds: float
    losses: dict[str, float]
    processes: int
    applied: int
    skipped: int
    log_dir: Path
    checkpoint: str | None
    resumed_from: Path | None = field(default=None)
    stopped_by: str | None = field(default=None)
    loss_iterations: tuple[int, int] | None = field(default=None)
    """Of the last epoch, the iterations its losses cover and its length, where they differ (a resume mid-epoch)."""


def train(args: argparse.Namespace, stop: StopRequest | None = None) -> Result:
    """Run ``engine-opt train``; return what the summary reports.

    The run is built first, so bad options are refused before anything is
    written; then its checkpoint directory is held to the end, and whether it
    may write there is decided while it is held. ``stop``, set by the
    launcher of spawned ranks on SIGINT, stops the run as the signal would.
    """
    threads = torch.get_num_threads()
    try:
        return _train(args, stop)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) get their setting back


def _train(args: argparse.Namespace, stop: StopRequest | None) -> Result:
    # here, not in build: train() gives the caller's count back, build() leaves nothing changed behind it
    if args.threads is not None or (_device(args).type == "cpu" and "OMP_NUM_THREADS" not in os.environ):
        torch.set_num_threads(args.threads or 1)
    run = build(args)
    if rank() == 0:
        _note_repeated_samples(run.task.data)
    # as rank 0 sees it, before it takes and marks it
    existed, used_before = gather_objects(
        (run.checkpoint_dir.exists(), saved_there_before(run.log_dir, run.checkpoint_dir))
    )[0]
    directory = RunDirectory(run.checkpoint_dir)
    try:
        with directory.lock() if rank() == 0 else contextlib.nullcontext():
            check_run_directories(args, run.log_dir, run.checkpoint_dir, used_before)
            if rank() == 0:
                mark(run.log_dir, run.checkpoint_dir)
            resumed = resume(run, args)
            return execute(run, args, resumed, stop)
    except UsageError:
        if rank() == 0 and not existed:  # a refused run leaves no directory it made
            directory.discard_if_unused()
        raise


def _note_repeated_samples(data: DataLoader[Any]) -> None:
    """Say so where the ``DistributedSampler`` repeats samples to give every process as many."""
    sampler = data.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return
    samples, processes = len(sampler.dataset), sampler.num_replicas  # type: ignore[arg-type]
    extra = sampled_total(samples, processes, drop_last=False) - samples
    if extra:
        exact = [count for count in range(1, 65) if samples % count == 0]
        print(
            f"engine-opt: note: {samples} samples over {processes} processes: each epoch repeats {extra} of them "
            f"(DistributedSampler's padding); every sample once per epoch on {', '.join(map(str, exact[:6]))}, ... "
            "processes",
            file=sys.stderr,
        )


def run_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The TensorBoard log directory and the checkpoint directory the options name."""
    log_dir = args.log_dir or Path("runs") / args.task
    return log_dir, args.checkpoint_dir or log_dir / "checkpoints"


def execute(run: Run, args: argparse.Namespace, resumed: Path | None, stop: StopRequest | None = None) -> Result:
    """Attach the handlers, run to the end (or to a SIGINT/SIGTERM), and gather what the summary reports."""
    tracker, checkpoint, tb_logger = attach_handlers(run, args)
    start = time.perf_counter()
    with StopOnSignal(run.trainer, stop) as signals:  # to the logs' close: a signal then is only noted
        try:
            with logs_named(run.log_dir):
                state = run.trainer.run(run.data, max_epochs=args.epochs)
        except SpikesPersist as error:  # the guard rolled the run back to its last good state: keep that
            checkpoint(run.trainer)
            raise SpikesPersist(f"{error}; its last good state is saved in {checkpoint.last_checkpoint}") from None
        finally:
            if tb_logger is not None:
                with logs_named(run.log_dir):
                    tb_logger.close()
    return Result(
        task=args.task,
        epochs=state.epoch,
        iterations=state.iteration,
        seconds=time.perf_counter() - start,
        losses=tracker.means(),
        processes=world_size(),
        applied=sum(wrapper.applied_steps for _, wrapper in members(run.optim_wrapper)),
        skipped=sum(wrapper.skipped_steps for _, wrapper in members(run.optim_wrapper)),
        log_dir=run.log_dir,
        checkpoint=None if checkpoint.last_checkpoint is None else str(checkpoint.last_checkpoint),
        resumed_from=resumed,
        stopped_by=signals.received,
        loss_iterations=None if tracker.count in (0, len(run.data)) else (tracker.count, len(run.data)),
    )


def build(args: argparse.Namespace) -> Run:
    """The task, its wrapper(s) from the options, the trainer and its schedules; nothing attached yet."""
    device = _device(args)
    log_dir, checkpoint_dir = run_paths(args)
    check_batch_size(args.batch_size, world_size())
    task = make_task(args.task, args.seed, args.batch_size)  # the same data and weights on every rank
    task.model.to(device)
    if world_size() > 1:
        torch.manual_seed(args.seed + rank())  # each rank its own dropout and noise
        random.seed(args.seed + rank())
    wrapper_cfg = wrapper_config(args, task)
    optim_wrapper = _build_wrappers(args, task, wrapper_cfg)
    data = ResumableLoader(task.data)
    trainer = _build_trainer(args, task, optim_wrapper, device)
    schedulers = _schedulers(args.schedule, optim_wrapper, args.epochs * len(data))
    options = RunOptions(
        args.task,
        args.batch_size,
        args.seed,
        world_size(),
        wrapper_cfg,
        args.schedule,
        args.epochs,
        args.num_items,
        args.spike_guard,
        config=None if args.config is None else str(args.config),
    )
    run = Run(task, optim_wrapper, trainer, data, schedulers, options, log_dir, checkpoint_dir)
    if args.spike_guard != "off":  # a rollback restores the model and the schedules; the wrappers it restores itself
        restore = {"model": task.model, **{f"scheduler_{i}": scheduler for i, scheduler in enumerate(schedulers)}}
        run.spike_guard = SpikeGuard(args.spike_guard, restore=restore)
    return run


def check_batch_size(batch_size: int, processes: int) -> None:
    """``--batch-size`` is the batch of one iteration over all processes: each takes an equal share."""
    if batch_size % processes:
        raise UsageError(
            f"--batch-size {batch_size} is the batch of one iteration over all {processes} processes; "
            f"it must be a multiple of {processes}"
        )


def resume(run: Run, args: argparse.Namespace) -> Path | None:
    """Load the newest checkpoint with ``--resume``; refuse one that does not fit or is already complete."""
    if not args.resume:
        return None
    try:
        resumed = resume_from_latest(run.to_save(), run.checkpoint_dir, kind="file")
    except DamagedCheckpoint as error:
        raise UsageError(f"--resume: {error}; {way_past_damage(run.checkpoint_dir)}") from None
    except (ValueError, RuntimeError) as error:
        # a message listing differences one per line gets the advice on a line of its own
        advice = (
            "\nresume with the options of the interrupted run"
            if "\n" in str(error)
            else "; resume with the options of the interrupted run"
        )
        raise UsageError(f"--resume: {error}{advice}") from None
    if resumed is None:
        print(f"engine-opt: no checkpoint in {run.checkpoint_dir}; starting the run from the start", file=sys.stderr)
        return None
    state = run.trainer.state
    if state.max_epochs is not None and args.epochs < state.max_epochs:
        raise UsageError(f"--epochs {args.epochs} is less than the resumed run's {state.max_epochs}")
    if state.epoch >= args.epochs:  # Ignite would start a finished run over
        raise UsageError(
            f"the run in {run.checkpoint_dir} is complete ({state.epoch} epochs); "
            f"pass --epochs above {state.epoch} to train it further"
        )
    return resumed


def attach_handlers(run: Run, args: argparse.Namespace) -> tuple[LossTracker, Checkpoint, TensorboardLogger | None]:
    """Schedules, the guard, the loss tracker and checkpoints on every rank; logs and progress on rank 0."""
    trainer = run.trainer
    for scheduler in run.schedulers:
        SchedulerHandler(scheduler).attach(trainer)
    nonfinite = None if args.nonfinite == "off" else NonFiniteGuard(args.nonfinite)
    if nonfinite is not None:
        nonfinite.attach(trainer)
    if run.spike_guard is not None:
        run.spike_guard.attach(trainer)
    tracker = LossTracker(run.task.loss_names)
    trainer.add_event_handler(Events.EPOCH_STARTED, tracker.reset)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, tracker.update)
    checkpoint = attach_checkpoint(trainer, run.to_save(), run.checkpoint_dir, every=args.checkpoint_every)
    if rank() != 0:
        return tracker, checkpoint, None
    # A resumed run drops what the interrupted one logged after its checkpoint, so each curve is drawn once.
    tb_logger = TensorboardLogger(log_dir=str(run.log_dir), purge_step=trainer.state.iteration + 1)
    every = args.log_every
    params = OptimParamsHandler(run.optim_wrapper, tag="optim")
    # the values the run starts from (a warm-up's first lr), every N-th update of each member, and the last ones
    tb_logger.attach(trainer, params, Events.STARTED | Events.COMPLETED)
    tb_logger.attach(trainer, params, OptimEvents.OPTIM_STEP_COMPLETED(event_filter=member_filter(every=every)))
    if args.telemetry is not None:
        telemetry = UpdateTelemetryHandler(run.optim_wrapper, every=args.telemetry, model=run.task.model, depth=1)
        tb_logger.attach(trainer, telemetry, Events.ITERATION_COMPLETED)
    losses = OutputHandler(tag="train", output_transform=_as_losses, global_step_transform=_iteration)
    last_off_cadence = Events.COMPLETED(event_filter=lambda engine, _: engine.state.iteration % every != 0)
    tb_logger.attach(trainer, losses, Events.ITERATION_COMPLETED(every=every) | last_off_cadence)
    progress = RunScalars(tb_logger, args.batch_size, nonfinite, run.spike_guard)
    trainer.add_event_handler(Events.STARTED, progress.start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every) | last_off_cadence, progress)
    if not args.no_progress:
        attach_progress_bar(trainer, run.optim_wrapper, every=5, show_lr=args.schedule != "constant", persist=True)
    return tracker, checkpoint, tb_logger


class RunScalars:
    """The run's own curves, at the losses' cadence: ``run/epoch``, ``run/iterations_per_second``,
    ``run/samples_per_second`` (of the global batch) and the guards' counts, ``guard/nonfinite_skipped`` and
    ``guard/spikes`` (per member: ``guard/spikes/gen``). Reading the spike guard's counts waits for the device."""

    def __init__(
        self,
        tb_logger: TensorboardLogger,
        batch_size: int,
        nonfinite: NonFiniteGuard | None,
        spike_guard: SpikeGuard | None,
    ) -> None:
        self.tb_logger, self.batch_size = tb_logger, batch_size
        self.nonfinite, self.spike_guard = nonfinite, spike_guard
        self.since: tuple[float, int] = (time.perf_counter(), 0)

    def start(self, engine: Engine) -> None:
        self.since = (time.perf_counter(), engine.state.iteration)

    def __call__(self, engine: Engine) -> None:
        iteration, now = engine.state.iteration, time.perf_counter()
        seconds, done = now - self.since[0], iteration - self.since[1]
        self.since = (now, iteration)
        scalars: dict[str, float] = {"run/epoch": engine.state.epoch}
        if seconds > 0 and done > 0:
            scalars["run/iterations_per_second"] = done / seconds
            scalars["run/samples_per_second"] = done * self.batch_size / seconds
        if self.nonfinite is not None:
            scalars.update(_per_member("guard/nonfinite_skipped", self.nonfinite.skipped))
        if self.spike_guard is not None:
            scalars.update(_per_member("guard/spikes", self.spike_guard.spikes()))
        for tag, value in scalars.items():
            self.tb_logger.writer.add_scalar(tag, value, iteration)


def _per_member(tag: str, counts: dict[str | None, int]) -> dict[str, float]:
    """``{tag: n}`` for one wrapper (``None``), ``{tag/member: n}`` for each member of a dict; 0 before any."""
    return {tag if name is None else f"{tag}/{name}": count for name, count in counts.items()} or {tag: 0}


class LossTracker:
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


def summary(result: Result) -> str:
    """The lines printed at the end of ``engine-opt train`` (one line when a signal stopped it)."""
    if result.stopped_by is not None:
        return (
            f"engine-opt: stopped by {result.stopped_by} at iteration {result.iterations}; saved "
            f"{result.checkpoint}; continue with the same options and --resume"
        )
    losses = ", ".join(f"{name} {value:.4f}" for name, value in result.losses.items())
    processes = f" on {result.processes} processes" if result.processes > 1 else ""
    lines = [
        f"engine-opt: trained {result.task} to epoch {result.epochs} "
        f"({result.iterations} iterations) in {result.seconds:.1f} s{processes}",
    ]
    if result.resumed_from is not None:
        lines.append(f"  resumed from:     {result.resumed_from}")
    covered = ""
    if result.loss_iterations is not None:  # the loss of the iterations before the checkpoint was not saved
        count, length = result.loss_iterations
        covered = f"   (its last {count} of {length} iterations: those run since the resume)"
    lines += [
        f"  last epoch loss:  {losses}{covered}",
        f"  updates:          {result.applied} applied, {result.skipped} skipped",
        f"  checkpoint:       {result.checkpoint}",
        f"  TensorBoard logs: {result.log_dir}   (view: tensorboard --logdir {result.log_dir})",
    ]
    return "\n".join(lines)


def _build_wrappers(args: argparse.Namespace, task: Task, cfg: dict[str, Any]) -> OptimWrapper | OptimWrapperDict:
    try:
        return build_optim_wrapper(task.model, cfg)
    except (TypeError, ValueError) as error:
        source = f"--config {args.config}" if args.config is not None else "the wrapper options"
        raise UsageError(f"{source}: {error}") from None


def _check_reevaluating(args: argparse.Namespace, task: Task, optim_wrapper: OptimWrapper | OptimWrapperDict) -> None:
    """An optimizer that re-evaluates the model in its step (LBFGS, SAM) trains one batch per update, by closure."""
    for _, wrapper in members(optim_wrapper):
        if not wrapper.needs_closure:
            continue
        kind = type(wrapper.optimizer).__name__ if wrapper.sam is None else "sam"
        if task.make_train_step is not None:
            raise UsageError(
                f"{kind} re-evaluates the model during its step, and the {task.name} task's step, which updates "
                "two models in turn, gives it no closure; train the classifier with it"
            )
        if args.num_items == "samples" and wrapper.sam is None:  # the wrapper refuses accumulation, float16
            raise UsageError(f"--num-items samples: {kind} re-evaluates one batch's mean loss during its step")


def _build_trainer(
    args: argparse.Namespace, task: Task, optim_wrapper: OptimWrapper | OptimWrapperDict, device: torch.device
) -> Trainer:
    _check_reevaluating(args, task, optim_wrapper)
    if args.num_items == "samples":
        if task.item_loss_fn is None:
            raise UsageError(
                f"--num-items samples: the {args.task} task has no per-sample loss; use it with classifier"
            )
        model = _parallel_model(task.model)
        return create_trainer(
            model, optim_wrapper, task.item_loss_fn, device=device, num_items=_samples, output_transform=_sample_mean
        )
    if task.make_train_step is None:
        return create_trainer(_parallel_model(task.model), optim_wrapper, task.loss_fn, device=device)
    try:
        train_step = task.make_train_step(optim_wrapper, _parallel_model)
    except ValueError as error:
        raise UsageError(f"--config {args.config}: {error}") from None
    return create_trainer(task.model, optim_wrapper, train_step=train_step)


def _sample_mean(x: Any, y: torch.Tensor, y_pred: Any, loss: torch.Tensor) -> torch.Tensor:
    """``--num-items samples``: the batch's loss as every other run shows it, the mean over its samples."""
    return loss.detach() / len(y)


def _samples(x: Any, y: torch.Tensor) -> int:
    """``--num-items samples``: a batch's item count, its number of labels (a shape: no device read)."""
    return len(y)


def _schedulers(
    schedule: str, optim_wrapper: OptimWrapper | OptimWrapperDict, iterations: int
) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """One cosine schedule per member over its updates, or none."""
    if schedule == "constant":
        return []
    return [
        torch.optim.lr_scheduler.CosineAnnealingLR(
            wrapper.optimizer, T_max=max(1, -(-iterations // wrapper.accumulative_counts))
        )
        for _, wrapper in members(optim_wrapper)
    ]


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


def _iteration(engine: Engine, event: Any) -> int:
    return int(engine.state.iteration)
