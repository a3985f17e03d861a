"""Ignite handlers for trainers built by ``create_trainer``.

- ``OptimParamsHandler``: learning rates, momenta, loss scale, update counts
  and gradient norm to TensorBoard (with Ignite's ``TensorboardLogger``).
- ``SchedulerHandler``: a learning-rate schedule that advances on applied updates.
- ``UpdateTelemetryHandler``: per group and per layer gradient, update and weight norms of measured updates.
- ``NonFiniteGuard``: skip, or stop at, updates with non-finite losses or gradients.
- ``SpikeGuard``: cancel updates whose loss or gradient norm spikes; roll back after a run of them.
- ``attach_progress_bar``: Ignite's ``ProgressBar`` with loss, lr and loss scale.

Periodic checkpoints are in ``engine_opt.checkpoint`` (``attach_checkpoint``,
``resume_from_latest``...), the data position in ``engine_opt.engine``
(``ResumableLoader``). An exponential moving average of the weights is Ignite's ``EMAHandler``
attached to ``OptimEvents.OPTIM_STEP_COMPLETED``, so it moves on applied
updates only (see ``docs/strategies.md``).
"""

from typing import Any

from ..moved import find_moved
from .nonfinite import NonFiniteGuard
from .params_logger import OptimParamsHandler, optim_scalars
from .progress import attach_progress_bar, progress_values
from .scheduler import SchedulerHandler
from .spike_guard import SpikeGuard, SpikesPersist
from .update_telemetry import UpdateTelemetryHandler

__all__ = [
    "NonFiniteGuard",
    "OptimParamsHandler",
    "SchedulerHandler",
    "SpikeGuard",
    "SpikesPersist",
    "UpdateTelemetryHandler",
    "attach_progress_bar",
    "optim_scalars",
    "progress_values",
]

# exported here before checkpoints had a package of their own
_MOVED = {
    **dict.fromkeys(
        (
            "ShardedCheckpoint",
            "attach_checkpoint",
            "attach_sharded_checkpoint",
            "latest_checkpoint",
            "load_checkpoint",
            "load_sharded_checkpoint",
            "resume_from_latest",
        ),
        "engine_opt.checkpoint",
    ),
    **dict.fromkeys(("ResumableLoader", "rng_state", "set_rng_state"), "engine_opt.engine"),
}


def __getattr__(name: str) -> Any:
    """A name that moved to another package (``engine_opt.moved``)."""
    return find_moved(__name__, name, _MOVED)
