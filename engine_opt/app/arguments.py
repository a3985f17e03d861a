"""``engine-opt``'s arguments: the parser, which imports neither torch nor Ignite.

``--help``, ``--version`` and every refused argument answer before the
command loads torch (seconds): ``engine_opt.app.start`` parses with this
parser first.

Examples:
    >>> argv = ["train", "--dtype", "bfloat16", "--config", "no-such.json"]
    >>> args = build_parser().parse_args(argv)
    >>> args.dtype, args.task
    ('bf16', 'classifier')
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from .. import __version__

TASKS = ("classifier", "gan")
"""The built-in tasks (``engine_opt.app.tasks``)."""
TASK_MEMBERS = {"gan": ["disc", "gen"]}
"""A task's wrapper members, by which a ``--config`` names its task."""


DEFAULT_EPOCHS = 5
"""Epochs when neither ``--epochs`` nor a Python config's ``train_cfg`` gives them."""
DEFAULT_BATCH_SIZE = 64
"""The global batch when neither ``--batch-size`` nor a Python config's ``train_dataloader`` gives it."""


def is_python_config(path: Path | None) -> bool:
    """Whether ``--config`` names a Python run config (a ``.py`` file) rather than a JSON wrapper config."""
    return path is not None and path.suffix.lower() == ".py"


def task_of_config(path: Path | None) -> str:
    """The task a ``--config`` is for, when ``--task`` is not given: ``gan`` for members ``gen`` and ``disc``.

    A file that cannot be read or parsed says nothing here; the command reports it when it loads the config.
    """
    if path is None or not path.is_file():  # a pipe (<(...), /dev/stdin) is read once, by the command
        return "classifier"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return "classifier"
    members = sorted(cfg) if isinstance(cfg, dict) else None
    return next((task for task, names in TASK_MEMBERS.items() if names == members), "classifier")


_DTYPES = ("fp32", "bf16", "fp16")
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""``--dtype``: torch's names, which stand for the short ones."""
_MAX_THREADS = 1024


