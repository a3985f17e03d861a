"""What ``UpdateTelemetryHandler`` costs: per measured update, and on the updates it does not measure.

    python benchmarks/telemetry.py                        # tiny and mlp, fp32 and fp16, 9 interleaved repeats
    python benchmarks/telemetry.py --models mlp --precisions fp32 --repeats 15

The same trainer as ``bench.py``'s ``trainer`` row (``create_trainer`` with
``OptimParamsHandler`` to TensorBoard every 10 updates), four ways, A B C D
A B C D ... in one process: without telemetry (``none``); with an
``UpdateTelemetryHandler`` attached that never measures (``idle``: ``every``
above the run's updates, the cost on updates it does not measure); measuring
every 10th update (``every10``); and every update (``every1``, one logged
update per iteration); and the bare wrapper loop without and with a handler
that measures every update and is read each iteration (``loop``,
``loop every1``: the measuring alone, no logger). It prints the median time
per iteration of ``none`` and the others as ratios to it, side by side, then
the cost of one measured update through the trainer and TensorBoard
(``every1 - none``) and in the bare loop, and the Python calls per iteration
of ``none`` and ``idle`` (``cProfile``, deterministic). A measuring script,
not a timed test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from ignite.handlers.tensorboard_logger import TensorboardLogger

sys.path.insert(0, str(Path(__file__).parent))
import bench

from engine_opt import OptimEvents, create_trainer
from engine_opt.handlers import OptimParamsHandler, UpdateTelemetryHandler

VARIANTS: dict[str, int | None] = {"none": None, "idle": 10**9, "every10": 10, "every1": 1}


def trainer_runner(
    config: bench.Config, every: int | None, logdir: Path, loggers: list[TensorboardLogger]
) -> Callable[[list[Any]], None]:
    model = bench.make_model(config.model)
    wrapper = bench.make_wrapper(config, model)
    trainer = create_trainer(model, wrapper, bench.loss_fn_for(config.model))
    logger = TensorboardLogger(log_dir=str(logdir))
    loggers.append(logger)
    logger.attach(trainer, OptimParamsHandler(wrapper), OptimEvents.OPTIM_STEP_COMPLETED(every=10))
    if every is not None:
        logger.attach(
            trainer, UpdateTelemetryHandler(wrapper, every=every, model=model, depth=1), Events.ITERATION_COMPLETED
        )
    return lambda batches: trainer.run(batches, max_epochs=1) and None


def loop_runner(config: bench.Config, every: int | None) -> Callable[[list[Any]], None]:
    model = bench.make_model(config.model)
    wrapper = bench.make_wrapper(config, model)
    loss_fn = bench.loss_fn_for(config.model)
    telemetry = None if every is None else UpdateTelemetryHandler(wrapper, every=every, model=model, depth=1)

    def run(batches: list[Any]) -> None:
        for x, y in batches:
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)
            if telemetry is not None:
                telemetry.read()

    return run


def calls_per_iteration(run: Callable[[list[Any]], None], batches: list[Any]) -> float:
    run(batches[:8])
    profile = cProfile.Profile()
    profile.runcall(run, batches)
    stats = pstats.Stats(profile, stream=io.StringIO()).stats  # type: ignore[attr-defined]
    return sum(entry[1] for entry in stats.values()) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "mlp"], choices=["tiny", "mlp", "cnn"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=list(bench.PRECISIONS))
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--clip", action="store_true")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--block-seconds", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    logdir = Path(tempfile.mkdtemp(prefix="engine-opt-telemetry-"))
    print(f"{args.repeats} interleaved repeats, median time per iteration; the others as a ratio to none")
    header = f"{'row':<22} {'none':>10} {'idle':>8} {'every10':>8} {'every1':>8}"
    header += f" {'per measured':>13} {'in the loop':>13} {'calls none/idle':>18}"
    print(header)
    try:
        for model in args.models:
            for precision in args.precisions:
                config = bench.Config(model, precision, args.accumulate, args.clip)
                pool = bench.make_batches(model, device)
                n = bench.iterations_for(config, device, args.block_seconds, pool)
                batches = [pool[i % len(pool)] for i in range(n)]
                loggers: list[TensorboardLogger] = []
                runners = {
                    name: trainer_runner(config, every, logdir / f"{config.label()}-{name}", loggers)
                    for name, every in VARIANTS.items()
                }
                runners.update(loop=loop_runner(config, None), loop_every1=loop_runner(config, 1))
                for run in runners.values():
                    run(batches[:4])  # warm up
                times: dict[str, list[float]] = {name: [] for name in runners}
                for _ in range(args.repeats):
                    for name, run in runners.items():
                        times[name].append(bench.timed(run, batches, device))
                median = {name: statistics.median(values) for name, values in times.items()}
                calls = [
                    calls_per_iteration(runners[name], bench.make_batches(model, device) * 5)
                    for name in ("none", "idle")
                ]
                for logger in loggers:
                    logger.close()
                base = median["none"]
                ratios = " ".join(f"{median[name] / base:8.3f}" for name in ("idle", "every10", "every1"))
                measured = (median["every1"] - base) * 1e6 * args.accumulate
                alone = (median["loop_every1"] - median["loop"]) * 1e6 * args.accumulate
                print(
                    f"{config.label():<22} {base * 1e6:7.1f} us {ratios} {measured:+10.1f} us {alone:+10.1f} us "
                    f"{calls[0]:8.1f} / {calls[1]:7.1f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
