"""This tree's wrapper and trainer against another revision's, interleaved in one process.

    python benchmarks/compare.py --base a482225                 # tiny and mlp rows, 9 repeats
    python benchmarks/compare.py --base HEAD~1 --models tiny --precisions fp32 fp16
    python benchmarks/compare.py --base a482225 --calls         # Python calls per iteration instead of time

For a change on the hot path: the same work as ``bench.py``'s ``wrapper`` and
``trainer`` rows (the trainer logs with ``OptimParamsHandler`` every 10
updates), run by this tree's ``engine_opt`` and by the base revision's
(extracted with ``git archive`` and imported under another name), A B A B ...
in one process, so both meet the same machine state. It prints the median
time per iteration of each and the ratio ``this / base`` (below 1: faster),
and the ratio of the fastest repeats (less sensitive to a noisy machine).
``--calls`` counts the Python function calls per iteration instead (with
``cProfile``): deterministic, so it shows a change of a few microseconds that
a noisy machine's timings cannot. Runs of two lengths tell what each
iteration costs from what a trainer's run costs once (its last column).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import itertools
import pstats
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from ignite.handlers.tensorboard_logger import TensorboardLogger

sys.path.insert(0, str(Path(__file__).parent))
import bench

import engine_opt

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def base_package(revision: str) -> Iterator[ModuleType]:
    """``engine_opt`` as of ``revision``, importable as ``engine_opt_base`` (its imports are relative)."""
    directory = Path(tempfile.mkdtemp(prefix="engine-opt-base-"))
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", revision, "engine_opt"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        archive_path = directory / "base.tar"
        archive_path.write_bytes(archive)
        with tarfile.open(archive_path) as tar:
            tar.extractall(directory, filter="data")
        (directory / "engine_opt").rename(directory / "engine_opt_base")
        sys.path.insert(0, str(directory))
        yield importlib.import_module("engine_opt_base")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def runners(
    package: ModuleType, config: bench.Config, logdir: Path, loggers: list[TensorboardLogger]
) -> dict[str, Callable[[list[Any]], None]]:
    """The wrapper loop and the trainer with its logger, built from ``package``."""
    handlers = importlib.import_module(f"{package.__name__}.handlers")
    model, trainer_model = bench.make_model(config.model), bench.make_model(config.model)
    loss_fn = bench.loss_fn_for(config.model)

    def build(params: Any) -> Any:
        kwargs: dict[str, Any] = {"accumulative_counts": config.accumulate}
        if config.clip:
            kwargs["clip_grad"] = {"max_norm": bench.MAX_NORM}
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        if config.precision == "fp32":
            return package.OptimWrapper(optimizer, **kwargs)
        return package.AmpOptimWrapper(optimizer=optimizer, dtype=config.precision, **kwargs)

    wrapper = build(model.parameters())

    def wrapper_loop(batches: list[Any]) -> None:
        for x, y in batches:
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)

    trainer_wrapper = build(trainer_model.parameters())
    trainer = package.create_trainer(trainer_model, trainer_wrapper, loss_fn)
    logger = TensorboardLogger(log_dir=str(logdir))
    loggers.append(logger)
    every = package.OptimEvents.OPTIM_STEP_COMPLETED(every=10)
    logger.attach(trainer, handlers.OptimParamsHandler(trainer_wrapper), every)
    return {"wrapper": wrapper_loop, "trainer": lambda batches: trainer.run(batches, max_epochs=1) and None}


def compare(base: ModuleType, config: bench.Config, repeats: int, target_s: float, logdir: Path) -> dict[Any, float]:
    device = torch.device("cpu")
    pool = bench.make_batches(config.model, device)
    n = bench.iterations_for(config, device, target_s, pool)
    batches = [pool[i % len(pool)] for i in range(n)]
    loggers: list[TensorboardLogger] = []
    built = {
        "this": runners(engine_opt, config, logdir / f"{config.label()}-this", loggers),
        "base": runners(base, config, logdir / f"{config.label()}-base", loggers),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for tree, impls in built.items():
        for impl, run in impls.items():
            run(batches[:4])  # warm up
            times[(tree, impl)] = []
    for _ in range(repeats):
        for tree, impls in built.items():
            for impl, run in impls.items():
                times[(tree, impl)].append(bench.timed(run, batches, device))
    for logger in loggers:
        logger.close()
    return {
        **{key: statistics.median(values) for key, values in times.items()},
        **{(*key, "min"): min(values) for key, values in times.items()},
    }


def count_calls(base: ModuleType, config: bench.Config, logdir: Path) -> dict[Any, tuple[float, float]]:
    """Python function calls of each tree's wrapper loop and trainer: per iteration, and once per run.

    Each is profiled (after a warm-up) on a run of ``n`` iterations and on one of ``2n``: the difference is
    ``n`` iterations' calls, so what a run costs once (a trainer's start and end) is told apart from what each
    iteration costs.
    """
    pool = bench.make_batches(config.model, torch.device("cpu"), pool=8)
    short, long = pool * 5, pool * 10
    loggers: list[TensorboardLogger] = []
    counts: dict[Any, tuple[float, float]] = {}
    for tree, package in (("this", engine_opt), ("base", base)):
        for impl, run in runners(package, config, logdir / f"{config.label()}-{tree}-calls", loggers).items():
            run(pool)
            calls = []
            for batches in (short, long):
                profile = cProfile.Profile()
                profile.runcall(run, batches)
                stats = pstats.Stats(profile, stream=io.StringIO()).stats  # type: ignore[attr-defined]
                calls.append(sum(entry[1] for entry in stats.values()))
            per_iteration = (calls[1] - calls[0]) / (len(long) - len(short))
            counts[(tree, impl)] = (per_iteration, calls[0] - per_iteration * len(short))
    for logger in loggers:
        logger.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision to compare with")
    parser.add_argument("--models", nargs="+", default=["tiny", "mlp"], choices=["tiny", "mlp", "cnn"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=list(bench.PRECISIONS))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--block-seconds", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", action="store_true", help="count Python calls per iteration instead of timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logdir = Path(tempfile.mkdtemp(prefix="engine-opt-compare-"))
    if args.calls:
        print(f"this tree against {args.base}: Python function calls per iteration, and per trainer run (cProfile)")
        print(f"{'row':<24} {'wrapper':>36} {'trainer':>36} {'per run':>9}")
    else:
        print(f"this tree against {args.base}, {args.repeats} interleaved repeats, median time per iteration")
        print(f"{'row':<24} {'wrapper':>36} {'trainer':>36}")
    try:
        with base_package(args.base) as base:
            for model, precision, accumulate, clip in itertools.product(
                args.models, args.precisions, (1, 4), (False, True)
            ):
                config = bench.Config(model, precision, accumulate, clip)
                if args.calls:
                    calls = count_calls(base, config, logdir)
                    cells = [
                        f"{calls[('this', impl)][0]:7.1f} / {calls[('base', impl)][0]:7.1f} calls "
                        f"{calls[('this', impl)][0] - calls[('base', impl)][0]:+6.1f}"
                        for impl in ("wrapper", "trainer")
                    ]
                    per_run = calls[("this", "trainer")][1] - calls[("base", "trainer")][1]
                    print(f"{config.label():<24} {cells[0]:>36} {cells[1]:>36} {per_run:+9.0f}", flush=True)
                    continue
                medians = compare(base, config, args.repeats, args.block_seconds, logdir)
                cells = [
                    f"{medians[('this', impl)] * 1e6:9.1f} / {medians[('base', impl)] * 1e6:9.1f} us "
                    f"{medians[('this', impl)] / medians[('base', impl)]:.3f} "
                    f"({medians[('this', impl, 'min')] / medians[('base', impl, 'min')]:.3f})"
                    for impl in ("wrapper", "trainer")
                ]
                print(f"{config.label():<24} {cells[0]:>36} {cells[1]:>36}", flush=True)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
