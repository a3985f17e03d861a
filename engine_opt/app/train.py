"""``engine-opt train``, step by step: build the run, resume it, attach its handlers, run it, report.

Examples:
    >>> import tempfile
    >>> from engine_opt.app.cli import build_parser
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     options = ["--epochs", "1", "--no-progress", "--log-dir", directory]
    ...     args = build_parser().parse_args(["train", *options])
    ...     result = train(args)
    >>> result.iterations, result.applied
    (64, 64)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from ..handlers.tensorboard_writer import write_hparams
from ..optim import build_optim_wrapper
from ..optim.distributed import gather_objects, rank, world_size
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict, members
from .arguments import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, is_python_config
from .config import UsageError, wrapper_config
from .python_config import PythonConfig, folder_on_path, load_python_config, python_task
from .report import LossTracker, Result, RunScalars, as_losses, implementation
from .run_directories import check_run_directories, logs_named, mark, saved_there_before, way_past_damage
from .run_options import RunOptions, hparams, plain
from .schedules import run_schedules
from .signals import StopOnSignal, StopRequest
from .tasks import Task, make_task, seed_all
from .validation import Validation


@dataclass
class Run:
    """Everything one ``engine-opt train`` trains and saves."""

    task: Task
    optim_wrapper: OptimWrapper | OptimWrapperDict
    trainer: Trainer
    data: ResumableLoader
    schedulers: list[Any]
    """``torch.optim.lr_scheduler`` schedulers, or a Python config's ``param_scheduler`` built."""
    options: RunOptions
    log_dir: Path
    checkpoint_dir: Path
    spike_guard: SpikeGuard | None = None
    config: PythonConfig | None = None
    validation: Validation | None = None

    def to_save(self) -> dict[str, Any]:
        """What a checkpoint holds, by name; the run's options first, so a resume names what differs first."""
        saved: dict[str, Any] = {"run": self.options, "model": self.task.model, "optim_wrapper": self.optim_wrapper}
        saved.update(trainer=self.trainer, data=self.data)
        saved.update({f"scheduler_{index}": scheduler for index, scheduler in enumerate(self.schedulers)})
        if self.spike_guard is not None:
            saved["spike_guard"] = self.spike_guard
        return saved


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
    _refuse_a_held_directory(args)
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


def _refuse_a_held_directory(args: argparse.Namespace) -> None:
    """Refuse, before the set-up, a checkpoint directory another run holds (every rank, as rank 0 finds it).

    The run takes the directory later, once built; one that another run takes meanwhile is refused then.
    """
    _, checkpoint_dir = run_paths(args)
    held = RunDirectory(checkpoint_dir).held_elsewhere() if rank() == 0 else None
    held = gather_objects(held)[0]
    if held is not None:
        raise UsageError(held)


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
                state = run.trainer.run(run.data, max_epochs=run.options.epochs)
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
        validation={} if run.validation is None else run.validation.last,
        implementation=implementation(run.optim_wrapper),
    )


def build(args: argparse.Namespace) -> Run:
    """The task, its wrapper(s) from the options, the trainer and its schedules; nothing attached yet.

    A Python config's folder is on ``sys.path`` meanwhile: what it names is imported from beside it.
    """
    with folder_on_path(args.config) if is_python_config(args.config) else contextlib.nullcontext():
        return _build(args)


