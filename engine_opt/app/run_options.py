"""``RunOptions``: what a resumed ``engine-opt train`` must share with the run it continues, checkpointed.

A resume with another task, batch size, seed, wrapper config or schedule
would load state that does not fit the data or the updates it meets; it is
refused with every difference listed. More epochs continue a run, except
under the cosine schedule, whose length was fixed when it began. Another
process count is no difference: ``--batch-size`` is the global batch, and
the data's order does not depend on the count (``processes`` records it).

Examples:
    >>> saved = RunOptions(
    ...     task="classifier", batch_size=64, seed=0, processes=1,
    ...     wrapper={"type": "OptimWrapper"}, schedule="cosine", epochs=5)
    >>> here = RunOptions(**{**saved.state_dict(), "batch_size": 32, "epochs": 8})
    >>> here.check_state_dict(saved.state_dict())
    Traceback (most recent call last):
    ...
    ValueError: this run differs from the checkpoint's:
      --batch-size 32, the checkpoint's 64
      --epochs 8: ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..optim import checks
from .arguments import TASK_MEMBERS, is_python_config

_OPTIONS = {"task": "--task", "batch_size": "--batch-size", "seed": "--seed"}
# the wrapper config's entries the options write (app/config.py), by the option that sets them
_CONFIG_FLAGS = {
    "type": "--wrapper",
    "dtype": "--dtype",
    "accumulative_counts": "--accumulate",
    "clip_grad": "--clip-norm",
    "clip_grad.max_norm": "--clip-norm",
    "sam": "--sam",
    "sam.rho": "--sam",
    "routes": "--optimizer",
    "optimizer.type": "--optimizer",
    "optimizer.lr": "--lr",
    "implementation": "--implementation",
}


def config_differences(
    here: Any, saved: Any, path: str = "", *, members: Sequence[str] = (), source: str | None = None
) -> list[str]:
    """One line per entry in which the wrapper configs differ, named by the option that sets it, if any.

    Args:
        here: This run's wrapper config (or an entry of it).
        saved: The checkpoint's, likewise.
        path: Where in the configs they are (dotted keys).
        members: The task's wrapper members (``gen``, ``disc``), whose entries the options set alike.
        source: The ``--config`` file the config came from: then no option set it, and the file is named.

    Examples:
        >>> here = {"dtype": "fp16", "optimizer": {"lr": 0.1}}
        >>> saved = {"dtype": "bf16", "optimizer": {"lr": 0.1}}
        >>> config_differences(here, saved)  # doctest: +NORMALIZE_WHITESPACE
        ["--dtype (the wrapper config's 'dtype'): 'fp16' here,
          'bf16' in the checkpoint"]
    """
    if isinstance(here, dict) and isinstance(saved, dict) and set(here) & set(saved):  # else: one line, all of it
        lines = []
        for key in [*here, *(key for key in saved if key not in here)]:
            inner = f"{path}.{key}" if path else str(key)
            lines += config_differences(here.get(key), saved.get(key), inner, members=members, source=source)
        return lines
    if here == saved:
        return []
    if source is not None:
        name = f"--config {source}'s {path!r}" if path else f"--config {source}"
    else:
        head, _, rest = path.partition(".")
        flag = _CONFIG_FLAGS.get(rest if head in members else path)
        where = f"the wrapper config's {path!r}" if path else "the wrapper config"
        name = where if flag is None else f"{flag} ({where})"
    return [f"{name}: {_shown(here)} here, {_shown(saved)} in the checkpoint"]


def plain(value: Any) -> Any:
    """``value`` as plain data a checkpoint holds (``weights_only`` loads it) and a resume compares.

    A Python config may give classes and functions (``type=torch.optim.AdamW``):
    they become their dotted names; tuples become lists; other objects their ``repr``.

    Examples:
        >>> import torch
        >>> plain({"type": torch.optim.AdamW, "betas": (0.9, 0.99)})
        {'type': 'torch.optim.adamw.AdamW', 'betas': [0.9, 0.99]}
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, type) or (callable(value) and hasattr(value, "__qualname__")):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def hparams(options: RunOptions) -> dict[str, float | str | bool]:
    """The run's options as TensorBoard hparams: nested configs by dotted key, lists as text, unset ones left out.

    Examples:
        >>> wrapper = {"gen": {"optimizer": {"lr": 1e-3, "betas": [0.5, 0.9]}}}
        >>> flat = hparams(RunOptions("gan", 64, 0, 1, wrapper, "constant", 5))
        >>> flat["wrapper.gen.optimizer.lr"], flat["wrapper.gen.optimizer.betas"]
        (0.001, '[0.5, 0.9]')
    """
    flat: dict[str, float | str | bool] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for inner, item in value.items():
                add(f"{key}.{inner}", item)
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        elif value is not None:
            flat[key] = str(value)

    for key, value in options.state_dict().items():
        add(key, value)
    return flat


