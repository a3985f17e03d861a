"""The optimizer update against the machine's memory bandwidth: each implementation as a fraction of the floor.

    python benchmarks/bandwidth.py                               # 1M and 20M parameters, every row, 1 thread
    python benchmarks/bandwidth.py --sizes 100M --optimizers adamw --repeats 5
    python benchmarks/bandwidth.py --smoke                       # every path, tiny, a few steps (CI)

An update is a streaming pass over the parameters, their gradients and the
optimizer state, so its floor is the bytes it must move divided by the memory
bandwidth. The script measures the bandwidth first (torch's ``copy_``, a
triad ``a = b + s * c`` over buffers of 256 MB, far larger than the caches,
and an in-place ``a += s * b``, which moves what it counts, as an update
does; the fastest of the three is the floor's bandwidth), then times one update of each
row through the wrapper (``build_optim_wrapper(...).step()`` on gradients set
beforehand, no backward): SGD with momentum, Adam and AdamW; float32
parameters, bfloat16 parameters (and state), and float16 mixed precision
(float32 parameters, gradients scaled by a ``GradScaler``: unscaling, the
non-finite check, the step and the scale update); clipping by norm off and on
(``max_norm`` small enough to cut); with ``implementation='for-loop'``,
``'foreach'`` and ``'fused'``, and, where clipping is on, ``'fused'`` with
``clip_grad['fold_into_step']`` (``folded``). The parameters are tensors of
one million elements (``--tensor-size``), as many as the size needs.

Bytes an update must move, per parameter of ``b`` bytes: SGD with momentum
reads the parameter, gradient and momentum and writes the parameter and
momentum (``5b``); Adam and AdamW read the parameter, gradient and both
moments and write the parameter and moments (``7b``). A decision taken before
the step (clipping's norm, the float16 non-finite check) needs one more read
of the gradients (``+b``, one read serving both). Every variant of a row is
timed against the same floor: extra passes show as a larger ratio.

Repeats are interleaved (A B C D A B C D ...), each timing one update after
the gradients are restored (not timed; the folded and unscaling paths write
them). The table gives, per implementation, the minimum and median time and
the minimum's ratio to the floor (``1.00x`` is the bandwidth), and which one
``'auto'`` picks. A measuring script, not a timed test.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_opt import build_optim_wrapper
from engine_opt.optim.implementation import DEFAULT, FASTEST

OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"type": "SGD", "lr": 1e-3, "momentum": 0.9},
    "adam": {"type": "Adam", "lr": 1e-3},
    "adamw": {"type": "AdamW", "lr": 1e-3, "weight_decay": 0.01},
}
STREAMS = {"sgd": 5, "adam": 7, "adamw": 7}  # tensors of parameter size read or written per update
PRECISIONS = ("fp32", "bf16", "fp16")
VARIANTS = ("for-loop", "foreach", "fused", "folded")
BUFFER_BYTES = 256 * 2**20


def parse_size(text: str) -> int:
    """``'20M'`` -> 20_000_000; ``'0.01M'`` -> 10_000; plain integers as they are."""
    text = text.strip()
    if text.upper().endswith("M"):
        return int(float(text[:-1]) * 1_000_000)
    return int(text)


def measure_bandwidth(repeats: int, device: torch.device) -> dict[str, float]:
    """Bytes per second of three passes over 256 MB buffers, the best of ``repeats`` each, interleaved.

    ``copy`` (``a.copy_(b)``) and ``triad`` (``a = b + s * c``) count the
    bytes they name (2 and 3 buffers), though a CPU reads each destination
    line before writing it; ``update`` (``a += s * b``, in place: read two,
    write one) moves what it counts, as an optimizer's in-place update does.
    """
    n = BUFFER_BYTES // 4
    a, b, c = (torch.rand(n, device=device) for _ in range(3))
    passes: dict[str, tuple[int, Callable[[], Any]]] = {
        "copy": (2, lambda: a.copy_(b)),
        "triad": (3, lambda: torch.add(b, c, alpha=0.5, out=a)),
        "update": (3, lambda: a.add_(b, alpha=1e-3)),
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, (_, work) in passes.items():
            times[name].append(_timed(work, device))
    return {name: buffers * BUFFER_BYTES / min(times[name]) for name, (buffers, _) in passes.items()}


def _timed(work: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Row:
    size: int
    optimizer: str
    precision: str
    clip: bool

    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def must_move(self) -> int:
        """Bytes the update must move: the step's streams, and one read of the gradients before it if needed."""
        streams = STREAMS[self.optimizer] + (self.clip or self.precision == "fp16")
        return streams * self.size * torch.empty((), dtype=self.dtype()).element_size()

    def variants(self) -> tuple[str, ...]:
        return VARIANTS if self.clip else VARIANTS[:3]


