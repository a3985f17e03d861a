"""A training process for the resume tests: dropout, shuffled data, accumulation, a scheduler, checkpoints.

    python tests/support/resume_worker.py CONFIG CHECKPOINT_DIR OUTPUT [KILL_AT] [--every N] [--epochs E] [--hidden H]

Resumes from the newest checkpoint in CHECKPOINT_DIR, prints ``ready``,
checkpoints every N iterations (2), and dies with SIGKILL-like abruptness
(os._exit) after iteration KILL_AT; otherwise trains E epochs (3) of 5
iterations and saves the final state. H (16) is the hidden width: a wide
model makes each checkpoint take long enough to be killed in the middle.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine_opt import AmpOptimWrapper, OptimWrapper, create_trainer
from engine_opt.checkpoint import attach_checkpoint, resume_from_latest
from engine_opt.engine import ResumableLoader
from engine_opt.handlers import SchedulerHandler

CONFIGS = {
    "fp32": lambda opt: OptimWrapper(opt, accumulative_counts=3, clip_grad={"max_norm": 1.0}),
    "fp16": lambda opt: AmpOptimWrapper(
        optimizer=opt, dtype="fp16", loss_scale={"init_scale": 1024.0, "growth_interval": 2}, accumulative_counts=3
    ),
    "bf16": lambda opt: AmpOptimWrapper(optimizer=opt, dtype="bf16", accumulative_counts=2),
}


def build(
    config: str, checkpoint_dir: str, every: int = 2, hidden: int = 16
) -> tuple[Engine, ResumableLoader, Callable[[], dict]]:
    """Build the run as a fresh process would, resume it if a checkpoint exists; return what runs and reports it."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randn(40, 2)
    model = nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    wrapper = CONFIGS[config](optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.8)
    data = ResumableLoader(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    trainer = create_trainer(model, wrapper, F.mse_loss)
    SchedulerHandler(scheduler).attach(trainer)
    to_save = {"model": model, "optim_wrapper": wrapper, "trainer": trainer, "data": data, "scheduler": scheduler}
    resume_from_latest(to_save, checkpoint_dir)
    attach_checkpoint(trainer, to_save, checkpoint_dir, every=every)

    def final() -> dict:
        return {
            "model": model.state_dict(),
            "wrapper": wrapper.state_dict(),
            "scheduler": scheduler.state_dict(),
            "lr": wrapper.get_lr(),
            "next_random": torch.rand(3),
        }

    return trainer, data, final


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("checkpoint_dir")
    parser.add_argument("output")
    parser.add_argument("kill_at", type=int, nargs="?")
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=16)
    args = parser.parse_args()
    trainer, data, final = build(args.config, args.checkpoint_dir, args.every, args.hidden)
    print("ready", flush=True)
    if args.kill_at is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=args.kill_at), lambda engine: os._exit(3))
    if trainer.state.epoch < args.epochs:  # Ignite would start a finished run over
        trainer.run(data, max_epochs=args.epochs)
    torch.save(final(), args.output)


if __name__ == "__main__":
    main()