def _shown(value: Any) -> str:
    return "not set" if value is None else repr(value)


@dataclass
class RunOptions:
    """The options that define a run of ``engine-opt train``."""

    task: str
    batch_size: int
    seed: int
    processes: int
    wrapper: dict[str, Any]
    schedule: str
    epochs: int
    num_items: str = "off"
    spike_guard: str = "off"
    data_order: str = "sampler"  # a DistributedSampler's, in one process too (before: one process's generator)
    config: str | None = None
    """The ``--config`` file the wrapper config came from (not saved: the config itself is)."""
    param_scheduler: Any = None
    """A Python config's ``param_scheduler`` (``schedule`` is then ``'param_scheduler'``), as ``plain`` data."""

    def state_dict(self) -> dict[str, Any]:
        """The options, as plain values (they load with ``weights_only=True``)."""
        state = asdict(self)
        del state["config"]
        return state

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise a ``ValueError`` listing every option in which this run differs from the checkpoint's."""
        saved = checks.mapping("the saved run options", state_dict)
        checks.known_keys("the saved run options", saved, [field.name for field in fields(self)])
        named = dict(_OPTIONS)
        if is_python_config(None if self.config is None else Path(self.config)):  # set by the file, not --task
            named.update(task="the task (the config file's name)", batch_size="--batch-size (or the config's)")
        differences = [
            f"{flag} {getattr(self, name)}, the checkpoint's {saved.get(name)}"
            for name, flag in named.items()
            if saved.get(name) != getattr(self, name)
        ]
        members = TASK_MEMBERS.get(self.task, ())
        differences += config_differences(self.wrapper, saved.get("wrapper"), members=members, source=self.config)
        if saved.get("schedule") != self.schedule:
            differences.append(f"--schedule {self.schedule}, the checkpoint's {saved.get('schedule')}")
        elif self.schedule != "constant" and saved.get("epochs") != self.epochs:
            schedule = "the cosine schedule" if self.schedule == "cosine" else "the config's param_scheduler"
            differences.append(
                f"--epochs {self.epochs}: {schedule} was set for the checkpoint's {saved.get('epochs')} "
                "epochs and ends there; resume with that many, or start a new run for a longer schedule"
            )
        differences += config_differences(
            self.param_scheduler, saved.get("param_scheduler"), "param_scheduler", source=self.config
        )
        for name in ("num_items", "spike_guard"):  # a checkpoint from before these options: off
            if saved.get(name, "off") != getattr(self, name):
                flag = "--" + name.replace("_", "-")
                differences.append(f"{flag} {getattr(self, name)}, the checkpoint's {saved.get(name, 'off')}")
        if saved.get("data_order", "generator" if saved.get("processes") == 1 else "sampler") != self.data_order:
            differences.append(
                "the data order: the checkpoint's run of one process shuffled with its generator, as engine-opt did "
                "before its order became the same at any process count; resume it with that release"
            )
        if any(
            line.startswith("--implementation") and line.endswith("not set in the checkpoint") for line in differences
        ):
            differences.append("(a checkpoint from before --implementation: resume it with --implementation torch)")
        if differences:
            raise ValueError("this run differs from the checkpoint's:" + "".join(f"\n  {line}" for line in differences))

    def load_state_dict(self, state_dict: Any) -> None:
        """Check ``state_dict``; the options themselves stay this run's."""
        self.check_state_dict(state_dict)
