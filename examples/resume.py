"""Stop a run, then resume it exactly: same batches, same random numbers, same result.

python examples/resume.py CHECKPOINT_DIR --stop-at 10   # checkpoints every 4 iterations and when it stops, at 10
python examples/resume.py CHECKPOINT_DIR                # resumes from iteration 10 (mid-window) and finishes

Dropout, a shuffled DataLoader, gradient accumulation across the checkpoint
and a schedule all continue as if the run had never stopped.
"""

import argparse

import torch
import torch.nn.functional as F
from ignite.engine import Events
from torch.utils.data import DataLoader, TensorDataset

from engine_opt import OptimWrapper, create_trainer
from engine_opt.checkpoint import attach_checkpoint, resume_from_latest
from engine_opt.engine import ResumableLoader
from engine_opt.handlers import SchedulerHandler

parser = argparse.ArgumentParser(description="Stop a run, then resume it exactly.")
parser.add_argument("checkpoint_dir", help="where the checkpoints go (required: the second run resumes from it)")
parser.add_argument("--stop-at", type=int, help="stop after this iteration, as if the machine went away")
args = parser.parse_args()

torch.manual_seed(0)
x, y = torch.randn(96, 8), torch.randn(96, 1)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.1), torch.nn.ReLU(), torch.nn.Linear(32, 1))
optim_wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), accumulative_counts=3)
scheduler = torch.optim.lr_scheduler.StepLR(optim_wrapper.optimizer, step_size=2, gamma=0.9)
data = ResumableLoader(DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))  # 6 iterations an epoch

trainer = create_trainer(model, optim_wrapper, F.mse_loss)
SchedulerHandler(scheduler).attach(trainer)
to_save = {"model": model, "optim_wrapper": optim_wrapper, "trainer": trainer, "data": data, "scheduler": scheduler}
resumed = resume_from_latest(to_save, args.checkpoint_dir, kind="file")
EPOCHS = 4
done = trainer.state.iteration >= EPOCHS * len(data)
ended = f": the {EPOCHS} epochs are done, nothing left to train" if done else ""
print(f"resumed from {resumed} at iteration {trainer.state.iteration}{ended}" if resumed else "new run")
attach_checkpoint(trainer, to_save, args.checkpoint_dir, every=4)
if args.stop_at:
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=args.stop_at), lambda engine: engine.terminate())

state = trainer.run(data, max_epochs=EPOCHS)
print(f"iteration {state.iteration}: updates {state.optim_updates}, lr {optim_wrapper.get_lr()['lr'][0]:.6f}")
print(f"weight checksum {sum(p.double().sum().item() for p in model.parameters()):.10f}")
