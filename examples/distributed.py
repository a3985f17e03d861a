"""Data-parallel training with your own trainer, through ignite.distributed.

python examples/distributed.py CHECKPOINT_DIR                 # 2 processes on CPU (gloo)
python examples/distributed.py CHECKPOINT_DIR --nproc 1       # the same code in one process
torchrun --nproc-per-node 2 examples/distributed.py CHECKPOINT_DIR      # started by torchrun
torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 2 examples/distributed.py CHECKPOINT_DIR

Each rank trains on its share of every batch (a DistributedSampler); the
wrapper skips DDP's gradient all-reduce on the micro-steps inside each window
of 4; rank 0 writes the checkpoints, every rank reads them when resuming.
"""

import argparse
import gc
import logging
import os

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from engine_opt import OptimWrapper, create_trainer
from engine_opt.checkpoint import attach_checkpoint, resume_from_latest
from engine_opt.engine import ResumableLoader
from engine_opt.testing import GradientTraffic

# Ignite's launcher and auto_* helpers log multi-line INFO dumps; this script shows its own line only (each
# spawned rank imports this module too, so the setting reaches them)
logging.disable(logging.INFO)


def training(local_rank: int, checkpoint_dir: str) -> None:
    torch.manual_seed(0)  # the same weights and data on every rank
    dataset = TensorDataset(torch.randn(256, 8), torch.randn(256, 1))
    model = idist.auto_model(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)))
    traffic = GradientTraffic(model)  # counts DDP's gradient reductions (nothing in one process)
    optim_wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), accumulative_counts=4)
    data = ResumableLoader(idist.auto_dataloader(dataset, batch_size=32, shuffle=True))  # 32 over all ranks
    trainer = create_trainer(model, optim_wrapper, F.mse_loss, device=idist.device())
    to_save = {"model": model, "optim_wrapper": optim_wrapper, "trainer": trainer, "data": data}
    resume_from_latest(to_save, checkpoint_dir, kind="file")
    attach_checkpoint(trainer, to_save, checkpoint_dir, every=8)
    state = trainer.run(data, max_epochs=2)
    if idist.get_rank() == 0:
        print(
            f"{idist.get_world_size()} process(es): {state.iteration} iterations, "
            f"{optim_wrapper.applied_steps} updates, {traffic.calls} gradient reductions"
        )
    # The checkpoint handler holds the trainer that holds it: free that cycle (and DDP's reducer with it)
    # now, while the process group still exists, not at interpreter exit.
    del trainer, to_save
    gc.collect()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Data-parallel training through ignite.distributed.")
    parser.add_argument("checkpoint_dir", help="where the checkpoints go (required; run again to resume)")
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn (none under torchrun)")
    args = parser.parse_args()
    under_torchrun = all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))  # as torchrun sets
    if args.nproc == 1 and not under_torchrun:
        training(0, args.checkpoint_dir)
    else:
        with idist.Parallel(backend="gloo", nproc_per_node=None if under_torchrun else args.nproc) as parallel:
            parallel.run(training, args.checkpoint_dir)
