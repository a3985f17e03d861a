"""Built-in synthetic tasks for the ``engine-opt`` command: nothing to download.

- ``classifier``: Gaussian clusters in 32 dimensions, 4 classes, an MLP,
  cross-entropy; one ``OptimWrapper``.
- ``gan``: a generator learning a ring of 8 Gaussians in the plane against a
  discriminator; an ``OptimWrapperDict`` with members ``gen`` and ``disc``.

In a distributed run (``ignite.distributed``) every rank builds the same data
and weights; ``data`` then gives each rank its shard of every global batch
(``auto_dataloader``: a ``DistributedSampler`` seeded with the task's seed).

Examples:
    >>> task = make_task("classifier", seed=0, batch_size=64)
    >>> len(task.data), sorted(task.default_cfg["optimizer"].items())
    (64, [('lr', 0.001), ('type', 'AdamW')])
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from ..engine.process import TrainStep
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict
from .arguments import TASKS

ModelWrap = Callable[[nn.Module], nn.Module]
"""How the command readies a module for training: ``idist.auto_model`` in a distributed run."""
_SAMPLES = 4096
_NOISE = 8


@dataclass
class Task:
    """What the command trains: the model, its data, and how one iteration updates it."""

    name: str
    model: nn.Module
    data: DataLoader[Any]
    default_cfg: dict[str, Any]
    loss_fn: Callable[..., torch.Tensor] | None = None
    make_train_step: Callable[[OptimWrapper | OptimWrapperDict, ModelWrap], TrainStep] | None = None
    loss_names: tuple[str, ...] = field(default=("loss",))
    item_loss_fn: Callable[..., torch.Tensor] | None = None
    """``loss_fn`` summed over the batch's items instead of averaged, for ``--num-items samples``."""


def make_loader(
    dataset: Dataset[Any], batch_size: int, generator: torch.Generator, seed: int, num_workers: int = 0
) -> DataLoader[Any]:
    """Shuffled batches of ``batch_size``; in a distributed run, each rank's share of them.

    A ``DistributedSampler`` in one process too: each epoch's order follows
    from the seed and the epoch alone, so the global batches are the same
    samples at any number of processes (a run resumes on another number).
    """
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, idist.get_world_size(), idist.get_rank(), shuffle=True, seed=seed
    )
    loader = idist.auto_dataloader(
        dataset, batch_size=batch_size, sampler=sampler, generator=generator, num_workers=num_workers
    )
    return cast(DataLoader[Any], loader)


def _classifier(generator: torch.Generator, batch_size: int, seed: int) -> Task:
    centers = torch.randn(4, 32, generator=generator) * 0.3  # overlapping clusters: not separable
    labels = torch.randint(0, 4, (_SAMPLES,), generator=generator)
    features = centers[labels] + torch.randn(_SAMPLES, 32, generator=generator)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 4))
    data = make_loader(TensorDataset(features, labels), batch_size, generator, seed)
    cfg = {"type": "OptimWrapper", "optimizer": {"type": "AdamW", "lr": 1e-3}}
    return Task("classifier", model, data, cfg, loss_fn=F.cross_entropy, item_loss_fn=cross_entropy_sum)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The cross-entropy summed over the batch's samples (``--num-items samples`` divides by their count)."""
    return F.cross_entropy(logits, labels, reduction="sum")


def _ring(generator: torch.Generator) -> torch.Tensor:
    angles = torch.randint(0, 8, (_SAMPLES,), generator=generator) * (2 * math.pi / 8)
    points = torch.stack([angles.cos(), angles.sin()], dim=1) * 2
    return points + 0.05 * torch.randn(_SAMPLES, 2, generator=generator)


def _gan(generator: torch.Generator, batch_size: int, seed: int) -> Task:
    model = nn.ModuleDict(
        {
            "gen": nn.Sequential(nn.Linear(_NOISE, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)),
            "disc": nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1)),
        }
    )
    data = make_loader(TensorDataset(_ring(generator)), batch_size, generator, seed)
    one = {"type": "OptimWrapper", "optimizer": {"type": "Adam", "lr": 1e-3, "betas": [0.5, 0.999]}}
    cfg = {"gen": one, "disc": dict(one)}

    def make_train_step(optim_wrapper: OptimWrapper | OptimWrapperDict, wrap: ModelWrap) -> TrainStep:
        return _gan_train_step(model, optim_wrapper, wrap)

    return Task("gan", model, data, cfg, make_train_step=make_train_step, loss_names=("gen_loss", "disc_loss"))


def _gan_train_step(model: nn.ModuleDict, optim_wrapper: OptimWrapper | OptimWrapperDict, wrap: ModelWrap) -> TrainStep:
    """One iteration: the discriminator's update, then the generator's."""
    if not isinstance(optim_wrapper, OptimWrapperDict) or sorted(optim_wrapper) != ["disc", "gen"]:
        raise ValueError(
            "the gan task needs an OptimWrapperDict with members 'gen' and 'disc' "
            '(a config {"gen": {...}, "disc": {...}})'
        )
    # Each network is wrapped on its own (DDP needs one forward per backward); the passes that only
    # feed the other network's update use the bare module, so they start no gradient reduction.
    gen, disc = model["gen"], model["disc"]
    gen_train, disc_train = wrap(gen), wrap(disc)
    # optim_context(member=...) freezes the other member's parameters for the pass, so the generator's loss
    # adds nothing to the discriminator's window.
    gen_wrapper, disc_wrapper = optim_wrapper["gen"], optim_wrapper["disc"]

    def train_step(engine: Engine, batch: Any) -> dict[str, torch.Tensor]:
        model.train()
        real = batch[0].to(next(gen.parameters()).device)
        noise = torch.randn(real.shape[0], _NOISE, device=real.device)
        with optim_wrapper.optim_context(disc_train, member="disc"):
            with torch.no_grad():
                fake = gen(noise)
            disc_loss = _bce(disc_train(real), 1.0) + _bce(disc_train(fake), 0.0)
        disc_wrapper.update_params(disc_loss)
        with optim_wrapper.optim_context(gen_train, member="gen"):
            gen_loss = _bce(disc(gen_train(noise)), 1.0)
        gen_wrapper.update_params(gen_loss)
        return {"gen_loss": gen_loss.detach(), "disc_loss": disc_loss.detach()}

    return train_step


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Binary cross-entropy of ``logits`` (in float32) against a constant target."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def seed_all(seed: int) -> None:
    """Seed torch's, ``random``'s and (where installed) numpy's global generators, as MMEngine's ``randomness``."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


def make_task(name: str, seed: int, batch_size: int) -> Task:
    """Build the task called ``name`` (one of ``TASKS``) with its data drawn from ``seed``."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {name!r}")
    generator = torch.Generator().manual_seed(seed)
    seed_all(seed)
    return (_classifier if name == "classifier" else _gan)(generator, batch_size, seed)