def _build(args: argparse.Namespace) -> Run:
    device = _device(args)
    log_dir, checkpoint_dir = run_paths(args)
    config = load_python_config(args.config, args.seed) if is_python_config(args.config) else None
    batch_size = args.batch_size or (config and config.batch_size) or DEFAULT_BATCH_SIZE
    epochs = args.epochs or (config and config.max_epochs) or DEFAULT_EPOCHS
    from_config = args.batch_size is None and config is not None and config.batch_size is not None
    check_batch_size(
        batch_size, world_size(), f"--config {args.config}'s batch_size" if from_config else "--batch-size"
    )
    # the same data and weights on every rank
    task = make_task(args.task, args.seed, batch_size) if config is None else python_task(config, args.seed, batch_size)
    task.model.to(device)
    if world_size() > 1:
        seed_all(args.seed + rank())  # each rank its own dropout, noise and augmentation
    wrapper_cfg = wrapper_config(args, task, None if config is None else config.optim_wrapper)
    from_file = args.config is not None and (config is None or config.optim_wrapper is not None)
    optim_wrapper = _build_wrappers(args, task, wrapper_cfg, from_file)
    data = ResumableLoader(task.data)
    try:
        trainer = _build_trainer(args, task, optim_wrapper, device)
    except ValueError as error:  # what create_trainer refuses of a config's model and wrappers
        if config is None:
            raise
        raise UsageError(f"--config {args.config}: {error}") from None
    param_scheduler = None if config is None else config.param_scheduler
    schedulers = run_schedules(args, optim_wrapper, epochs, len(data), param_scheduler)
    options = RunOptions(
        args.task,
        batch_size,
        args.seed,
        world_size(),
        plain(wrapper_cfg),
        "param_scheduler" if param_scheduler is not None else args.schedule,
        epochs,
        args.num_items,
        args.spike_guard,
        config=None if args.config is None else str(args.config),
        param_scheduler=plain(param_scheduler),
    )
    run = Run(task, optim_wrapper, trainer, data, schedulers, options, log_dir, checkpoint_dir, config=config)
    if args.spike_guard != "off":  # a rollback restores the model and the schedules; the wrappers it restores itself
        restore = {"model": task.model, **{f"scheduler_{i}": scheduler for i, scheduler in enumerate(schedulers)}}
        run.spike_guard = SpikeGuard(args.spike_guard, restore=restore)
    if config is not None and config.val_dataset is not None:
        run.validation = Validation(
            task.model,
            config.val_dataset,
            config.val_batch_size or batch_size,
            config.val_metrics,
            device,
            config.val_interval,
            config.val_num_workers,
        )
    return run


def check_batch_size(batch_size: int, processes: int, name: str = "--batch-size") -> None:
    """``--batch-size`` (``name``) is the batch of one iteration over all processes: each takes an equal share."""
    if batch_size % processes:
        raise UsageError(
            f"{name} {batch_size} is the batch of one iteration over all {processes} processes; "
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
    epochs = run.options.epochs
    if state.max_epochs is not None and epochs < state.max_epochs:
        raise UsageError(f"--epochs {epochs} is less than the resumed run's {state.max_epochs}")
    if state.epoch >= epochs:  # Ignite would start a finished run over
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
        if run.validation is not None:  # Ignite's metrics agree across ranks: every rank evaluates
            run.validation.attach(trainer)
        _attach_config_handlers(run)
        return tracker, checkpoint, None
    # A resumed run drops what the interrupted one logged after its checkpoint, so each curve is drawn once.
    tb_logger = TensorboardLogger(log_dir=str(run.log_dir), purge_step=trainer.state.iteration + 1)
    metrics = [f"train/{name}" for name in run.task.loss_names]
    metrics += [f"val/{name}" for name in ([] if run.config is None else run.config.val_metrics)]
    write_hparams(tb_logger.writer, hparams(run.options), metrics)
    ended_well = Events.COMPLETED(event_filter=lambda engine, _: engine.state.epoch == engine.state.max_epochs)
    trainer.add_event_handler(ended_well, lambda _: write_hparams(tb_logger.writer, {}, [], ended=True))
    every = args.log_every
    params = OptimParamsHandler(run.optim_wrapper, tag="optim")
    # the values the run starts from (a warm-up's first lr), every N-th update of each member, and the last ones
    tb_logger.attach(trainer, params, Events.STARTED | Events.COMPLETED)
    tb_logger.attach(trainer, params, OptimEvents.OPTIM_STEP_COMPLETED(event_filter=member_filter(every=every)))
    if args.telemetry is not None:
        telemetry = UpdateTelemetryHandler(run.optim_wrapper, every=args.telemetry, model=run.task.model, depth=1)
        tb_logger.attach(trainer, telemetry, Events.ITERATION_COMPLETED)
    losses = OutputHandler(tag="train", output_transform=as_losses, global_step_transform=_iteration)
    last_off_cadence = Events.COMPLETED(event_filter=lambda engine, _: engine.state.iteration % every != 0)
    tb_logger.attach(trainer, losses, Events.ITERATION_COMPLETED(every=every) | last_off_cadence)
    progress = RunScalars(tb_logger, run.options.batch_size, nonfinite, run.spike_guard)
    trainer.add_event_handler(Events.STARTED, progress.start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every) | last_off_cadence, progress)
    if run.validation is not None:
        run.validation.attach(trainer, tb_logger.writer.add_scalar)
    if not args.no_progress:
        show_lr = run.options.schedule != "constant"
        attach_progress_bar(trainer, run.optim_wrapper, every=5, show_lr=show_lr, persist=True)
    _attach_config_handlers(run)
    return tracker, checkpoint, tb_logger


