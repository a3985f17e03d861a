"""The run's schedules: ``--schedule cosine`` over each member's updates, or a Python config's ``param_scheduler``."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..optim.schedulers import build_param_scheduler
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict, members
from .config import UsageError


def run_schedules(
    args: argparse.Namespace,
    optim_wrapper: OptimWrapper | OptimWrapperDict,
    epochs: int,
    epoch_length: int,
    param_scheduler: Any,
) -> list[Any]:
    """A Python config's ``param_scheduler``; else ``--schedule cosine``'s schedule per member over its updates."""
    if param_scheduler is not None:
        if args.schedule != "constant":
            raise UsageError(f"--schedule {args.schedule}: --config {args.config} sets param_scheduler; drop one")
        accumulation = max(wrapper.accumulative_counts for _, wrapper in members(optim_wrapper))
        windows, rest = divmod(epoch_length, accumulation)
        if rest and _converts(param_scheduler):
            raise UsageError(
                f"--config {args.config}: param_scheduler converts epochs to updates (convert_to_iter_based), but an "
                f"epoch's {epoch_length} batches are no whole number of windows of accumulative_counts={accumulation} "
                "(windows run on across epochs); choose a batch size or accumulative_counts that divides them"
            )
        try:
            built = build_param_scheduler(
                optim_wrapper,
                param_scheduler,
                epoch_length=max(1, windows),
                max_epochs=epochs,
                max_iters=-(-epochs * epoch_length // accumulation),  # the run's updates
            )
        except (TypeError, ValueError) as error:
            raise UsageError(f"--config {args.config}: {error}") from None
        return [item for items in built.values() for item in items] if isinstance(built, dict) else built
    if args.schedule == "constant":
        return []
    return [
        torch.optim.lr_scheduler.CosineAnnealingLR(
            wrapper.optimizer, T_max=max(1, -(-epochs * epoch_length // wrapper.accumulative_counts))
        )
        for _, wrapper in members(optim_wrapper)
    ]


def _converts(param_scheduler: Any) -> bool:
    """Whether a ``param_scheduler`` config (a dict, a list, or a dict of them by member) converts epochs."""
    if isinstance(param_scheduler, dict):
        if "type" in param_scheduler:
            return bool(param_scheduler.get("convert_to_iter_based"))
        return any(_converts(item) for item in param_scheduler.values())
    if isinstance(param_scheduler, (list, tuple)):
        return any(_converts(item) for item in param_scheduler)
    return False
