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

Examples:
    >>> import tempfile
    >>> model = torch.nn.Linear(2, 1)
    >>> wrapper = OptimWrapper(torch.optim.AdamW(model.parameters()))
    >>> wrapper.update_params(model(torch.ones(2)).sum())
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     layout = ShardedLayout.of({"model": model, "optim": wrapper})
    ...     _ = save_sharded(layout, Path(directory))
    ...     fresh = torch.nn.Linear(2, 1)
    ...     fresh_wrapper = OptimWrapper(torch.optim.AdamW(fresh.parameters()))
    ...     to_load = {"model": fresh, "optim": fresh_wrapper}
    ...     load_sharded_checkpoint(to_load, directory)
    >>> torch.equal(fresh.weight, model.weight), fresh_wrapper.step_count
    (True, 1)
"""

from __future__ import annotations

import collections
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ..optim import OptimWrapper, OptimWrapperDict, checks, distributed
from ..optim.modes import has_modes
from ..optim.state_checks import check_module_state
from ..optim.wrapper_dict import members
from .dcp_metadata import SafeReader
from .files import check_entry, fsync_directory, load_objects, read_checkpoint, write_checkpoint
from .manifest import MANIFEST_FILE, has_manifest, verify, write_manifest
from .run_directory import SHARDED_METADATA, DamagedCheckpoint, remove

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
    def of(cls, to_save: Mapping[str, Any], argument: str = "to_save") -> ShardedLayout:
        """Split ``to_save`` (called ``argument`` in errors); a ``ValueError`` names an optimizer without its model."""
        to_save = checks.mapping(argument, to_save)
        models = {name: obj for name, obj in to_save.items() if isinstance(obj, nn.Module)}
        optimizers = {}
        for key, optimizer in _optimizers(to_save).items():
            if distributed.state_holder(optimizer) is not optimizer:
                raise ValueError(
                    f"{argument}[{key.split('.')[0]!r}] holds a ZeroRedundancyOptimizer, which sharded checkpoints do "
                    "not take: save it with attach_checkpoint (its state is consolidated), or shard the model "
                    "with FSDP2 (fully_shard) and use a plain optimizer"
                )
            if has_modes(optimizer):
                raise ValueError(
                    f"{argument}[{key.split('.')[0]!r}] holds a schedule-free optimizer "
                    f"({type(optimizer).__name__}), which sharded checkpoints do not take yet: "
                    "torch.distributed.checkpoint makes an optimizer's state with a step, which such an optimizer "
                    "refuses in eval mode; save it with attach_checkpoint"
                )
            optimizers[key] = (_model_of(f"{argument}[{key!r}]", optimizer, models), optimizer)
        objects = {
            name: checks.stateful(f"{argument}[{name!r}]", obj) for name, obj in to_save.items() if name not in models
        }
        return cls(models, optimizers, objects)

    def in_window(self) -> bool:
        """Whether a wrapper of sharded parameters is part-way through an accumulation window.

        FSDP2 keeps such a window's unreduced gradients in its own buffers,
        out of the wrapper's reach; other wrappers save theirs.
        """
        return any(_wrapper_in_window(obj) for obj in self.objects.values())


def _wrapper_in_window(obj: Any) -> bool:
    if not isinstance(obj, (OptimWrapper, OptimWrapperDict)):
        return False
    return any(
        wrapper.in_window
        and distributed.any_sharded(param for group in wrapper.param_groups for param in group["params"])
        for _, wrapper in members(obj)
    )


def _optimizers(to_save: Mapping[str, Any]) -> dict[str, torch.optim.Optimizer]:
    """Every optimizer of ``to_save`` by ``name`` (a wrapper's, a plain one), or ``name.member`` (a dict's)."""
    found: dict[str, torch.optim.Optimizer] = {}
    for name, obj in to_save.items():
        if isinstance(obj, (OptimWrapper, OptimWrapperDict)):
            for member, wrapper in members(obj):
                found[name if member is None else f"{name}.{member}"] = wrapper.optimizer
        elif isinstance(obj, torch.optim.Optimizer):
            found[name] = obj
    return found


def _model_of(where: str, optimizer: torch.optim.Optimizer, models: Mapping[str, nn.Module]) -> nn.Module:
    """The first model holding every parameter of ``optimizer``."""
    wanted = {id(param) for group in optimizer.param_groups for param in group["params"]}
    holding = []
    for name, model in models.items():
        held = wanted & {id(param) for param in model.parameters()}
        if held == wanted:
            return model
        if held:
            holding.append(name)
    if holding:
        raise ValueError(
            f"the optimizer of {where} updates parameters of several models ({holding}); a sharded checkpoint "
            "saves an optimizer's state by one model's parameter names: put those models in one module "
            "(nn.ModuleDict) and save that"
        )
    raise ValueError(
        f"the optimizer of {where} updates parameters of no model there (models: {sorted(models)}); a sharded "
        "checkpoint saves an optimizer's state by its model's parameter names: add its model"
    )


def _objects_state(layout: ShardedLayout) -> dict[str, Any]:
    """``objects.pt``'s content: the entries' states, an optimizer's per-parameter state left to DCP."""
    return {
        "objects": {name: _without_optimizer_state(obj) for name, obj in layout.objects.items()},
        "models": sorted(layout.models),
        "optimizers": sorted(key for key, (_, optimizer) in layout.optimizers.items() if optimizer.state),
    }


