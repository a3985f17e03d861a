"""engine_opt against the loop a user writes by hand, measured side by side.

    python benchmarks/bench.py                  # the full run: about 9 minutes on 2 CPU cores
    python benchmarks/bench.py --smoke          # every code path, a few iterations (CI)
    python benchmarks/bench.py --docs           # also rewrite the table and plot in docs/benchmarks.md

For each model (tiny: ``nn.Linear`` on a batch of 10; mlp; cnn), precision
(fp32, bf16, fp16), accumulation (1, 4) and clipping (off, on), it times
four implementations of the same training, in one process, interleaved
(A B C D A B C D ...), with the same model, data and seed:

- ``plain``: the tutorial's hand-written loop (autocast, GradScaler, clip_grad_norm_ written out);
- ``wrapper``: the same loop with ``optim_context`` and ``update_params``;
- ``trainer``: ``create_trainer`` with ``OptimParamsHandler`` logging to TensorBoard every 10 updates;
- ``ignite``: Ignite's ``create_supervised_trainer`` where it does the same job (fp32, no clipping).

It reports the median time per iteration with its spread (min and max over
the repeats), the ratio to ``plain``, the peak memory of each implementation
(the process's peak RSS on CPU, in a fresh process per measurement;
``torch.cuda.max_memory_allocated`` on GPU), and the gradient communication
per applied update of a 2-process DDP run. It writes ``results.md``,
``results.json`` and ``results.png`` to ``--out`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.engine import create_supervised_trainer
from ignite.handlers.tensorboard_logger import TensorboardLogger
from torch import nn

from engine_opt import AmpOptimWrapper, OptimEvents, OptimWrapper, create_trainer
from engine_opt.handlers import OptimParamsHandler
from engine_opt.testing import GradientTraffic

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
IMPLS = ("plain", "wrapper", "trainer", "ignite")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_NORM = 1.0


# ---------------------------------------------------------------------------------------------- what is trained


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "tiny":
        return nn.Linear(10, 10)
    if name == "mlp":
        return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512))
    return nn.Sequential(  # cnn: 3x32x32 images, 10 classes
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def make_batches(name: str, device: torch.device, pool: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    shapes = {"tiny": ((10, 10), (10, 10)), "mlp": ((64, 512), (64, 512)), "cnn": ((32, 3, 32, 32), None)}
    x_shape, y_shape = shapes[name]
    batches = []
    for _ in range(pool):
        x = torch.randn(*x_shape, generator=generator)
        y = torch.randn(*y_shape, generator=generator) if y_shape else torch.randint(0, 10, (32,), generator=generator)
        batches.append((x.to(device), y.to(device)))
    return batches


def loss_fn_for(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "cnn":
        return lambda y_pred, y: F.cross_entropy(y_pred.float(), y)
    return lambda y_pred, y: F.mse_loss(y_pred.float(), y)


@dataclass(frozen=True)
class Config:
    model: str
    precision: str
    accumulate: int
    clip: bool

    def impls(self) -> tuple[str, ...]:
        plain_job = self.precision == "fp32" and not self.clip  # Ignite's trainer has no clipping; its AMP is CUDA-only
        return IMPLS if plain_job else IMPLS[:3]

    def label(self) -> str:
        return f"{self.model} {self.precision} acc{self.accumulate}{' clip' if self.clip else ''}"


# ---------------------------------------------------------------------------------------------- the four loops


def plain_runner(config: Config, model: nn.Module, device: torch.device) -> Callable[[list[Any]], None]:
    """The tutorial's hand-written loop."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = PRECISIONS[config.precision]
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    loss_fn = loss_fn_for(config.model)
    acc = config.accumulate

    def run(batches: list[Any]) -> None:
        for index, (x, y) in enumerate(batches):
            if dtype is None:  # the tutorial's fp32 loop has no autocast at all
                loss = loss_fn(model(x), y)
            else:
                with torch.autocast(device.type, dtype=dtype):
                    loss = loss_fn(model(x), y)
            if acc > 1:
                loss = loss / acc
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            if (index + 1) % acc == 0:
                if config.clip:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad()

    return run


def make_wrapper(config: Config, model: nn.Module) -> OptimWrapper:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kwargs: dict[str, Any] = {"accumulative_counts": config.accumulate}
    if config.clip:
        kwargs["clip_grad"] = {"max_norm": MAX_NORM}
    if config.precision == "fp32":
        return OptimWrapper(optimizer, **kwargs)
    return AmpOptimWrapper(optimizer=optimizer, dtype=config.precision, **kwargs)


def wrapper_runner(config: Config, model: nn.Module, device: torch.device) -> Callable[[list[Any]], None]:
    wrapper = make_wrapper(config, model)
    loss_fn = loss_fn_for(config.model)

    def run(batches: list[Any]) -> None:
        for x, y in batches:
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)

    return run


