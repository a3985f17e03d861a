"""Checkpoint files: written durably, read without running code, verified, loaded into every object or none.

``write_checkpoint`` makes a file appear complete or not at all: a process
killed at any moment of a save leaves the previous files as they were.
``load_checkpoint`` reads a file written by ``attach_checkpoint`` (or by
Ignite's ``Checkpoint``), asks every object whether its entry fits
(``check_entry``), and only then loads them all.
"""

from __future__ import annotations

import copy
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint
from ignite.handlers.param_scheduler import ParamScheduler
from torch import nn

from ..engine.state import check_engine_state
from ..optim import checks
from ..optim.loss_scale import check_scaler_state
from ..optim.state_checks import check_module_state, check_optimizer_state, check_structure
from .run_directory import DamagedCheckpoint, partial_name


def write_checkpoint(checkpoint: Any, path: str | Path) -> None:
    """``torch.save(checkpoint)`` to ``path`` so that ``path`` is complete or absent, never partial.

    Written to a partial file beside it, flushed and ``fsync``-ed, renamed
    over ``path``, and the directory ``fsync``-ed, so the new file survives a
    crash of the machine too. A write that fails (a full disk, which torch's
    zip writer reports as a ``RuntimeError`` of its own) removes the partial
    file and raises an ``OSError`` naming ``path``; files already there are
    untouched. Any other failure removes the partial file too.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     path = f"{directory}/checkpoint_3.pt"
        ...     write_checkpoint({"step": torch.tensor(3)}, path)
        ...     sorted(os.listdir(directory)), torch.load(path)["step"].item()
        (['checkpoint_3.pt'], 3)
    """
    path = Path(path)
    partial = partial_name(path)
    try:
        with partial.open("wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException as error:
        partial.unlink(missing_ok=True)
        # torch's zip writer raises a RuntimeError of its own when the file's write fails (a full disk)
        disk = error if isinstance(error, OSError) else error.__context__
        if isinstance(disk, OSError):
            raise type(disk)(disk.errno, f"cannot write checkpoint {path}: {disk.strerror or disk}") from error
        raise
    os.replace(partial, path)
    fsync_directory(path.parent)


def _check_torch_scheduler(scheduler: Any, saved: Any) -> None:
    """A torch scheduler's entry: its own class's state, shaped like its state now.

    torch's schedulers load any dict (``__dict__.update``), and those made of
    others (``LambdaLR``, ``SequentialLR``) fail half-way on another class's
    state; so every public key of this class's state, and ``_schedulers``,
    must be there. Private keys releases add or drop are left alone.
    """
    current = scheduler.state_dict()
    saved = checks.mapping("the saved scheduler state", saved)
    missing = [key for key in current if (not key.startswith("_") or key == "_schedulers") and key not in saved]
    if missing:
        raise ValueError(
            f"the saved scheduler state lacks {missing}, which {type(scheduler).__name__} needs: it comes from "
            f"another scheduler (it holds {sorted(saved)})"
        )
    check_structure(current, saved, "the saved scheduler state")


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform can open a directory)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check_entry(obj: Any, saved: Any) -> None:
    """Raise if ``saved`` cannot be loaded into ``obj``; change nothing.

    An object with a ``check_state_dict`` method (the wrappers, the wrapper
    dict, ``ResumableLoader``, the trainer) checks its own entry; torch
    modules, optimizers, schedulers and grad scalers, Ignite engines and
    parameter schedulers are checked here (a scheduler's entry must have the
    shape of its own state). Any other object gets its entry loaded into a
    copy of it first; one that cannot be copied is loaded unchecked, before
    the checked ones (``load_objects``), so that its failure changes nothing
    else.

    Examples:
        >>> check_entry(torch.nn.Linear(2, 1), {"weight": torch.ones(1, 2)})
        Traceback (most recent call last):
        ...
        ValueError: the model lacks [] and the checkpoint lacks ['bias']
    """
    check = getattr(obj, "check_state_dict", None)
    if callable(check):
        check(saved)
    elif isinstance(obj, nn.Module):
        check_module_state(obj, saved)
    elif isinstance(obj, torch.optim.Optimizer):
        check_optimizer_state(obj, saved)
    elif isinstance(obj, Engine):
        check_engine_state(obj, saved)
    elif isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        _check_torch_scheduler(obj, saved)
    elif isinstance(obj, ParamScheduler):
        check_structure(obj.state_dict(), saved, "the saved scheduler state", require_keys=True)
    elif isinstance(obj, torch.amp.GradScaler):
        _check_grad_scaler(obj, saved)
    else:
        _load_into_a_copy(obj, saved)


