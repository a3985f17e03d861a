"""The run's schedules: ``--schedule cosine`` over each member's updates, or a Python config's ``param_scheduler``."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
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
    """A Python config's ``param_scheduler``; else ``--schedule cosine``'s schedule per member over its updates.

    Each member's schedules count its own updates: ``epoch_length`` batches make ``epoch_length /
    accumulative_counts`` updates an epoch (windows run on across epochs), so a schedule by update
    without an ``end`` ends with the member's last update of the run.
    """
    if param_scheduler is not None:
        if args.schedule != "constant":
            raise UsageError(f"--schedule {args.schedule}: --config {args.config} sets param_scheduler; drop one")
        names = [name for name, _ in members(optim_wrapper)]
        if isinstance(param_scheduler, Mapping) and "type" not in param_scheduler and None not in names:
            unknown = sorted(set(param_scheduler) - set(names))
            if unknown:
                raise UsageError(
                    f"--config {args.config}: param_scheduler names member(s) {unknown}, which the wrappers lack; "
                    f"their members: {names}"
                )
        try:
            return [
                scheduler
                for name, wrapper in members(optim_wrapper)
                for scheduler in _member_schedules(args, name, wrapper, epochs, epoch_length, param_scheduler)
            ]
        except (TypeError, ValueError) as error:
            raise UsageError(f"--config {args.config}: {error}") from None
    if args.schedule == "constant":
        return []
    return [
        torch.optim.lr_scheduler.CosineAnnealingLR(
            wrapper.optimizer, T_max=max(1, -(-epochs * epoch_length // wrapper.accumulative_counts))
        )
        for _, wrapper in members(optim_wrapper)
    ]


def _member_schedules(
    args: argparse.Namespace, name: str | None, wrapper: OptimWrapper, epochs: int, epoch_length: int, cfg: Any
) -> list[Any]:
    """One member's schedules: its own entry of a config keyed by member, or the config every member shares."""
    if name is not None and isinstance(cfg, Mapping) and "type" not in cfg:  # keyed by member
        if name not in cfg:
            return []
        cfg = cfg[name]
    accumulation = wrapper.accumulative_counts
    windows, rest = divmod(epoch_length, accumulation)
    if rest and _converts(cfg):
        member = "" if name is None else f" (member {name!r})"
        raise ValueError(
            f"param_scheduler{member} converts epochs to updates (convert_to_iter_based), but an epoch's "
            f"{epoch_length} batches are no whole number of windows of accumulative_counts={accumulation} (windows "
            "run on across epochs); choose a batch size or accumulative_counts that divides them"
        )
    built = build_param_scheduler(
        wrapper,
        cfg,
        epoch_length=max(1, windows),
        max_epochs=epochs,
        max_iters=-(-epochs * epoch_length // accumulation),  # the member's updates in the run
    )
    return list(built)


def _converts(param_scheduler: Any) -> bool:
    """Whether a ``param_scheduler`` config (a dict, a list, or a dict of them by member) converts epochs."""
    if isinstance(param_scheduler, dict):
        if "type" in param_scheduler:
            return bool(param_scheduler.get("convert_to_iter_based"))
        return any(_converts(item) for item in param_scheduler.values())
    if isinstance(param_scheduler, (list, tuple)):
        return any(_converts(item) for item in param_scheduler)
    return False