def trainer_runner(config: Config, model: nn.Module, device: torch.device) -> Callable[[list[Any]], None]:
    wrapper = make_wrapper(config, model)
    trainer = create_trainer(model, wrapper, loss_fn_for(config.model))
    logdir = tempfile.mkdtemp(prefix="engine-opt-bench-")
    logger = TensorboardLogger(log_dir=logdir)
    logger.attach(trainer, OptimParamsHandler(wrapper), OptimEvents.OPTIM_STEP_COMPLETED(every=10))
    weakref.finalize(trainer, remove_logs, logger, logdir)  # when the trainer goes, or at exit
    return lambda batches: trainer.run(batches, max_epochs=1) and None


def remove_logs(logger: TensorboardLogger, logdir: str) -> None:
    logger.close()
    shutil.rmtree(logdir, ignore_errors=True)


def ignite_runner(config: Config, model: nn.Module, device: torch.device) -> Callable[[list[Any]], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = create_supervised_trainer(
        model,
        optimizer,
        loss_fn_for(config.model),
        device=device,
        gradient_accumulation_steps=config.accumulate,
        output_transform=lambda x, y, y_pred, loss: loss.detach(),  # no .item(): no host sync, like the others
    )
    return lambda batches: trainer.run(batches, max_epochs=1) and None


RUNNERS = {"plain": plain_runner, "wrapper": wrapper_runner, "trainer": trainer_runner, "ignite": ignite_runner}


# ---------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[list[Any]], None], batches: list[Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run(batches)
    synchronize(device)
    return (time.perf_counter() - start) / len(batches)


def iterations_for(config: Config, device: torch.device, target_s: float, pool: list[Any]) -> int:
    """Enough iterations (a multiple of 4) for one timed block to last about ``target_s``."""
    run = plain_runner(config, make_model(config.model).to(device), device)
    run(pool[:4])
    per_iteration = timed(run, pool[:4], device)
    return max(4, int(target_s / per_iteration) // 4 * 4)


def measure_speed(config: Config, device: torch.device, repeats: int, target_s: float) -> dict[str, list[float]]:
    """Seconds per iteration of each implementation, ``repeats`` times, interleaved."""
    pool = make_batches(config.model, device)
    n = iterations_for(config, device, target_s, pool)
    batches = [pool[i % len(pool)] for i in range(n)]
    runners = {impl: RUNNERS[impl](config, make_model(config.model).to(device), device) for impl in config.impls()}
    for run in runners.values():  # warm up: allocator, kernels, lazy state
        run(batches[: min(n, 4)])
    times: dict[str, list[float]] = {impl: [] for impl in runners}
    for _ in range(repeats):
        for impl, run in runners.items():
            times[impl].append(timed(run, batches, device))
    return times


def memory_probe(config: Config, impl: str, device: torch.device, iterations: int) -> dict[str, float]:
    """Peak memory of one implementation, measured in this (fresh) process: MiB."""
    pool = make_batches(config.model, device)
    model = make_model(config.model).to(device)
    run = RUNNERS[impl](config, model, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run([pool[i % len(pool)] for i in range(iterations)])
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "base_mib": base / 2**20}
    base = _rss_mib()
    run([pool[i % len(pool)] for i in range(iterations)])
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_mib": base}


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory(config: Config, device: torch.device, iterations: int) -> dict[str, dict[str, float]]:
    """Each implementation's peak, each in a new process (a process's peak RSS never comes down)."""
    results = {}
    for impl in config.impls():
        cmd = [sys.executable, __file__, "--probe", json.dumps({**asdict(config), "impl": impl, "n": iterations})]
        cmd += ["--device", str(device), "--threads", str(torch.get_num_threads())]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# ---------------------------------------------------------------------------------------------- gradient traffic


TRAFFIC_RUNS: dict[str, tuple[str, int, bool, bool]] = {  # name: sharding, accumulation, avoid sync, each micro-step
    "DDP acc1": ("ddp", 1, True, False),
    "DDP acc4": ("ddp", 4, True, False),
    "DDP acc4, no no_sync": ("ddp", 4, False, False),
    "DDP acc4, sync_each_micro_step": ("ddp", 4, True, True),
    "FSDP2 acc4": ("fsdp2", 4, True, False),
    "FSDP2 acc4, sync_each_micro_step": ("fsdp2", 4, True, True),
    "FSDP2 acc4, no flag": ("fsdp2", 4, False, False),
    "HSDP acc4": ("hsdp", 4, True, False),
    "HSDP acc4, sync_each_micro_step": ("hsdp", 4, True, True),
    "HSDP acc4, no flag": ("hsdp", 4, False, False),
}


def _sharded(model: nn.Module, sharding: str) -> nn.Module:
    """The model under DDP, FSDP2, or HSDP over 2 replicas of 1 shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if sharding == "ddp":
        return idist.auto_model(model)  # type: ignore[no-any-return]
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")) if sharding == "hsdp" else None
    fully_shard(model, mesh=mesh)
    return model


def _traffic_rank(local_rank: int, out: str) -> None:
    torch.manual_seed(0)
    results = {}
    batches = make_batches("mlp", torch.device("cpu"))
    for name, (sharding, accumulate, avoid_sync, each_micro_step) in TRAFFIC_RUNS.items():
        model = _sharded(make_model("mlp"), sharding)
        traffic = GradientTraffic(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        wrapper = OptimWrapper(optimizer, accumulative_counts=accumulate, sync_each_micro_step=each_micro_step)
        for x, y in [batches[i % len(batches)] for i in range(8)]:
            context = wrapper.optim_context(model) if avoid_sync else contextlib.nullcontext()
            with context:
                loss = F.mse_loss(model(x), y)
            wrapper.update_params(loss)
        results[name] = {"calls": traffic.calls, "bytes": traffic.bytes, "updates": wrapper.applied_steps}
    if idist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))


def measure_traffic() -> dict[str, dict[str, int]]:
    """2-process runs (gloo) of the mlp, DDP, FSDP2 and HSDP: gradient reductions and bytes per applied update."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "traffic.json"
        subprocess.run([sys.executable, __file__, "--traffic", str(out)], check=True, capture_output=True, text=True)
        return json.loads(out.read_text())  # type: ignore[no-any-return]


def traffic_main(out: str) -> None:
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_traffic_rank, out)


# ---------------------------------------------------------------------------------------------- reporting


def configs(models: list[str]) -> Iterator[Config]:
    for model in models:
        for precision in PRECISIONS:
            for accumulate in (1, 4):
                for clip in (False, True):
                    yield Config(model, precision, accumulate, clip)


def spread(values: list[float]) -> str:
    median = statistics.median(values)
    return f"-{(median - min(values)) / median:.0%}/+{(max(values) - median) / median:.0%}"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"Measured {meta['date']} on {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), "
        f"{meta['repeats']} interleaved repeats; `{meta['command']}`.",
        "",
        "Time per iteration: median over the repeats (spread: min and max relative to the median); "
        "the others as a ratio to `plain`, the hand-written loop.",
        "",
        "| model | precision | acc | clip | plain | wrapper | trainer | ignite |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["speed"]:
        times = row["times"]
        plain = statistics.median(times["plain"])
        cells = [f"{plain * 1e6:,.0f} µs ({spread(times['plain'])})"]
        for impl in IMPLS[1:]:
            if impl not in times:
                cells.append("-")
                continue
            ratio = statistics.median(times[impl]) / plain
            extra = (statistics.median(times[impl]) - plain) * 1e6
            cells.append(f"{ratio:.3f} ({extra:+.1f} µs, {spread(times[impl])})")
        c = row["config"]
        clip = "on" if c["clip"] else "off"
        lines.append(f"| {c['model']} | {c['precision']} | {c['accumulate']} | {clip} | {' | '.join(cells)} |")
    if results["memory"]:
        unit = "peak CUDA memory allocated" if meta["device"].startswith("cuda") else "peak process RSS"
        lines += [
            "",
            f"Memory: {unit} above what the process held once the model and data were built (MiB; each "
            f"implementation in a fresh process, {meta['memory_iterations']} iterations, accumulation 1, no clipping):",
            "",
        ]
        lines += ["| model | precision | plain | wrapper | trainer | ignite |", "|---|---|---|---|---|---|"]
        for row in results["memory"]:
            c, mem = row["config"], row["memory"]
            cells = [f"{mem[i]['peak_mib'] - mem[i]['base_mib']:,.1f}" if i in mem else "-" for i in IMPLS]
            lines.append(f"| {c['model']} | {c['precision']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def traffic_markdown(traffic: dict[str, dict[str, int]], measured: str) -> str:
    """The gradient communication table of ``measure_traffic``'s runs, measured on the date ``measured``."""
    lines = [
        f"Measured {measured}: gradient communication of 2-process runs (gloo), mlp, 8 iterations "
        "(DDP: a reduction is one bucket, and the mlp's gradients fill two, one after the first iteration; FSDP2: "
        "one reduce-scatter of the whole model; HSDP, 2 replicas of 1 shard: one all-reduce across the replicas, "
        "the reduce-scatter over a shard group of one being skipped); `python benchmarks/bench.py --traffic-docs`.",
        "",
        "| run | reductions | per applied update | MiB per applied update |",
        "|---|---|---|---|",
    ]
    for name, t in traffic.items():
        calls, updates, mib = t["calls"], t["updates"], t["bytes"] / t["updates"] / 2**20
        lines.append(f"| {name} | {calls} | {calls / updates:.2f} | {mib:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["speed"]
    labels = [Config(**row["config"]).label() for row in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.45), 4.5))
    width = 0.27
    for offset, impl in enumerate(IMPLS[1:]):
        ratios = [
            statistics.median(row["times"][impl]) / statistics.median(row["times"]["plain"])
            if impl in row["times"]
            else float("nan")
            for row in rows
        ]
        ax.bar([i + (offset - 1) * width for i in range(len(rows))], ratios, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("time per iteration / hand-written loop")
    ax.set_title(f"engine_opt vs the hand-written loop ({results['meta']['machine']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(table: str, png: Path) -> None:
    write_block("results", f"{table}\n![ratios](benchmarks.png)")
    (DOCS.parent / "benchmarks.png").write_bytes(png.read_bytes())


def write_block(name: str, content: str) -> None:
    """Replace the block ``name`` of docs/benchmarks.md (between its two markers) with ``content``."""
    start, end = f"<!-- {name}: rendered by benchmarks/bench.py -->", f"<!-- end of {name} -->"
    text = DOCS.read_text()
    head, tail = text.split(start)[0], text.split(end)[1]
    DOCS.write_text(f"{head}{start}\n{content}\n{end}{tail}")


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every path, a few iterations, no figures worth reading")
    parser.add_argument("--models", nargs="+", choices=["tiny", "mlp", "cnn"], help="default: all (--smoke: tiny)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default: 7)")
    parser.add_argument("--block-seconds", type=float, default=0.3, help="length of one timed block")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, the steadiest figures)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--docs", action="store_true", help="rewrite the table and the plot in docs/benchmarks.md")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-traffic", action="store_true")
    parser.add_argument("--render", type=Path, help="only render RESULTS.json again (table, plot, --docs)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--traffic-docs", action="store_true", help="measure the gradient traffic alone, into the docs")
    parser.add_argument("--traffic", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.traffic:
        traffic_main(args.traffic)
        return
    if args.traffic_docs:
        write_block("traffic", traffic_markdown(measure_traffic(), date.today().isoformat()))
        return
    if args.render:
        results = json.loads(args.render.read_text())
        report(results, args.out, args.docs)
        return
    if args.probe:
        spec = json.loads(args.probe)
        impl, n = spec.pop("impl"), spec.pop("n")
        print(json.dumps(memory_probe(Config(**spec), impl, device, n)))
        return
    repeats, block = (1, 0.005) if args.smoke else (args.repeats, args.block_seconds)
    models = args.models or (["tiny"] if args.smoke else ["tiny", "mlp", "cnn"])
    memory_iterations = 4 if args.smoke else 20
    start = time.perf_counter()
    speed, memory = [], []
    for config in configs(models):
        print(f"{config.label():<24}", end=" ", flush=True)
        times = measure_speed(config, device, repeats, block)
        speed.append({"config": asdict(config), "times": times})
        plain = statistics.median(times["plain"])
        print(" ".join(f"{impl} {statistics.median(t) / plain:.3f}" for impl, t in times.items()), flush=True)
        if not args.no_memory and config.accumulate == 1 and not config.clip and not (args.smoke and memory):
            memory.append({"config": asdict(config), "memory": measure_memory(config, device, memory_iterations)})
    traffic = {} if args.no_traffic else measure_traffic()
    meta = {
        "date": date.today().isoformat(),
        "machine": machine(device),
        "device": str(device),
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": repeats,
        "memory_iterations": memory_iterations,
        "seconds": round(time.perf_counter() - start, 1),
        "command": " ".join(["python benchmarks/bench.py", *measuring_arguments(argv)]),
    }
    results = {"meta": meta, "speed": speed, "memory": memory, "traffic": traffic}
    report(results, args.out, args.docs)


def measuring_arguments(argv: list[str]) -> list[str]:
    """The command-line arguments that change what is measured (not where it is written)."""
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--out":
            skip_value = True
        elif arg != "--docs" and not arg.startswith("--out="):
            kept.append(arg)
    return kept


def report(results: dict[str, Any], out: Path, docs: bool) -> None:
    """Write results.json, results.md and results.png to ``out``; with ``docs``, copy the table and plot there."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    traffic = traffic_markdown(results["traffic"], results["meta"]["date"]) if results["traffic"] else ""
    (out / "results.md").write_text(f"{table}\n{traffic}")
    plot(results, out / "results.png")
    if docs:
        write_docs(table, out / "results.png")
        if traffic:
            write_block("traffic", traffic)
    print(f"\n{table}\nwrote {out}/results.md, results.json, results.png ({results['meta']['seconds']} s of measuring)")


if __name__ == "__main__":
    main()