def _known(obj: Any) -> bool:
    """Whether ``check_entry`` checks ``obj``'s entry itself, rather than by loading it into a copy."""
    known = (nn.Module, torch.optim.Optimizer, Engine, ParamScheduler, torch.amp.GradScaler)
    schedulers = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return callable(getattr(obj, "check_state_dict", None)) or isinstance(obj, (*known, *schedulers))


def _check_grad_scaler(scaler: torch.amp.GradScaler, saved: Any) -> None:
    """A grad scaler's entry: what a scaler saves (a disabled one loads nothing, and saves ``{}``)."""
    current = scaler.state_dict()
    if current:
        where = "the saved grad scaler state"
        check_scaler_state(where, checks.mapping(where, saved), set(current))


def _load_into_a_copy(obj: Any, saved: Any) -> None:
    """An object the checks do not know: its entry loaded into a copy of it (one that cannot be copied: not tried)."""
    try:
        trial = copy.deepcopy(obj)
    except Exception:  # a lock, a file, a stream: loaded first by load_objects, unchecked
        return
    try:
        trial.load_state_dict(copy.deepcopy(saved))
    except Exception as error:
        raise ValueError(f"loading it into a copy of the object failed: {type(error).__name__}: {error}") from None


def load_objects(to_load: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Ignite's ``Checkpoint.load_objects``, the objects ``check_entry`` could only try first.

    An object that fails to load after the checks is one that could not be
    tried: loading those first leaves every checked object as it was.
    """
    ordered = sorted(to_load, key=lambda name: _known(to_load[name]))  # stable: the unknown first, in order
    Checkpoint.load_objects({name: to_load[name] for name in ordered}, state)


def load_checkpoint(to_load: Mapping[str, Any], path: str | Path) -> None:
    """Load the checkpoint file ``path`` into the objects of ``to_load``: all of them, or none.

    The file is read with ``weights_only=True``, so loading it can never run
    code. Before anything is loaded, every name in ``to_load`` must be in
    it, and every object must accept its part: models the same keys and
    shapes, wrappers, optimizers, the trainer and the ``ResumableLoader``
    their states. On any mismatch a ``ValueError`` names the file and what
    differs, and the objects are left as they were.
    """
    to_load = checks.mapping("to_load", to_load)
    path = checks.path("path", path)
    state = read_checkpoint(path)
    if len(to_load) == 1 and (name := next(iter(to_load))) not in state:
        state = {name: state}  # Ignite's Checkpoint saves a lone object's state dict as the whole file
    for name, obj in to_load.items():  # in order: the entries that say most about a mismatch come first
        try:
            if name in state:
                check_entry(obj, state[name])
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{path}: {name!r} does not match this run: {error}") from None
    missing = [name for name in to_load if name not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it holds {sorted(state)}: is it a checkpoint of this run?")
    load_objects(to_load, state)


def read_checkpoint(path: Path) -> Mapping[str, Any]:
    """The dict saved in ``path``, read without running code; a ``ValueError`` naming the file otherwise.

    torch's reader does not check the CRC32 of each record of the file, so
    flipped bits in the tensor data would load silently; they are checked here.
    """
    if not path.is_file():
        raise ValueError(f"cannot read checkpoint {path}: no such file")
    try:
        damaged = _failed_record(path)
        state = None if damaged else torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error).lower() or "unsupported global" in str(error).lower():
            raise DamagedCheckpoint(
                f"{path} holds objects other than tensors and plain containers; loading it could run code, "
                "so it is refused (checkpoints written by attach_checkpoint hold none)"
            ) from None
        raise DamagedCheckpoint(f"{path} is not a readable checkpoint: {_first_line(error)}") from None
    except PermissionError as error:
        raise DamagedCheckpoint(f"cannot read checkpoint {path}: {error.strerror}") from None
    except Exception as error:  # truncated or damaged files surface as RuntimeError, EOFError, OSError, ...
        raise DamagedCheckpoint(
            f"{path} is not a readable checkpoint: truncated, damaged, or not written by torch.save "
            f"({_first_line(error)})"
        ) from None
    if damaged:
        raise DamagedCheckpoint(f"{path} is damaged: its record {damaged!r} fails its CRC check")
    if not isinstance(state, Mapping):
        raise DamagedCheckpoint(f"{path} does not hold a checkpoint dict, got {checks.describe(state)}")
    return state


def _failed_record(path: Path) -> str | None:
    """The first record of a zip-format checkpoint whose CRC32 is wrong (None if all are right)."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
