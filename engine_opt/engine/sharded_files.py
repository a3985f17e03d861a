"""Sharded checkpoints: models and optimizers through ``torch.distributed.checkpoint``, the rest in one file.

A sharded checkpoint is a directory. ``torch.distributed.checkpoint`` (DCP)
writes every model's state (``get_model_state_dict``) and every optimizer's
per-parameter state (``get_optimizer_state_dict``) there, each rank its own
shards of an FSDP2 model: nothing is gathered to one rank, and a checkpoint
loads into another number of processes (DCP reshards). Everything else (the
wrappers' counters and param groups, the grad scaler, the trainer, the
``ResumableLoader``, schedulers) is small and the same on every rank: rank 0
writes it to ``objects.pt`` there, readable with ``weights_only=True``.

``save_sharded`` writes a directory; ``load_sharded_checkpoint`` loads one
into the objects of ``to_load``, all of them or none.

Example:
    >>> import tempfile
    >>> model = torch.nn.Linear(2, 1)
    >>> wrapper = OptimWrapper(torch.optim.AdamW(model.parameters()))
    >>> wrapper.update_params(model(torch.ones(2)).sum())
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     _ = save_sharded(ShardedLayout.of({"model": model, "optim": wrapper}), Path(directory))
    ...     fresh = torch.nn.Linear(2, 1)
    ...     fresh_wrapper = OptimWrapper(torch.optim.AdamW(fresh.parameters()))
    ...     load_sharded_checkpoint({"model": fresh, "optim": fresh_wrapper}, directory)
    >>> torch.equal(fresh.weight, model.weight), fresh_wrapper.state_dict()["counters"]["steps"]
    (True, 1)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ignite.handlers import Checkpoint
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ..optim import OptimWrapper, OptimWrapperDict, checks, distributed
from .checkpoint_files import check_entry, fsync_directory, read_checkpoint, write_checkpoint
from .run_directory import SHARDED_METADATA, remove

OBJECTS_FILE = "objects.pt"


@dataclass(frozen=True)
class ShardedLayout:
    """What of ``to_save`` goes through DCP, and what into ``objects.pt``.

    Attributes:
        models: The ``nn.Module`` entries, by name.
        optimizers: Every optimizer (a wrapper's, each member of an
            ``OptimWrapperDict``'s, a plain one) with the model of
            ``models`` that holds its parameters, by ``name`` or
            ``name.member``.
        objects: Every entry but the models (wrappers included: their
            counters and param groups), by name.
    """

    models: dict[str, nn.Module]
    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]]
    objects: dict[str, Any]

    @classmethod
    def of(cls, to_save: Mapping[str, Any]) -> ShardedLayout:
        """Split ``to_save``; a ``ValueError`` names an optimizer whose model is not among the entries."""
        to_save = checks.mapping("to_save", to_save)
        models = {name: obj for name, obj in to_save.items() if isinstance(obj, nn.Module)}
        optimizers = {}
        for key, optimizer in _optimizers(to_save).items():
            if distributed.state_holder(optimizer) is not optimizer:
                raise ValueError(
                    f"to_save[{key.split('.')[0]!r}] holds a ZeroRedundancyOptimizer, which sharded checkpoints do "
                    "not take: save it with attach_checkpoint (its state is consolidated), or shard the model "
                    "with FSDP2 (fully_shard) and use a plain optimizer"
                )
            optimizers[key] = (_model_of(key, optimizer, models), optimizer)
        objects = {name: obj for name, obj in to_save.items() if name not in models}
        return cls(models, optimizers, objects)

    def in_window(self) -> bool:
        """Whether a wrapper is part-way through an accumulation window."""
        return any(getattr(obj, "in_window", False) is True for obj in self.objects.values())


def _optimizers(to_save: Mapping[str, Any]) -> dict[str, torch.optim.Optimizer]:
    found: dict[str, torch.optim.Optimizer] = {}
    for name, obj in to_save.items():
        if isinstance(obj, OptimWrapperDict):
            found.update({f"{name}.{member}": wrapper.optimizer for member, wrapper in obj.items()})
        elif isinstance(obj, OptimWrapper):
            found[name] = obj.optimizer
        elif isinstance(obj, torch.optim.Optimizer):
            found[name] = obj
    return found


def _model_of(key: str, optimizer: torch.optim.Optimizer, models: Mapping[str, nn.Module]) -> nn.Module:
    """The first model holding every parameter of ``optimizer``."""
    wanted = {id(param) for group in optimizer.param_groups for param in group["params"]}
    for model in models.values():
        if wanted <= {id(param) for param in model.parameters()}:
            return model
    raise ValueError(
        f"the optimizer of to_save[{key!r}] updates parameters of no model in to_save (models: {sorted(models)}); "
        "a sharded checkpoint saves an optimizer's state by its model's parameter names: add its model"
    )


def _objects_state(layout: ShardedLayout) -> dict[str, Any]:
    """``objects.pt``'s content: the entries' states, an optimizer's per-parameter state left to DCP."""
    return {
        "objects": {name: _without_optimizer_state(obj, obj.state_dict()) for name, obj in layout.objects.items()},
        "models": sorted(layout.models),
        "optimizers": sorted(layout.optimizers),
    }


def _without_optimizer_state(obj: Any, state: Any) -> Any:
    if isinstance(obj, OptimWrapperDict):
        return {member: _without_optimizer_state(wrapper, state[member]) for member, wrapper in obj.items()}
    if isinstance(obj, (OptimWrapper, torch.optim.Optimizer)):
        return {**state, "state": {}}
    return state


def _dcp_state(layout: ShardedLayout) -> dict[str, Any]:
    """What DCP saves: each model's and each optimizer's state, by parameter names (sharded ``DTensor``s stay so)."""
    return {
        "models": {name: get_model_state_dict(model) for name, model in layout.models.items()},
        "optimizers": {key: get_optimizer_state_dict(model, opt) for key, (model, opt) in layout.optimizers.items()},
    }


def save_sharded(
    layout: ShardedLayout,
    directory: Path,
    *,
    process_group: Any = None,
    async_save: bool = False,
) -> Future[Any] | None:
    """Write the sharded checkpoint of ``layout``'s objects to ``directory`` (every rank calls it).

    The objects' states are read now; with ``async_save`` DCP copies the
    tensors to host memory and writes them in a thread, and the returned
    future is done when every rank has written (DCP's ``.metadata`` last).
    ``process_group`` is the group DCP's own collectives use (an
    asynchronous save needs one of its own, so they cannot interleave with
    training's).

    Returns:
        The future of an asynchronous save, else None (the directory is complete).

    Raises:
        ValueError: A wrapper is part-way through an accumulation window
            (an FSDP2 model's accumulated gradients are not the wrapper's to
            read): save between windows.
    """
    if layout.in_window():
        raise ValueError(
            "a wrapper of the sharded checkpoint is part-way through an accumulation window: save between "
            "windows (attach_sharded_checkpoint waits for the window's end)"
        )
    objects = _objects_state(layout)  # collective calls (the loader's generator states): every rank
    state = _dcp_state(layout)
    if distributed.rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        write_checkpoint(objects, directory / OBJECTS_FILE)
    alone = not distributed.initialized()
    if async_save:
        future = dcp_async_save(state, checkpoint_id=directory, process_group=process_group, no_dist=alone)
        return future  # type: ignore[return-value]
    dcp_save(state, checkpoint_id=directory, process_group=process_group, no_dist=alone)
    return None


def load_sharded_checkpoint(to_load: Mapping[str, Any], path: str | Path) -> None:
    """Load the sharded checkpoint directory ``path`` into the objects of ``to_load``: all of them, or none.

    Every name must be in the checkpoint; models and optimizers are read by
    parameter name into copies first, then ``objects.pt``'s entries are
    checked as ``load_checkpoint`` checks a file's; only then is anything
    loaded. DCP reshards: the checkpoint of a run of 2 processes loads into 1
    or 3. On any mismatch a ``ValueError`` names the directory and what
    differs, and the objects are left as they were.

    DCP reads its ``.metadata`` with ``pickle``: load only sharded
    checkpoints you trust (``objects.pt`` is read with ``weights_only=True``).
    Every rank calls it (a collective call).
    """
    path = Path(path)
    if not (path / SHARDED_METADATA).is_file():
        raise ValueError(f"{path} is not a complete sharded checkpoint: it lacks {SHARDED_METADATA}")
    saved = read_checkpoint(path / OBJECTS_FILE)
    layout = ShardedLayout.of(to_load)
    _check_names(path, layout, saved)
    for name, obj in layout.objects.items():
        try:
            check_entry(obj, saved["objects"][name])
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{path}: {name!r} does not match this run: {error}") from None
    state = _read_dcp(path, layout)
    Checkpoint.load_objects(dict(layout.objects), saved["objects"])  # the wrappers' optimizers' state is emptied...
    for name, model in layout.models.items():
        set_model_state_dict(model, state["models"][name])
    for key, (model, optimizer) in layout.optimizers.items():  # ... and set here
        set_optimizer_state_dict(model, optimizer, state["optimizers"][key])


def _check_names(path: Path, layout: ShardedLayout, saved: Mapping[str, Any]) -> None:
    objects = saved.get("objects")
    if not isinstance(objects, Mapping) or not isinstance(saved.get("models"), list):
        raise ValueError(f"{path / OBJECTS_FILE} is not the objects file of a sharded checkpoint")
    missing = [
        *(name for name in layout.models if name not in saved["models"]),
        *(key for key in layout.optimizers if key not in saved.get("optimizers", [])),
        *(name for name in layout.objects if name not in objects),
    ]
    if missing:
        held = sorted({*saved["models"], *objects})
        raise ValueError(f"{path} lacks {missing}; it holds {held}: is it a checkpoint of this run?")


def _read_dcp(path: Path, layout: ShardedLayout) -> dict[str, Any]:
    """The checkpoint's model and optimizer states, read into copies: the objects themselves are untouched.

    Reading an optimizer's state in DCP's form initialises an optimizer that
    has none (a step with zero gradients and learning rate); that is undone
    if the read fails.
    """
    fresh = [optimizer for _, optimizer in layout.optimizers.values() if not optimizer.state]
    try:
        state: dict[str, Any] = _copied(_dcp_state(layout))
        dcp_load(state, checkpoint_id=path, no_dist=not distributed.initialized())
    except (Exception, CheckpointException) as error:  # DCP's exception is no Exception
        for optimizer in fresh:
            optimizer.state.clear()
        raise ValueError(f"{path} does not match this run's models or optimizers: {_first_line(error)}") from None
    return state


def _copied(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: _copied(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_copied(value) for value in state]
    return state


def _first_line(error: BaseException) -> str:
    """What went wrong, from an error or from the first rank's traceback that DCP's exception carries."""
    text = str(error).strip()
    causes = re.findall(r"^\s*(\w+(?:Error|Exception): .*)$", text, flags=re.MULTILINE)
    if causes:
        return str(causes[0])
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def publish(partial: Path, final: Path) -> bool:
    """Rename a complete sharded checkpoint into place, durably; False (``partial`` removed) if ``final`` exists.

    A checkpoint of the same iteration already there is kept: a run resumed
    at its last iteration writes the state it loaded.
    """
    if final.exists():
        remove(partial)
        return False
    os.replace(partial, final)
    fsync_directory(final.parent)
    return True
