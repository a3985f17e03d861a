"""What a run of ``engine-opt train`` shows: its own TensorBoard curves, its loss over the last epoch, its summary.

Examples:
    >>> result = Result("classifier", 5, 320, 1.25, {"loss": 0.5}, 1, 320, 0,
    ...                 Path("runs/c"), checkpoint=None)
    >>> print(summary(result))
    engine-opt: trained classifier to epoch 5 (320 iterations) in 1.2 s
      last epoch loss:  loss 0.5000
      updates:          320 applied, 0 skipped
      checkpoint:       None
      TensorBoard logs: runs/c   (view: tensorboard --logdir runs/c)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers.tensorboard_logger import TensorboardLogger

from ..handlers import NonFiniteGuard, SpikeGuard
from ..optim.distributed import world_size
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict, members


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
    validation: dict[str, float] = field(default_factory=dict)
    """A Python config's validation metrics after the last epoch."""
    implementation: str | None = field(default=None)
    """How the optimizer steps, where the config chose (``implementation``): ``"'fused' (auto)"``, per member."""


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
        values: dict[str, torch.Tensor] = as_losses(engine.state.output)
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
    lines.append(f"  last epoch loss:  {losses}{covered}")
    if result.validation:
        lines.append(
            "  validation:       " + ", ".join(f"{name} {value:.4f}" for name, value in result.validation.items())
        )
    lines += [
        f"  updates:          {result.applied} applied, {result.skipped} skipped",
        *([f"  implementation:   {result.implementation}"] if result.implementation is not None else []),
        f"  checkpoint:       {result.checkpoint}",
        f"  TensorBoard logs: {result.log_dir}   (view: tensorboard --logdir {result.log_dir})",
    ]
    return "\n".join(lines)


def implementation(optim_wrapper: OptimWrapper | OptimWrapperDict) -> str | None:
    """What each member's ``implementation`` chose, for the summary (``None`` where no config chose one)."""
    chosen = [(name, wrapper.implementation) for name, wrapper in members(optim_wrapper)]
    text = ", ".join(f"{choice}" if name is None else f"{name} {choice}" for name, choice in chosen if choice)
    return text or None


def as_losses(output: Any) -> dict[str, Any]:
    """A process function's output as losses by name: a dict as it is, anything else as ``loss``."""
    return dict(output) if isinstance(output, dict) else {"loss": output}
