"""Checkpoints: the run directory, durable single files, sharded (DCP) directories, and attaching them to a trainer.

Imports the Ignite layer (``engine_opt.engine``), the core and Ignite.

- ``attach_checkpoint``: a file ``checkpoint_{iteration}.pt`` every ``every``
  iterations (or each epoch) and at the run's end, written durably
  (``write_checkpoint``), rotated after the save; ``load_checkpoint`` loads
  one into every object or none.
- ``attach_sharded_checkpoint``: the same for models sharded across ranks
  (FSDP2), through ``torch.distributed.checkpoint``, optionally written in
  the background; ``load_sharded_checkpoint`` loads one, in any number of
  processes.
- ``latest_checkpoint``, ``resume_from_latest``: the newest checkpoint of a
  directory, of the kind the run writes (``kind='file'`` or ``'sharded'``),
  and loading it.
- ``RunDirectory``: a checkpoint directory as one run owns it (its exactly
  named checkpoints of its kind, its lock, what interrupted saves left).

A sharded checkpoint is verified against its manifest (``manifest``) before
anything is read, and DCP's ``.metadata`` is read without running code
(``dcp_metadata``).

With ``ResumableLoader`` (``engine_opt.engine``) among the saved objects, a
run resumed mid-epoch, in a new process, continues exactly::

    data = ResumableLoader(DataLoader(dataset, batch_size=32, shuffle=True))
    to_save = {"model": model, "optim_wrapper": wrapper, "trainer": trainer, "data": data}
    resume_from_latest(to_save, "checkpoints", kind="file")     # None on a fresh start
    attach_checkpoint(trainer, to_save, "checkpoints", every=100)
    trainer.run(data, max_epochs=10)
"""

from .durable import DurableCheckpoint, attach_checkpoint
from .files import check_entry, load_checkpoint, write_checkpoint
from .resume import latest_checkpoint, resume_from_latest
from .run_directory import DamagedCheckpoint, RunDirectory, RunDirectoryBusy, RunDirectoryConflict
from .sharded import ShardedCheckpoint, attach_sharded_checkpoint
from .sharded_files import load_sharded_checkpoint

__all__ = [
    "DamagedCheckpoint",
    "DurableCheckpoint",
    "RunDirectory",
    "RunDirectoryBusy",
    "RunDirectoryConflict",
    "ShardedCheckpoint",
    "attach_checkpoint",
    "attach_sharded_checkpoint",
    "check_entry",
    "latest_checkpoint",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "resume_from_latest",
    "write_checkpoint",
]