def _attach_config_handlers(run: Run) -> None:
    """A Python config's ``handlers``, after the command's own: ``(event, handler)``, ``handler.attach(trainer)``,
    or ``handler(trainer)``."""
    for handler in [] if run.config is None else run.config.handlers:
        if isinstance(handler, tuple):
            run.trainer.add_event_handler(*handler)
            continue
        attach = getattr(handler, "attach", None)
        (attach if callable(attach) else handler)(run.trainer)


def _build_wrappers(
    args: argparse.Namespace, task: Task, cfg: dict[str, Any], from_file: bool
) -> OptimWrapper | OptimWrapperDict:
    try:
        return build_optim_wrapper(task.model, cfg)
    except (TypeError, ValueError) as error:
        source = f"--config {args.config}" if from_file else "the wrapper options"
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
                f"--num-items samples: the {args.task} task has no per-sample loss; the classifier and a Python "
                "config with the default loss_fn have one"
            )
        model = _parallel_model(task.model)
        return create_trainer(
            model, optim_wrapper, task.item_loss_fn, device=device, num_items=_samples, output_transform=_sample_mean
        )
    if task.make_train_step is None and task.loss_fn is None:  # a Python config's MMEngine model: its train_step
        if world_size() > 1:
            raise UsageError(
                f"--config {args.config}: a model that trains itself (its train_step) runs in one process; "
                "give loss_fn for a distributed run"
            )
        return create_trainer(task.model, optim_wrapper)
    if task.make_train_step is None:
        return create_trainer(_parallel_model(task.model), optim_wrapper, task.loss_fn, device=device)
    try:
        train_step = task.make_train_step(optim_wrapper, _parallel_model)
    except ValueError as error:
        raise UsageError(f"--config {args.config}: {error}") from None
    return create_trainer(task.model, optim_wrapper, train_step=train_step)


def _sample_mean(x: Any, y: torch.Tensor, y_pred: Any, loss: torch.Tensor) -> torch.Tensor:
    """``--num-items samples``: the batch's loss as every other run shows it, the mean over its samples."""
    return loss.detach() / _samples(x, y)


def _samples(x: Any, y: torch.Tensor) -> int:
    """``--num-items samples``: a batch's item count, from its target's shape (no device read).

    Class indices count one item each (a target of shape (N, d) holds N * d); class probabilities (a
    floating-point target, classes along dimension 1) one per row of classes.
    """
    return y.numel() // y.shape[1] if y.is_floating_point() and y.dim() > 1 else y.numel()


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


def _iteration(engine: Engine, event: Any) -> int:
    return int(engine.state.iteration)