def _without_optimizer_state(obj: Any) -> Any:
    """``obj``'s state, where it is an optimizer's or a wrapper's (each member's) without the per-parameter state."""
    if isinstance(obj, (OptimWrapper, OptimWrapperDict)):
        states = {member: {**wrapper.state_dict(), "state": {}} for member, wrapper in members(obj)}
        return states.pop(None) if None in states else states  # a dict's state is its members' by name
    if isinstance(obj, torch.optim.Optimizer):
        return {**obj.state_dict(), "state": {}}
    return obj.state_dict()


def _dcp_state(layout: ShardedLayout, optimizers: Iterable[str]) -> dict[str, Any]:
    """What DCP saves: each model's state and the named optimizers', by parameter names (``DTensor``s stay sharded).

    Only optimizers with state are named: DCP's form of an optimizer
    without state is made by a step with zero gradients and learning rate,
    which counts (Adam's ``step``) and calls the step hooks.
    """
    return {
        "models": {name: get_model_state_dict(model) for name, model in layout.models.items()},
        "optimizers": {key: get_optimizer_state_dict(*layout.optimizers[key]) for key in optimizers},
    }


def _template(layout: ShardedLayout, optimizers: Iterable[str], saved_states: set[tuple[str, str]]) -> dict[str, Any]:
    """Copies of the models' states and of the optimizers' to read into, with the saved parameters' states only.

    An optimizer's template is DCP's form of a fresh one (every parameter's
    state, from a step at zero learning rate with its gradients set aside),
    cut to the parameters whose state was saved; the optimizer keeps its own
    state and gradients.
    """
    template: dict[str, Any] = {
        "models": {name: _copied(get_model_state_dict(model)) for name, model in layout.models.items()},
        "optimizers": {},
    }
    for key in optimizers:
        model, optimizer = layout.optimizers[key]
        params = [param for group in optimizer.param_groups for param in group["params"]]
        grads, state = [param.grad for param in params], optimizer.state
        optimizer.state = collections.defaultdict(dict)
        for param in params:
            param.grad = None
        try:
            fresh = get_optimizer_state_dict(model, optimizer)  # tensors of the set-aside fresh state: no copy
        finally:
            optimizer.state = state
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
        states = cast(dict[str, Any], fresh["state"])
        fresh["state"] = {fqn: value for fqn, value in states.items() if (key, fqn) in saved_states}
        template["optimizers"][key] = fresh
    return template


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
    future is done when every rank has written (DCP's ``.metadata`` last)
    and, on rank 0, the manifest of every file's digest after them
    (``manifest``; written in the same thread). ``process_group`` is the
    group DCP's own collectives use (an
    asynchronous save needs one of its own, so they cannot interleave with
    training's).

    Returns:
        The future of an asynchronous save, else None (the directory is complete).

    Raises:
        ValueError: A wrapper of sharded (FSDP2) parameters is part-way
            through an accumulation window (FSDP2 holds the window's
            gradients, not the wrapper): save between windows.
    """
    if layout.in_window():
        raise ValueError(
            "a wrapper of sharded (FSDP2) parameters is part-way through an accumulation window, whose gradients "
            "FSDP2 holds: save between windows (attach_sharded_checkpoint waits for the window's end)"
        )
    objects = _objects_state(layout)  # collective calls (the loader's generator states): every rank
    state = _dcp_state(layout, objects["optimizers"])
    if distributed.rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        write_checkpoint(objects, directory / OBJECTS_FILE)
    alone = not distributed.initialized()
    if async_save:
        future = dcp_async_save(state, checkpoint_id=directory, process_group=process_group, no_dist=alone)
        if distributed.rank() != 0:
            return future  # type: ignore[return-value]
        return _then(future, lambda: write_manifest(directory))  # type: ignore[arg-type]
    dcp_save(state, checkpoint_id=directory, process_group=process_group, no_dist=alone)
    if distributed.rank() == 0:
        write_manifest(directory)
    return None


def _then(future: Future[Any], after: Callable[[], None]) -> Future[Any]:
    """A future done when ``future`` is and ``after()`` has run (in the thread that finished ``future``).

    DCP's future of rank 0 is done when every rank has written and its
    ``.metadata`` is there: the manifest is written then, in the background.
    """
    chained: Future[Any] = Future()

    def finish(done: Future[Any]) -> None:
        try:
            result = done.result()
            after()
        except BaseException as error:  # the save's own failure, or the manifest's: raised by result()
            chained.set_exception(error)
        else:
            chained.set_result(result)

    future.add_done_callback(finish)
    return chained


def load_sharded_checkpoint(to_load: Mapping[str, Any], path: str | Path) -> None:
    """Load the sharded checkpoint directory ``path`` into the objects of ``to_load``: all of them, or none.

    Every name must be in the checkpoint, every model's keys, shapes and
    dtypes must be the saved ones (read from DCP's metadata), and every other
    entry is checked as ``load_checkpoint`` checks a file's; then the models
    and optimizers are read into copies (twice their size in host memory, for
    the moment of the load), and only then is anything loaded. DCP reshards:
    the checkpoint of a run of 2 processes loads into 1 or 3. On any mismatch
    a ``ValueError`` names the directory and what differs, and the objects are
    left as they were.

    Before anything is read, every file is checked against the checkpoint's
    manifest (its size and SHA-256, ``manifest``: a damaged file, one missing
    or not listed, a link, are refused); one of an earlier release, without a
    manifest, loads with a warning. DCP's ``.metadata`` is read without
    running code (``dcp_metadata``), ``objects.pt`` with ``weights_only=True``.
    Every rank calls it (a collective call).
    """
    path = checks.path("path", path)
    checks.mapping("to_load", to_load)
    if not (path / SHARDED_METADATA).is_file():
        raise DamagedCheckpoint(f"{path} is not a complete sharded checkpoint: it lacks {SHARDED_METADATA}")
    _verify(path)
    saved = read_checkpoint(path / OBJECTS_FILE)
    layout = ShardedLayout.of(to_load, "to_load")
    _check_names(path, layout, saved)
    metadata = SafeReader(path).read_metadata()
    checking: dict[str, tuple[Callable[[Any, Any], None], Any, Any]] = {
        name: (check_module_state, model, _saved_model(metadata, name)) for name, model in layout.models.items()
    }
    checking |= {name: (check_entry, obj, saved["objects"][name]) for name, obj in layout.objects.items()}
    for name, (check, obj, entry) in checking.items():
        try:
            check(obj, entry)
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{path}: {name!r} does not match this run: {error}") from None
    state = _read_dcp(path, layout, [key for key in saved["optimizers"] if key in layout.optimizers], metadata)
    load_objects(layout.objects, saved["objects"])  # the wrappers' optimizers' state is emptied...
    for name, model in layout.models.items():
        set_model_state_dict(model, state["models"][name])
    for key, optimizer_state in state["optimizers"].items():  # ... and set here, where it was saved
        set_optimizer_state_dict(  # not strict: a parameter without saved state gets none, as in a file's load
            *layout.optimizers[key], optimizer_state, options=StateDictOptions(strict=False)
        )


def _verify(path: Path) -> None:
    """Every file against the manifest, on rank 0, before anything is read; every rank raises what it found."""
    if not has_manifest(path):
        warnings.warn(
            f"{path} has no {MANIFEST_FILE} (a sharded checkpoint of an earlier release): its files are not "
            "checked against their digests",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    problem = None
    if distributed.rank() == 0:
        try:
            verify(path)
        except ValueError as error:
            problem = str(error)
    problem = distributed.gather_objects(problem)[0]
    if problem is not None:
        raise DamagedCheckpoint(problem)


def _saved_model(metadata: Any, name: str) -> dict[str, Any]:
    """A model's saved state as DCP's metadata describes it: meta tensors of the saved shapes and dtypes."""
    paths = getattr(metadata, "planner_data", None) or {}  # each flattened key's path: ("models", name, key)
    saved: dict[str, Any] = {}
    for flat, item in metadata.state_dict_metadata.items():
        where = paths.get(flat)
        if where is None or len(where) != 3 or tuple(where[:2]) != ("models", name):
            continue
        size, dtype = getattr(item, "size", None), getattr(getattr(item, "properties", None), "dtype", None)
        saved[where[2]] = object() if size is None else torch.empty(size, dtype=dtype, device="meta")
    return saved


def _check_names(path: Path, layout: ShardedLayout, saved: Mapping[str, Any]) -> None:
    objects = saved.get("objects")
    if (
        not isinstance(objects, Mapping)
        or not isinstance(saved.get("models"), list)
        or not isinstance(saved.get("optimizers"), list)
    ):
        raise ValueError(f"{path / OBJECTS_FILE} is not the objects file of a sharded checkpoint")
    missing = [
        *(name for name in layout.models if name not in saved["models"]),
        *(name for name in layout.objects if name not in objects),
    ]
    if missing:
        held = sorted({*saved["models"], *objects})
        raise ValueError(f"{path} lacks {missing}; it holds {held}: is it a checkpoint of this run?")


def _read_dcp(path: Path, layout: ShardedLayout, optimizers: list[str], metadata: Any) -> dict[str, Any]:
    """The models' states and the saved optimizers', read into copies: the objects themselves are untouched."""
    paths = (
        getattr(metadata, "planner_data", None) or {}
    )  # each flattened key's path: ("optimizers", key, "state", ...)
    saved_states = {
        (where[1], where[3])
        for where in paths.values()
        if len(where) > 3 and where[0] == "optimizers" and where[2] == "state"
    }
    try:
        state = _template(layout, optimizers, saved_states)
        dcp_load(state, storage_reader=SafeReader(path), no_dist=not distributed.initialized())
    except (Exception, CheckpointException) as error:  # DCP's exception is no Exception
        raise ValueError(
            f"{path}: reading its models and optimizers failed (this run's differ, or its files are damaged): "
            f"{_cause(error)}"
        ) from None
    return state


def _copied(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: _copied(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_copied(value) for value in state]
    return state


def _cause(error: BaseException) -> str:
    """What went wrong: the error, or the first rank's that DCP's exception carries as text."""
    text = str(error).strip()
    causes = re.findall(r"^\s*(\w+(?:Error|Exception|Interrupt)(?:: .*)?)$", text, flags=re.MULTILINE)
    if causes:
        return str(causes[0])
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def publish(partial: Path, final: Path) -> bool:
    """Rename a complete sharded checkpoint into place, durably; False (``partial`` removed) if ``final`` exists.

    A checkpoint of the same iteration already there is kept: a run resumed
    at its last iteration writes the state it loaded. The partial directory
    is ``fsync``-ed first, so its entries survive a crash of the machine.

    Raises:
        FileExistsError: ``final`` is there and is no sharded checkpoint
            (``partial`` removed: the newest checkpoint stays the last good one).
    """
    if os.path.lexists(final):
        remove(partial)
        if not (final / SHARDED_METADATA).is_file():
            raise FileExistsError(
                f"cannot save the sharded checkpoint {final}: an entry of that name is there and is no checkpoint "
                "(a directory without .metadata, a file or a link); move it away"
            )
        return False
    fsync_directory(partial)
    os.replace(partial, final)
    fsync_directory(final.parent)
    return True
