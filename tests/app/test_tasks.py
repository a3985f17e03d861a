"""The built-in tasks: data shapes, and a GAN step that keeps the two windows apart."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine_opt import build_optim_wrapper
from engine_opt.app.tasks import make_task

from oracle import assert_same_tensors


def test_classifier_data_and_model_fit_together():
    task = make_task("classifier", seed=0, batch_size=32)
    x, y = next(iter(task.data))
    assert task.model(x).shape == (32, 4) and y.dtype == torch.int64
    assert task.loss_fn(task.model(x), y).ndim == 0
    task.model.eval()
    mean = task.loss_fn(task.model(x), y)
    torch.testing.assert_close(task.item_loss_fn(task.model(x), y), mean * len(y))  # --num-items samples' sum


def test_gan_step_leaves_the_discriminator_window_to_the_discriminator_loss():
    task = make_task("gan", seed=0, batch_size=16)
    reference = copy.deepcopy(task.model)
    one = {"optimizer": {"type": "SGD", "lr": 0.1}}
    wrappers = build_optim_wrapper(task.model, {"gen": one, "disc": {**one, "accumulative_counts": 2}})
    (real,) = next(iter(task.data))
    torch.manual_seed(1)
    output = task.make_train_step(wrappers, lambda module: module)(None, (real,))
    assert set(output) == {"gen_loss", "disc_loss"}

    torch.manual_seed(1)
    noise = torch.randn(16, 8)
    real_logits, fake_logits = reference["disc"](real), reference["disc"](reference["gen"](noise).detach())
    disc_loss = F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    (disc_loss / 2).backward()
    assert_same_tensors(
        [p.grad for p in task.model["disc"].parameters()], [p.grad for p in reference["disc"].parameters()]
    )
    assert all(p.requires_grad for p in task.model["disc"].parameters())


def test_gan_step_keeps_parameters_the_user_froze_frozen():
    task = make_task("gan", seed=0, batch_size=16)
    task.model["disc"][0].bias.requires_grad_(False)
    task.model["gen"][0].bias.requires_grad_(False)
    wrappers = build_optim_wrapper(
        task.model,
        {
            "gen": {"optimizer": {"type": "SGD", "lr": 0.1}},
            "disc": {"optimizer": {"type": "SGD", "lr": 0.1}, "accumulative_counts": 2},
        },
    )
    task.make_train_step(wrappers, lambda module: module)(None, next(iter(task.data)))
    frozen = {name for name, param in task.model.named_parameters() if not param.requires_grad}
    assert frozen == {"disc.0.bias", "gen.0.bias"}
    assert task.model["gen"][0].bias.grad is None and task.model["disc"][0].bias.grad is None


def test_unknown_task():
    with pytest.raises(ValueError, match=r"task must be one of \['classifier', 'gan'\], got 'mnist'"):
        make_task("mnist", 0, 8)


def test_seed_all_seeds_numpy_too():
    import numpy

    from engine_opt.app.tasks import seed_all

    seed_all(3)
    first = (torch.rand(2).tolist(), numpy.random.rand(2).tolist())
    seed_all(3)
    assert (torch.rand(2).tolist(), numpy.random.rand(2).tolist()) == first
