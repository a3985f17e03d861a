"""An Ignite trainer with every engine_opt handler: TensorBoard, schedule, guard, EMA, progress bar, checkpoints.

python examples/trainer_with_handlers.py [LOG_DIR]    # LOG_DIR: logs and checkpoints (default: a new temporary one)
"""

import argparse
import tempfile

import torch
import torch.nn.functional as F
from ignite.handlers import EMAHandler
from ignite.handlers.tensorboard_logger import TensorboardLogger
from torch.utils.data import DataLoader, TensorDataset

from engine_opt import OptimEvents, build_optim_wrapper, create_trainer
from engine_opt.checkpoint import attach_checkpoint
from engine_opt.engine import ResumableLoader
from engine_opt.handlers import NonFiniteGuard, OptimParamsHandler, SchedulerHandler, attach_progress_bar

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("log_dir", nargs="?", help="where logs and checkpoints go (default: a new temporary directory)")
log_dir = parser.parse_args().log_dir or tempfile.mkdtemp()
torch.manual_seed(0)
x = torch.randn(512, 16)
y = x @ torch.randn(16, 1) + 0.1 * torch.randn(512, 1)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
data = ResumableLoader(DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))

# The whole strategy is configuration: bf16 autocast, 2 micro-batches per update, clipping.
optim_wrapper = build_optim_wrapper(
    model,
    dict(
        type="AmpOptimWrapper",
        dtype="bfloat16",
        accumulative_counts=2,
        clip_grad=dict(max_norm=1.0),
        optimizer=dict(type="AdamW", lr=1e-2, weight_decay=0.01),
    ),
)
trainer = create_trainer(model, optim_wrapper, F.mse_loss)

epochs = 8
updates = epochs * -(-len(data) // optim_wrapper.accumulative_counts)  # the trainer flushes the last window
scheduler = torch.optim.lr_scheduler.OneCycleLR(optim_wrapper.optimizer, max_lr=1e-2, total_steps=updates)
SchedulerHandler(scheduler).attach(trainer)  # moves on applied updates only
NonFiniteGuard("skip").attach(trainer)  # bf16 has no scaler to skip a nan update
ema = EMAHandler(model, momentum=0.2)
ema.attach(trainer, event=OptimEvents.OPTIM_STEP_COMPLETED)  # averages applied updates only

tb_logger = TensorboardLogger(log_dir=log_dir)
tb_logger.attach(trainer, OptimParamsHandler(optim_wrapper), OptimEvents.OPTIM_STEP_COMPLETED(every=2))
to_save = {"model": model, "optim_wrapper": optim_wrapper, "trainer": trainer, "data": data, "scheduler": scheduler}
attach_checkpoint(trainer, {**to_save, "ema": ema.ema_model}, f"{log_dir}/checkpoints", every=16)
attach_progress_bar(trainer, optim_wrapper, every=4, persist=True)

state = trainer.run(data, max_epochs=epochs)
tb_logger.close()
with torch.no_grad():
    loss, ema_loss = F.mse_loss(model(x), y).item(), F.mse_loss(ema.ema_model(x), y).item()
print(f"updates applied {state.optim_updates}, skipped {state.optim_skipped}")
print(f"loss {loss:.4f}, EMA model's loss {ema_loss:.4f}")
print(f"logs and checkpoints in {log_dir}")