def _threads(text: str) -> int:
    value = _positive_int(text)
    if value > _MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected a thread count from 1 to {_MAX_THREADS}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse's parser, and ``--task`` left out resolved from ``--config`` (``task_of_config``)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        if is_python_config(getattr(parsed, "config", None)):
            if parsed.task is not None:
                self.error(f"--task {parsed.task}: the Python config {parsed.config} defines the model and data")
            parsed.task = parsed.config.stem
        elif getattr(parsed, "task", "") is None:
            parsed.task = task_of_config(parsed.config)
        if getattr(parsed, "dtype", None) in _DTYPE_NAMES:
            parsed.dtype = _DTYPE_NAMES[parsed.dtype]
        return parsed, extra


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``engine-opt``."""
    parser = _Parser(prog="engine-opt", description="Train with engine_opt's optimizer wrappers.")
    parser.add_argument("--version", action="version", version=f"engine-opt {__version__}")
    # the subcommands parse plainly; the top level resolves what depends on several options, once
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=argparse.ArgumentParser
    )
    train = commands.add_parser("train", help="train your model (--config FILE.py) or a built-in synthetic task")
    for add_options in (_task_options, _distributed_options, _wrapper_options, _strategy_options, _output_options):
        add_options(train)
    return parser


def _task_options(train: argparse.ArgumentParser) -> None:
    task = train.add_argument_group("task")
    task.add_argument(
        "--task",
        choices=TASKS,
        help="a built-in task (default: gan for a --config with its members gen and disc, else classifier; a Python "
        "--config defines its own)",
    )
    task.add_argument(
        "--epochs",
        type=_positive_int,
        help=f"epochs to train, in total (default: a Python config's train_cfg max_epochs, else {DEFAULT_EPOCHS})",
    )
    task.add_argument(
        "--batch-size",
        type=_positive_int,
        help="batch size of one iteration, over all processes (default: a Python config's train_dataloader "
        f"batch_size, else {DEFAULT_BATCH_SIZE})",
    )
    task.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default: 0)")
    task.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    task.add_argument(
        "--threads",
        type=_threads,
        help="torch's CPU threads in each process (default: OMP_NUM_THREADS where it is set, else 1 on CPU, where "
        "the built-in tasks are too small to gain from more and a busy machine makes more many times slower; "
        "torch's own on GPUs)",
    )


def _distributed_options(train: argparse.ArgumentParser) -> None:
    parallel = train.add_argument_group("distributed (ignite.distributed)")
    parallel.add_argument(
        "--nproc-per-node",
        type=_positive_int,
        help="spawn this many data-parallel processes (default: 1, or those torchrun started)",
    )
    parallel.add_argument(
        "--backend", choices=("gloo", "nccl"), help="torch.distributed backend (default: nccl on GPUs, else gloo)"
    )


def _wrapper_options(train: argparse.ArgumentParser) -> None:
    wrapper = train.add_argument_group("wrapper (or --config)")
    wrapper.add_argument(
        "--config",
        type=Path,
        help="a JSON build_optim_wrapper config for a built-in task, or a Python run config (FILE.py) defining "
        "your model, data, loss and optionally optim_wrapper and param_scheduler (default: none, the options below; "
        "see examples/configs/)",
    )
    wrapper.add_argument(
        "--wrapper",
        choices=("OptimWrapper", "AmpOptimWrapper"),
        help="wrapper type (default: OptimWrapper, AmpOptimWrapper with --dtype bf16/fp16)",
    )
    wrapper.add_argument(
        "--dtype",
        choices=(*_DTYPES, *_DTYPE_NAMES),
        help="fp32, or bf16/fp16 mixed precision; float32, bfloat16, float16 name the same (default: fp32)",
    )
    wrapper.add_argument("--accumulate", type=_positive_int, help="micro-batches per update (default: 1)")
    wrapper.add_argument(
        "--clip-norm", type=_positive_float, help="clip the gradient norm to this value (default: no clipping)"
    )
    wrapper.add_argument(
        "--optimizer",
        help="any torch.optim name, a dotted path to one (schedulefree.AdamWScheduleFree), or Muon: Muon for the "
        "hidden layers' weights, AdamW for the rest, one --lr for both (default: the task's, AdamW for classifier, "
        "Adam for gan)",
    )
    wrapper.add_argument("--lr", type=_positive_float, help="learning rate (default: the task's, 0.001)")
    wrapper.add_argument(
        "--implementation",
        choices=("auto", "fused", "foreach", "for-loop", "torch"),
        help="how torch's optimizer steps: auto, the fastest measured for the optimizer, device and dtype (fused for "
        "SGD, Adam, AdamW on CPU); torch, torch's own default, as runs made before this option (default: auto)",
    )
    wrapper.add_argument(
        "--sam",
        type=_positive_float,
        metavar="RHO",
        help="sharpness-aware minimisation of this radius: two passes per update (default: off)",
    )


def _strategy_options(train: argparse.ArgumentParser) -> None:
    strategies = train.add_argument_group("strategies")
    strategies.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="lr schedule over the run's updates (default: constant)",
    )
    strategies.add_argument(
        "--nonfinite",
        choices=("off", "skip", "stop"),
        default="off",
        help="guard against nan/inf updates (default: off)",
    )
    strategies.add_argument(
        "--spike-guard",
        choices=("off", "skip", "rollback"),
        default="off",
        help="cancel updates whose loss or gradient norm spikes; rollback: after 3 in a row, back to the last "
        "snapshot (default: off)",
    )
    strategies.add_argument(
        "--num-items",
        choices=("off", "samples"),
        default="off",
        help="samples: each update is the mean loss over its window's samples, the batches' loss sums divided by "
        "their total count (token-weighted accumulation; exact for a short last batch; the classifier, and a Python "
        "config with the default loss_fn, counting every label; "
        "default: off, the mean of the batches' means)",
    )


def _output_options(train: argparse.ArgumentParser) -> None:
    output = train.add_argument_group("output")
    output.add_argument("--log-dir", type=Path, help="TensorBoard log directory (default: runs/TASK)")
    output.add_argument("--checkpoint-dir", type=Path, help="checkpoint directory (default: LOG_DIR/checkpoints)")
    output.add_argument("--checkpoint-every", type=_positive_int, help="save every N iterations (default: each epoch)")
    output.add_argument(
        "--log-every",
        type=_positive_int,
        default=10,
        metavar="N",
        help="log the loss every N iterations, and lr, momentum (beta1 for Adam-like optimizers) and update "
        "counts every N updates of each member, to TensorBoard; the starting and the last values too (default: 10)",
    )
    output.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint (default: a new run)"
    )
    output.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown on rank 0)")
    output.add_argument(
        "--telemetry",
        nargs="?",
        const=10,
        type=_positive_int,
        metavar="EVERY",
        help="log gradient, update and weight norms per param group and per top-level module of every EVERY-th "
        "update of each member to the TensorBoard directory (EVERY default: 10; default: off)",
    )
    output.add_argument(
        "--verbose", action="store_true", help="show the INFO messages of Ignite and torch (default: warnings only)"
    )


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "TASKS",
    "TASK_MEMBERS",
    "build_parser",
    "is_python_config",
    "task_of_config",
]