class Params(nn.Module):
    """``size`` parameters in tensors of ``tensor_size`` elements, with gradients, and a copy to restore them."""

    def __init__(self, size: int, tensor_size: int, dtype: torch.dtype, grad_factor: float, device: torch.device):
        super().__init__()
        generator = torch.Generator(device=device).manual_seed(0)
        sizes = [tensor_size] * (size // tensor_size) + ([size % tensor_size] if size % tensor_size else [])
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(n, generator=generator, device=device).to(dtype)) for n in sizes
        )
        self.saved = [
            (torch.randn(n, generator=generator, device=device) * 0.01 * grad_factor).to(dtype) for n in sizes
        ]
        for param, grad in zip(self.weights, self.saved, strict=True):
            param.grad = grad.clone()

    def restore_grads(self) -> None:
        for param, grad in zip(self.weights, self.saved, strict=True):
            assert param.grad is not None
            param.grad.copy_(grad)


def make_wrapper(row: Row, variant: str, model: Params) -> Any:
    cfg: dict[str, Any] = {"optimizer": dict(OPTIMIZERS[row.optimizer])}
    cfg["implementation"] = "fused" if variant == "folded" else variant
    if row.precision == "fp16":
        cfg.update(type="AmpOptimWrapper", dtype="fp16")
    if row.clip:
        cfg["clip_grad"] = {"max_norm": 1e-3, **({"fold_into_step": True} if variant == "folded" else {})}
    wrapper = build_optim_wrapper(model, cfg)
    if wrapper.loss_scaler is not None:  # the scale tensor exists from the first scaled loss on
        wrapper.loss_scaler.scale(torch.ones((), device=model.saved[0].device))
    return wrapper


def auto_pick(row: Row, device: torch.device) -> str:
    name = OPTIMIZERS[row.optimizer]["type"]
    return FASTEST.get((name, device.type, row.dtype()), DEFAULT)


def run_row(row: Row, args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Per variant, the time of each repeat's update, interleaved."""
    grad_factor = 2.0**16 if row.precision == "fp16" else 1.0  # as a float16 scaler leaves them
    model = Params(row.size, args.tensor_size, row.dtype(), grad_factor, device)
    wrappers = {variant: make_wrapper(row, variant, model) for variant in row.variants()}
    times: dict[str, list[float]] = {variant: [] for variant in wrappers}
    for repeat in range(args.warmup + args.repeats):
        order = list(wrappers) if repeat % 2 == 0 else list(reversed(wrappers))
        for variant in order:
            model.restore_grads()
            elapsed = _timed(wrappers[variant].step, device)
            if repeat >= args.warmup:
                times[variant].append(elapsed)
    del wrappers, model
    gc.collect()
    return times


def duration(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:,.1f} ms"


def cell(times: list[float], floor: float) -> str:
    low, mid = min(times), statistics.median(times)
    return f"{duration(low)} / {duration(mid)}, {low / floor:.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,20M", help="parameter counts, comma-separated (default 1M,20M)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"of {list(OPTIMIZERS)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"of {list(PRECISIONS)}")
    parser.add_argument("--clip", default="off,on", help="off, on, or both (default)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats per row (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--tensor-size", type=int, default=1_000_000, help="elements per parameter tensor")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: every path runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats, args.warmup, args.tensor_size = "0.02M", 1, 1, 4096
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    optimizers = args.optimizers.split(",")
    precisions = args.precisions.split(",")
    clips = [{"off": False, "on": True}[value] for value in args.clip.split(",")]
    for name, given, known in (("optimizers", optimizers, OPTIMIZERS), ("precisions", precisions, PRECISIONS)):
        if unknown := [value for value in given if value not in known]:
            parser.error(f"--{name}: unknown {unknown}; accepted: {list(known)}")
    measured = measure_bandwidth(3 if args.smoke else 15, device)
    bandwidth = max(measured.values())
    print(
        f"{platform.machine()}, torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), "
        f"{args.repeats} interleaved repeats; bandwidth: "
        + ", ".join(f"{name} {value / 1e9:.2f} GB/s" for name, value in measured.items())
        + f" (the floor uses the best, {bandwidth / 1e9:.2f} GB/s)"
    )
    print(f"command: python benchmarks/bandwidth.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print()
    print("Each cell: minimum / median time per update, and the minimum as a multiple of the floor.")
    print()
    print("| params | optimizer | precision | clip | floor | for-loop | foreach | fused | folded | auto |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size_text in args.sizes.split(","):
        for optimizer in optimizers:
            for precision in precisions:
                for clip in clips:
                    row = Row(parse_size(size_text), optimizer, precision, clip)
                    floor = row.must_move() / bandwidth
                    times = run_row(row, args, device)
                    cells = [cell(times[variant], floor) if variant in times else "-" for variant in VARIANTS]
                    print(
                        f"| {size_text} | {optimizer} | {precision} | {'on' if clip else 'off'} | "
                        f"{duration(floor)} | {' | '.join(cells)} | {auto_pick(row, device)} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
