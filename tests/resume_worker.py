"""A training process for the resume tests: dropout, shuffled data, accumulation, a scheduler, checkpoints.

    python tests/resume_worker.py CONFIG CHECKPOINT_DIR OUTPUT [KILL_AT]

Resumes from the newest checkpoint in CHECKPOINT_DIR, checkpoints every 2
iterations, and dies with SIGKILL-like abruptness (os._exit) after iteration
KILL_AT; otherwise trains 3 epochs of 5 iterations and saves the final state.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine_opt import AmpOptimWrapper, OptimWrapper, create_trainer
from engine_opt.handlers import ResumableLoader, SchedulerHandler, attach_checkpoint, resume_from_latest

CONFIGS = {
    "fp32": lambda opt: OptimWrapper(opt, accumulative_counts=3, clip_grad={"max_norm": 1.0}),
    "fp16": lambda opt: AmpOptimWrapper(
        optimizer=opt, dtype="fp16", loss_scale={"init_scale": 1024.0, "growth_interval": 2}, accumulative_counts=3
    ),
    "bf16": lambda opt: AmpOptimWrapper(optimizer=opt, dtype="bf16", accumulative_counts=2),
}


def build(config: str, checkpoint_dir: str, every: int = 2) -> tuple[Engine, ResumableLoader, Callable[[], dict]]:
    """Build the run as a fresh process would, resume it if a checkpoint exists; return what runs and reports it."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randn(40, 2)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
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


def main(config: str, checkpoint_dir: str, output: str, kill_at: int | None) -> None:
    trainer, data, final = build(config, checkpoint_dir)
    if kill_at is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=kill_at), lambda engine: os._exit(3))
    trainer.run(data, max_epochs=3)
    torch.save(final(), output)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else None)
