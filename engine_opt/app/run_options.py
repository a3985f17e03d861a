"""``RunOptions``: what a resumed ``engine-opt train`` must share with the run it continues, checkpointed.

A resume with another task, batch size, seed, wrapper config or schedule
would load state that does not fit the data or the updates it meets; it is
refused with every difference listed. More epochs continue a run, except
under the cosine schedule, whose length was fixed when it began. Another
process count is no difference: ``--batch-size`` is the global batch, and
the data's order does not depend on the count (``processes`` records it).

Examples:
    >>> saved = RunOptions(task="classifier", batch_size=64, seed=0, processes=1, wrapper={"type": "OptimWrapper"},
    ...                    schedule="cosine", epochs=5)
    >>> RunOptions(**{**saved.state_dict(), "batch_size": 32, "epochs": 8}).check_state_dict(saved.state_dict())
    Traceback (most recent call last):
    ...
    ValueError: this run differs from the checkpoint's:
      --batch-size 32, the checkpoint's 64
      --epochs 8: ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..optim import checks
from .arguments import TASK_MEMBERS

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
        >>> config_differences({"dtype": "fp16", "optimizer": {"lr": 0.1}}, {"dtype": "bf16", "optimizer": {"lr": 0.1}})
        ["--dtype (the wrapper config's 'dtype'): 'fp16' here, 'bf16' in the checkpoint"]
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

    def state_dict(self) -> dict[str, Any]:
        """The options, as plain values (they load with ``weights_only=True``)."""
        state = asdict(self)
        del state["config"]
        return state

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise a ``ValueError`` listing every option in which this run differs from the checkpoint's."""
        saved = checks.mapping("the saved run options", state_dict)
        checks.known_keys("the saved run options", saved, [field.name for field in fields(self)])
        differences = [
            f"{flag} {getattr(self, name)}, the checkpoint's {saved.get(name)}"
            for name, flag in _OPTIONS.items()
            if saved.get(name) != getattr(self, name)
        ]
        members = TASK_MEMBERS.get(self.task, ())
        differences += config_differences(self.wrapper, saved.get("wrapper"), members=members, source=self.config)
        if saved.get("schedule") != self.schedule:
            differences.append(f"--schedule {self.schedule}, the checkpoint's {saved.get('schedule')}")
        elif self.schedule == "cosine" and saved.get("epochs") != self.epochs:
            differences.append(
                f"--epochs {self.epochs}: the cosine schedule was set for the checkpoint's {saved.get('epochs')} "
                "epochs and ends there; resume with that many, or start a new run for a longer schedule"
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
        if differences:
            raise ValueError("this run differs from the checkpoint's:" + "".join(f"\n  {line}" for line in differences))

    def load_state_dict(self, state_dict: Any) -> None:
        """Check ``state_dict``; the options themselves stay this run's."""
        self.check_state_dict(state_dict)
