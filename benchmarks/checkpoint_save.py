"""What a sharded checkpoint costs in step time, written synchronously or in the background.

    python benchmarks/checkpoint_save.py                   # 2 gloo processes, FSDP2 MLP, 5 interleaved repeats
    python benchmarks/checkpoint_save.py --width 2048 --repeats 3

Two processes train an FSDP2-sharded MLP (``--layers`` linear layers of
``--width``, AdamW) for ``--iterations`` iterations through ``create_trainer``,
three ways, A B C A B C ...: without checkpoints (``none``), with
``attach_sharded_checkpoint`` every ``--every`` iterations written
synchronously (``sync``) and with ``async_save=True`` (``async``). It prints
the median time per iteration of ``none`` and the others as ratios to it,
and the median time the training loop is held at an iteration that saves
(the save's share of the step: DCP's write for ``sync``, the copy to host
memory for ``async``). A measuring script, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.engine import Events
from torch import nn
from torch.distributed.fsdp import fully_shard

from engine_opt import OptimWrapper, create_trainer
from engine_opt.checkpoint import attach_sharded_checkpoint

MODES = ("none", "sync", "async")


def _model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)])
    for block in model:
        fully_shard(block)
    fully_shard(model)
    return model


def _one_run(mode: str, options: argparse.Namespace, directory: str) -> dict[str, float]:
    model = _model(options.width, options.layers)
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-4))
    trainer = create_trainer(model, wrapper, F.mse_loss)
    x = torch.randn(options.batch, options.width)
    data = [(x, x)] * options.iterations
    if mode != "none":
        attach_sharded_checkpoint(
            trainer, {"model": model, "optim_wrapper": wrapper}, directory, every=options.every, n_saved=1,
            async_save=mode == "async",
        )  # fmt: skip
    stamps: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
    start = time.perf_counter()
    trainer.run(data, max_epochs=1)
    end = time.perf_counter()  # the run's end waits for the last background save
    steps = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    saving = [steps[i] for i in range(len(steps)) if (i + 1) % options.every == 0]
    others = [steps[i] for i in range(len(steps)) if (i + 1) % options.every != 0]
    return {
        "per_iteration": (end - start) / options.iterations,
        "held": statistics.median(saving),
        "plain": statistics.median(others),
    }


def _rank(local_rank: int, options: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)  # one core per process
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(options.repeats):
        for mode in MODES:
            with tempfile.TemporaryDirectory() as directory:
                directory = idist.broadcast(directory, src=0)
                results[mode].append(_one_run(mode, options, directory))
    if idist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))


def report(results: dict[str, list[dict[str, float]]], options: argparse.Namespace) -> str:
    per_iteration = {mode: statistics.median(run["per_iteration"] for run in results[mode]) for mode in MODES}
    base = per_iteration["none"]
    state_mib = 3 * options.layers * (options.width**2 + options.width) * 4 / 2**20
    lines = [
        f"2 gloo processes, FSDP2 MLP {options.layers} x {options.width} (model and AdamW state {state_mib:.0f} MiB), "
        f"batch {options.batch}, {options.iterations} iterations, a checkpoint every {options.every}, "
        f"{options.repeats} interleaved repeats, torch {torch.__version__}, one thread per process.",
        "",
        "| checkpoints | time per iteration | ratio to none | held at a saving iteration | other iterations |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        held = statistics.median(run["held"] for run in results[mode]) * 1e3
        plain = statistics.median(run["plain"] for run in results[mode]) * 1e3
        lines.append(
            f"| {mode} | {per_iteration[mode] * 1e3:.1f} ms | {per_iteration[mode] / base:.2f} | "
            f"{held:.1f} ms | {plain:.1f} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        out = str(Path(directory) / "results.json")
        with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
            parallel.run(_rank, options, out)
        results: Any = json.loads(Path(out).read_text())
    print(report(results, options))


if __name__ == "__main__":
    main(sys.argv[1:])
