"""The ``build_optim_wrapper`` config that ``engine-opt train``'s options describe.

Examples:
    >>> import argparse
    >>> from engine_opt.app.tasks import make_task
    >>> args = argparse.Namespace(
    ...     config=None, wrapper=None, dtype="bf16", accumulate=4, clip_norm=None,
    ...     optimizer=None, lr=None, sam=None, implementation=None)
    >>> task = make_task("classifier", seed=0, batch_size=64)
    >>> wrapper_config(args, task)  # doctest: +NORMALIZE_WHITESPACE
    {'type': 'AmpOptimWrapper', 'optimizer': {'type': 'AdamW', 'lr': 0.001},
     'dtype': 'bf16', 'accumulative_counts': 4, 'implementation': 'auto'}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import nn

from .arguments import TASK_MEMBERS, is_python_config
from .tasks import Task

WRAPPER_FLAGS = ("wrapper", "dtype", "accumulate", "clip_norm", "optimizer", "lr", "sam", "implementation")
"""The options that make up a wrapper config; ``--config`` replaces them all."""


class UsageError(Exception):
    """A bad option or config: reported as a message, exit status 2."""


def wrapper_config(args: argparse.Namespace, task: Task, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``build_optim_wrapper`` config that the options describe (a dict per member for the GAN).

    ``given`` is a Python config's ``optim_wrapper``; like a JSON ``--config``, it replaces the wrapper options.
    """
    if given is not None or (args.config is not None and not is_python_config(args.config)):
        given_flags = [f"--{flag.replace('_', '-')}" for flag in WRAPPER_FLAGS if getattr(args, flag) is not None]
        if given_flags:
            source = "--config" if given is None else f"--config {args.config}'s optim_wrapper"
            raise UsageError(f"{source} holds the whole wrapper config; drop {', '.join(given_flags)} or edit the file")
        if given is not None:
            return given
        cfg = _load_config(args.config)
        for other, names in TASK_MEMBERS.items():
            if other != args.task and sorted(cfg) == names and args.task not in TASK_MEMBERS:
                raise UsageError(
                    f"--config {args.config} holds the {other} task's members {names}, and --task is {args.task}: "
                    f"pass --task {other}, or leave --task out"
                )
        return cfg
    if args.optimizer == "SparseAdam":
        raise UsageError("--optimizer SparseAdam needs sparse gradients; the built-in tasks' gradients are dense")
    if args.wrapper == "OptimWrapper" and args.dtype in ("bf16", "fp16"):
        raise UsageError(f"--dtype {args.dtype} needs --wrapper AmpOptimWrapper (or no --wrapper)")
    if task.make_train_step is None:
        return _one_config(args, task.default_cfg, task.model)
    return {
        name: _one_config(args, default, task.model.get_submodule(name)) for name, default in task.default_cfg.items()
    }


def _load_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except OSError as error:
        raise UsageError(f"--config: cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"--config: {path} is not UTF-8 text: {error.reason} at byte {error.start}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--config: {path} is not valid JSON: {error}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--config: {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _one_config(args: argparse.Namespace, default: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    amp = args.wrapper == "AmpOptimWrapper" or args.dtype in ("bf16", "fp16")
    cfg: dict[str, Any] = {"type": "AmpOptimWrapper" if amp else "OptimWrapper"}
    cfg["optimizer"] = dict(default["optimizer"])
    if args.optimizer is not None:
        cfg["optimizer"] = {"type": args.optimizer, "lr": cfg["optimizer"]["lr"]}
    if args.lr is not None:
        cfg["optimizer"]["lr"] = args.lr
    if args.optimizer == "Muon":
        cfg["optimizer"]["type"] = "AdamW"
        cfg["routes"] = _muon_routes(model, cfg["optimizer"]["lr"])
    if amp and args.dtype is not None:
        cfg["dtype"] = args.dtype  # an alias AmpOptimWrapper accepts (DTYPE_ALIASES)
    if args.accumulate is not None:
        cfg["accumulative_counts"] = args.accumulate
    if args.clip_norm is not None:
        cfg["clip_grad"] = {"max_norm": args.clip_norm}
    if args.sam is not None:
        cfg["sam"] = {"rho": args.sam}
    if args.implementation != "torch":  # auto: the fastest update measured for the optimizer, device and dtype
        cfg["implementation"] = args.implementation or "auto"
    return cfg


def _muon_routes(model: nn.Module, lr: float) -> dict[str, Any]:
    """``--optimizer Muon``: Muon for the hidden layers' weights (each Linear's but the last), AdamW for the rest.

    Muon's lr is matched to AdamW's update size (``adjust_lr_fn='match_rms_adamw'``), so one ``--lr`` serves both.
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    hidden = [f"{name}.weight" for name in linears[:-1]]
    if not hidden:
        raise UsageError(f"--optimizer Muon: the model has no hidden Linear layer for Muon ({len(linears)} Linear)")
    muon = {"type": "Muon", "lr": lr, "adjust_lr_fn": "match_rms_adamw"}
    # patterns match whole dotted parts anywhere in a name: the last layer is excluded by its own name too
    return {"muon": {"names": hidden, "exclude_names": [f"{linears[-1]}.weight"], "ndim": 2, "optimizer": muon}}
