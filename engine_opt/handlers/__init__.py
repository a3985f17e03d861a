"""Ignite handlers for trainers built by ``create_trainer``.

- ``OptimParamsHandler``: learning rates, momenta, loss scale, update counts
  and gradient norm to TensorBoard (with Ignite's ``TensorboardLogger``).
- ``attach_checkpoint``, ``resume_from_latest``: periodic checkpoints with
  Ignite's ``Checkpoint``, and resuming from the newest; with
  ``load_checkpoint`` (checked, all-or-nothing loads) and ``ResumableLoader``
  (the data position), from ``engine_opt.engine``, for exact resume.
- ``attach_sharded_checkpoint``: the same for models sharded across ranks
  (FSDP2), through ``torch.distributed.checkpoint``, optionally written in
  the background; ``load_sharded_checkpoint`` loads one, in any number of
  processes.
- ``SchedulerHandler``: a learning-rate schedule that advances on applied updates.
- ``UpdateTelemetryHandler``: per group and per layer gradient, update and weight norms of measured updates.
- ``NonFiniteGuard``: skip, or stop at, updates with non-finite losses or gradients.
- ``SpikeGuard``: cancel updates whose loss or gradient norm spikes; roll back after a run of them.
- ``attach_progress_bar``: Ignite's ``ProgressBar`` with loss, lr and loss scale.

An exponential moving average of the weights is Ignite's ``EMAHandler``
attached to ``OptimEvents.OPTIM_STEP_COMPLETED``, so it moves on applied
updates only (see ``docs/strategies.md``).
"""

from ..engine.checkpoint_files import load_checkpoint
from ..engine.resumable_loader import ResumableLoader, rng_state, set_rng_state
from ..engine.sharded_files import load_sharded_checkpoint
from .checkpoint import attach_checkpoint, latest_checkpoint, resume_from_latest
from .nonfinite import NonFiniteGuard
from .params_logger import OptimParamsHandler, optim_scalars
from .progress import attach_progress_bar, progress_values
from .scheduler import SchedulerHandler
from .sharded_checkpoint import ShardedCheckpoint, attach_sharded_checkpoint
from .spike_guard import SpikeGuard
from .update_telemetry import UpdateTelemetryHandler

__all__ = [
    "NonFiniteGuard",
    "OptimParamsHandler",
    "ResumableLoader",
    "SchedulerHandler",
    "ShardedCheckpoint",
    "SpikeGuard",
    "UpdateTelemetryHandler",
    "attach_checkpoint",
    "attach_progress_bar",
    "attach_sharded_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "optim_scalars",
    "progress_values",
    "resume_from_latest",
    "rng_state",
    "set_rng_state",
]
