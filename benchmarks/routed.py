"""Muon beside AdamW: the routed wrapper's update against the two torch optimizers stepped by hand, in one run.

    python benchmarks/routed.py                  # 9 interleaved repeats, 1 thread
    python benchmarks/routed.py --smoke          # a few steps, to check that it runs

A small transformer-shaped stack (an embedding, hidden Linear layers, norms, a
head): Muon over the hidden layers' weights, AdamW over the rest. Both sides
hold the same gradients and step them, without the backward, so the figures
are the update alone: ``by hand`` is ``muon.step(); adamw.step()``, ``routed``
is ``wrapper.step()`` of a wrapper built from ``routes`` (clipping off, and
with clipping by norm over all parameters, the hand-written side clipping with
``clip_grad_norm_``). Repeats are interleaved (A B B A ...); the table gives
the median and the minimum time per update and the ratio routed / by hand.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from engine_opt import build_optim_wrapper


def make_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks: list[nn.Module] = [nn.Embedding(1000, width)]
    for _ in range(layers):
        blocks += [nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
    blocks += [nn.LayerNorm(width), nn.Linear(width, 1000)]
    model = nn.Sequential(*blocks)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    return model


def hidden(model: nn.Module) -> list[nn.Parameter]:
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return [module.weight for module in linears[:-1]]


def by_hand(model: nn.Module, clip: float | None) -> Callable[[], None]:
    muon_params = hidden(model)
    rest = [param for param in model.parameters() if all(param is not other for other in muon_params)]
    muon = torch.optim.Muon(muon_params, lr=0.02)
    adamw = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.01)

    def step() -> None:
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        muon.step()
        adamw.step()

    return step


def routed(model: nn.Module, clip: float | None) -> Callable[[], None]:
    names = [name for name, param in model.named_parameters() if any(param is other for other in hidden(model))]
    cfg = {
        "optimizer": {"type": "AdamW", "lr": 1e-3, "weight_decay": 0.01},
        "routes": {"muon": {"names": names, "ndim": 2, "optimizer": {"type": "Muon", "lr": 0.02}}},
    }
    if clip is not None:
        cfg["clip_grad"] = {"max_norm": clip}
    wrapper = build_optim_wrapper(model, cfg)
    return lambda: wrapper.step()


def measure(width: int, layers: int, clip: float | None, repeats: int, steps: int) -> dict[str, list[float]]:
    runs = {"by hand": by_hand(make_model(width, layers), clip), "routed": routed(make_model(width, layers), clip)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up: the optimizers' state is made
    order = list(runs)
    for repeat in range(repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:  # A B B A ...: neither always goes first
            run = runs[name]
            start = time.perf_counter()
            for _ in range(steps):
                run()
            times[name].append((time.perf_counter() - start) / steps)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps of the smallest shape")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats (default: 9)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [(32, 1)] if args.smoke else [(64, 2), (128, 4)]
    repeats, steps = (2, 2) if args.smoke else (args.repeats, 5)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread(s), {repeats} interleaved repeats of {steps} updates")
    print("| width x layers | parameters | clip | by hand (median, min) | routed (median, min) | routed / by hand |")
    print("|---|---|---|---|---|---|")
    for width, layers in shapes:
        count = sum(param.numel() for param in make_model(width, layers).parameters())
        for clip in (None, 1.0):
            times = measure(width, layers, clip, repeats, steps)
            hand, mine = times["by hand"], times["routed"]
            cells = [f"{statistics.median(t) * 1e3:.2f} ms, {min(t) * 1e3:.2f} ms" for t in (hand, mine)]
            ratio = f"{statistics.median(mine) / statistics.median(hand):.3f}, {min(mine) / min(hand):.3f}"
            row = [f"{width} x {layers}", f"{count / 1e6:.1f}M", "on" if clip else "off", *cells, ratio]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
