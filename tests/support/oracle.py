"""The independent oracle: plain PyTorch training loops, written out step by step.

Nothing here imports engine_opt. Every wrapper configuration is compared with
these loops bitwise (float32, CPU). The order of one update follows the
reference in docs/semantics.md:

    with autocast(...):                     # only for AMP
        loss = loss_fn(model(x), y)
    loss = loss / window_size               # true size of the window, also the last one
    scaler.scale(loss).backward()           # scaler only for float16
    if window ends:
        scaler.unscale_(optimizer)          # only when clipping
        clip_grad_norm_ / clip_grad_value_
        scaler.step(optimizer); scaler.update()   (or optimizer.step())
        optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small MLP with a bias and a norm layer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)


def make_batches(n: int, batch_size: int = 5, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 4, generator=generator, dtype=dtype),
            torch.randn(batch_size, 2, generator=generator, dtype=dtype),
        )
        for _ in range(n)
    ]


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output.float(), target.float())


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=True),
}


@dataclass
class Plan:
    """What the plain loop does; the same fields configure the wrapper under test."""

    accumulate: int = 1
    clip_norm: float | None = None
    clip_value: float | None = None
    amp_dtype: torch.dtype | None = None  # None: no autocast
    scaler_kwargs: dict[str, Any] | None = None  # a GradScaler for float16


def plain_loop(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], plan: Plan) -> dict[str, Any]:
    """Train ``model`` on ``batches`` with plain PyTorch; return what happened."""
    scaler = None
    if plan.scaler_kwargs is not None:
        scaler = torch.amp.GradScaler("cpu", **plan.scaler_kwargs)
    n = len(batches)
    skipped = 0
    optimizer.zero_grad()
    for idx, (x, y) in enumerate(batches):
        window_start = idx - idx % plan.accumulate
        window_size = min(plan.accumulate, n - window_start)
        if plan.amp_dtype is not None:
            with torch.autocast("cpu", dtype=plan.amp_dtype):
                loss = loss_fn(model(x), y)
        else:
            loss = loss_fn(model(x), y)
        if window_size > 1:
            loss = loss / window_size
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if (idx + 1) % plan.accumulate == 0 or idx + 1 == n:
            skipped += _window_step(model, optimizer, scaler, plan)
    return {"scaler": scaler, "skipped": skipped}


def make_gan(seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({"gen": nn.Linear(4, 4), "disc": nn.Linear(4, 1)})


def gan_losses(gan: nn.ModuleDict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fake = gan["gen"](x)
    disc_loss = (gan["disc"](fake.detach()) - gan["disc"](x)).mean()
    return fake, disc_loss


def plain_gan_loop(
    gan: nn.ModuleDict, batches: list[torch.Tensor]
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, torch.amp.GradScaler]:
    """Discriminator (SGD, 2 micro-steps a window), then generator (Adam, float16 autocast and loss scaling)."""
    gen_opt = torch.optim.Adam(gan["gen"].parameters(), lr=0.01)
    disc_opt = torch.optim.SGD(gan["disc"].parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=1)
    for idx, x in enumerate(batches):
        _, disc_loss = gan_losses(gan, x)
        (disc_loss / 2).backward()
        if (idx + 1) % 2 == 0:
            disc_opt.step()
            disc_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            gen_loss = -gan["disc"](gan["gen"](x)).mean()
        scaler.scale(gen_loss).backward()
        scaler.step(gen_opt)
        scaler.update()
        gen_opt.zero_grad()
    return gen_opt, disc_opt, scaler


def assert_same_tensors(actual: Any, expected: Any, where: str = "") -> None:
    """Bitwise equality of nested containers of tensors and numbers."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected) or (
            torch.equal(torch.isnan(actual), torch.isnan(expected))
            and torch.equal(actual.nan_to_num(), expected.nan_to_num())
        ), f"tensors differ at {where}: max abs diff {(actual - expected).abs().max()}"
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"keys differ at {where}: {set(actual) ^ set(expected)}"
        for key in expected:
            assert_same_tensors(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_tensors(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_same_model(actual: nn.Module, expected: nn.Module) -> None:
    assert_same_tensors(dict(actual.state_dict()), dict(expected.state_dict()), "model")


def item_loss_sum(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sum over items (rows) of each item's squared error: the loss token-weighted accumulation is given."""
    return F.mse_loss(output.float(), target.float(), reduction="sum")


def make_item_batches(sizes: list[int], seed: int = 1) -> list[Batch]:
    """Micro-batches of the given numbers of items (rows)."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=generator), torch.randn(size, 2, generator=generator)) for size in sizes]


def plain_item_windows(
    model: nn.Module, optimizer: torch.optim.Optimizer, windows: list[list[Batch]], plan: Plan
) -> dict[str, Any]:
    """Token weighting's reference: one plain step per window on its items concatenated.

    loss = (sum of the per-item losses over the window's items) / (their number); one
    backward, one step. ``plan.accumulate`` is not used: the windows are given.
    """
    scaler = None if plan.scaler_kwargs is None else torch.amp.GradScaler("cpu", **plan.scaler_kwargs)
    skipped = 0
    for window in windows:
        x = torch.cat([batch[0] for batch in window])
        y = torch.cat([batch[1] for batch in window])
        with torch.autocast("cpu", dtype=plan.amp_dtype or torch.bfloat16, enabled=plan.amp_dtype is not None):
            output = model(x)
        loss = item_loss_sum(output, y) / len(x)
        (loss if scaler is None else scaler.scale(loss)).backward()
        skipped += _window_step(model, optimizer, scaler, plan)
    return {"scaler": scaler, "skipped": skipped}


def _window_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, plan: Plan) -> int:
    """A window's end, written out: unscale (when clipping), clip, step (the scaler's), zero; 1 if skipped."""
    if scaler is not None and (plan.clip_norm is not None or plan.clip_value is not None):
        scaler.unscale_(optimizer)
    if plan.clip_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), plan.clip_norm)
    if plan.clip_value is not None:
        nn.utils.clip_grad_value_(model.parameters(), plan.clip_value)
    skipped = 0
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = int(scaler.get_scale() < scale_before)
    else:
        optimizer.step()
    optimizer.zero_grad()
    return skipped


def sam_perturb(params: list[nn.Parameter], rho: float, adaptive: bool) -> dict[nn.Parameter, torch.Tensor]:
    """SAM's move from the gradients the parameters hold (Foret et al.; adaptive: Kwon et al.); the old weights."""
    params = [p for p in params if p.grad is not None]
    old = {}
    with torch.no_grad():
        grad_norm = torch.norm(
            torch.stack([((torch.abs(p) if adaptive else 1.0) * p.grad).norm(p=2) for p in params]), p=2
        )
        scale = rho / (grad_norm + 1e-12)
        for p in params:
            old[p] = p.data.clone()
            p.add_((torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale)
    return old


def sam_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    rho: float,
    adaptive: bool = False,
    clip: float | None = None,
    autocast: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """The published two-pass SAM loop; the norms clipping measured (of the second pass's gradients)."""
    norms = []
    for x, y in batches:
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = loss_fn(model(x), y)
        loss.backward()
        old = sam_perturb(list(model.parameters()), rho, adaptive)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            second = loss_fn(model(x), y)
        second.backward()
        for p, weight in old.items():
            p.data = weight
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        optimizer.step()
        optimizer.zero_grad()
    return norms


def closure_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    clip: float | None = None,
    autocast: torch.dtype | None = None,
) -> None:
    """torch's documented closure loop (LBFGS): ``optimizer.step(closure)`` once per batch, the closure zeroing the
    gradients, evaluating, running backward (then ``clip_grad_norm_`` to ``clip``) and returning the loss."""
    for x, y in batches:

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = loss_fn(model(x), y)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            return loss

        optimizer.step(closure)
