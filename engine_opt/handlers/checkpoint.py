"""Checkpoints with Ignite's ``Checkpoint``/``DiskSaver``, and exact resume.

``attach_checkpoint`` saves ``to_save`` periodically and at the end of the run;
``resume_from_latest`` loads the newest checkpoint of a directory into the same
objects. ``ResumableLoader`` wraps the data so a checkpoint also holds the data
position and the random number generators: a run resumed mid-epoch, in a new
process, sees the same batches and random numbers as one that never stopped::

    data = ResumableLoader(DataLoader(dataset, batch_size=32, shuffle=True))
    to_save = {"model": model, "optim_wrapper": wrapper, "trainer": trainer, "data": data}
    resume_from_latest(to_save, "checkpoints")          # None on a fresh start
    attach_checkpoint(trainer, to_save, "checkpoints", every=100)
    trainer.run(data, max_epochs=10)
"""

from __future__ import annotations

import pickle
import random
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from .. import checks, parallel
from ..wrapper import OptimWrapper

_STEP = re.compile(r"checkpoint_(\d+)\.pt$")
_STATE_KEYS = ("epoch_rng", "position", "rng")


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The states of torch's (CPU and initialised CUDA), Python's and NumPy's global generators.

    With ``generator``, that generator's state is included too. Holds only
    tensors, numbers and tuples, so it loads with ``weights_only=True``.

    Example:
        >>> state = rng_state()
        >>> a = torch.rand(1); set_rng_state(state); b = torch.rand(1)
        >>> bool(a == b)
        True
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


class ResumableLoader:
    """An iterable of batches whose state is its position and the random generators.

    Each pass records the generators' states as it begins; ``state_dict``
    adds the number of batches given out and the generators' states now. A
    loaded state takes effect at the next pass: the generators are set as
    they were when the interrupted pass began, the batches already used are
    drawn again and dropped, then the generators are set as they were at the
    checkpoint. So a shuffled ``DataLoader`` (and dropout, augmentation...)
    continues exactly.

    Args:
        data: A ``DataLoader`` or any re-iterable of batches. A ``DataLoader``
            with its own ``generator`` has that generator saved too.

    Example:
        >>> loader = ResumableLoader(torch.utils.data.DataLoader(torch.arange(6), batch_size=2, shuffle=True))
        >>> batches = iter(loader)
        >>> first = next(batches)
        >>> state = loader.state_dict()
        >>> rest = [batch.tolist() for batch in batches]
        >>> resumed = ResumableLoader(torch.utils.data.DataLoader(torch.arange(6), batch_size=2, shuffle=True))
        >>> resumed.load_state_dict(state)
        >>> [batch.tolist() for batch in resumed] == rest
        True
    """

    def __init__(self, data: Iterable[Any]) -> None:
        if not isinstance(data, Iterable) or isinstance(data, Iterator):
            raise TypeError(
                f"data must be a re-iterable collection of batches such as a DataLoader, got {checks.describe(data)}"
            )
        self.data = data
        self._generator: torch.Generator | None = getattr(data, "generator", None)
        sampler = getattr(data, "sampler", None)
        self._set_epoch: Callable[[int], None] | None = getattr(sampler, "set_epoch", None)
        self._epoch_rng: dict[str, Any] | None = None
        self._position = 0
        self._passes = 0
        self._pending: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending = _own_rank(pending)
            self._passes = pending.get("passes", self._passes)
        if pending is not None and pending["epoch_rng"] is not None and not self._at_end(pending["position"]):
            self._begin_pass(self._passes - 1)
            set_rng_state(pending["epoch_rng"], self._generator)
            batches = iter(self.data)
            skipped = sum(1 for _ in zip(range(pending["position"]), batches, strict=False))
            self._check_position(pending["position"], skipped)
            set_rng_state(pending["rng"], self._generator)
            self._epoch_rng = pending["epoch_rng"]
            self._position = skipped
            return self._count(batches)
        if pending is not None:
            self._check_position(pending["position"], self._length())
            set_rng_state(pending["rng"], self._generator)
        self._begin_pass(self._passes)
        self._passes += 1
        self._epoch_rng = rng_state(self._generator)
        self._position = 0
        return self._count(iter(self.data))

    def _begin_pass(self, index: int) -> None:
        """Give a ``DistributedSampler`` (anything with ``set_epoch``) the index of the pass, so each shuffles anew."""
        if self._set_epoch is not None:
            self._set_epoch(max(index, 0))

    @staticmethod
    def _check_position(position: int, available: int | None) -> None:
        if available is not None and position > available:
            raise ValueError(
                f"the checkpoint was taken after batch {position} of a pass, but the data gives only "
                f"{available} batches; resume with the data the run was checkpointed with"
            )

    def _length(self) -> int | None:
        try:
            return len(self.data)  # type: ignore[arg-type]
        except TypeError:
            return None

    def _at_end(self, position: int) -> bool:
        length = self._length()
        return length is not None and position >= length

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        length = self._length()
        for batch in batches:
            self._position += 1
            if self._position == length:
                # Finish the pass before handing out its last batch: a sampler sharing the loader's
                # generator draws once more when exhausted, and that draw must belong to this pass.
                rest = list(batches)
                yield batch
                for batch in rest:
                    self._position += 1
                    yield batch
                return
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where the current pass began, how far it got, the generators now.

        ``{'epoch_rng', 'position', 'rng', 'passes'}``; in a distributed run
        also ``'ranks'``, every rank's generator states (a collective call:
        every rank must make it, as Ignite's ``Checkpoint`` does).
        """
        if self._pending is not None:
            return dict(self._pending)
        state: dict[str, Any] = {
            "epoch_rng": self._epoch_rng,
            "position": self._position,
            "rng": rng_state(self._generator),
            "passes": self._passes,
        }
        if parallel.world_size() > 1:
            state["ranks"] = parallel.gather_objects({"epoch_rng": state["epoch_rng"], "rng": state["rng"]})
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Take ``state_dict`` into effect at the next pass over the data (checked first)."""
        self._check_state_dict(state_dict)
        self._pending = dict(state_dict)

    def _check_state_dict(self, state_dict: Any) -> None:
        """Raise if ``state_dict`` cannot be loaded; change nothing."""
        state_dict = checks.mapping("state_dict", state_dict)
        checks.known_keys("state_dict", state_dict, (*_STATE_KEYS, "passes", "ranks"))
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}; pass what ResumableLoader.state_dict() returned")
        for key in ("position", "passes"):
            value = state_dict.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict[{key!r}] must be an int >= 0, got {value!r}")
        for key in ("epoch_rng", "rng"):
            value = state_dict[key]
            if not (value is None and key == "epoch_rng") and not (isinstance(value, Mapping) and "torch" in value):
                raise ValueError(f"state_dict[{key!r}] must be what rng_state() returned, got {checks.describe(value)}")
        ranks = state_dict.get("ranks")
        world = parallel.world_size()
        saved_world = 1 if ranks is None else len(ranks) if isinstance(ranks, list) else None
        if saved_world != world:
            raise ValueError(
                f"the data state was saved by a run of {saved_world} process(es), this run has {world}; the data "
                "position and random streams of each rank resume exactly only with as many processes"
            )


def _own_rank(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with this rank's generator states in place of rank 0's."""
    ranks = state.get("ranks")
    if ranks is None:
        return state
    return {**state, **ranks[parallel.rank()]}


def attach_checkpoint(
    trainer: Engine,
    to_save: Mapping[str, Any],
    dirname: str | Path,
    *,
    every: int | None = None,
    n_saved: int | None = 2,
) -> Checkpoint:
    """Save ``to_save`` every ``every`` iterations (or each epoch), and when the run ends.

    Files are ``checkpoint_{iteration}.pt`` in ``dirname``, written through a
    temporary file and a rename (``DiskSaver(atomic=True)``), so a process
    killed while saving leaves the previous checkpoint as the newest one. The
    newest ``n_saved`` are kept, counting those already in ``dirname`` (a
    resumed run's); a run that starts behind the newest file there is refused
    with a ``ValueError`` when it starts, since its own files would not be
    kept. In a distributed run rank 0 writes the files; every rank must
    attach it, since saving gathers state from all ranks.

    Args:
        trainer: The trainer.
        to_save: Objects with ``state_dict``/``load_state_dict``, by name;
            include the trainer, and the ``ResumableLoader`` for exact resume.
        dirname: Directory for the files (created if missing).
        every: Save period in iterations; ``None`` saves at each epoch's end.
        n_saved: How many checkpoints to keep (``None``: all).

    Returns:
        The attached Ignite ``Checkpoint``.
    """
    if every is not None:
        checks.positive_int("every", every)
    if n_saved is not None:
        checks.positive_int("n_saved", n_saved)
    checkpoint = Checkpoint(
        dict(to_save),
        DiskSaver(str(dirname), require_empty=False, atomic=True, create_dir=True),
        n_saved=n_saved,
        global_step_transform=lambda engine, _: engine.state.iteration,
        filename_pattern="checkpoint_{global_step}.{ext}",  # Ignite would name a lone object's file after it
    )
    trainer.add_event_handler(Events.STARTED, _take_over_files, checkpoint, Path(dirname))
    event = Events.EPOCH_COMPLETED if every is None else Events.ITERATION_COMPLETED(every=every)
    trainer.add_event_handler(event, checkpoint)

    def save_last(engine: Engine) -> None:
        last = checkpoint.last_checkpoint
        if last is None or _step_of(Path(str(last))) != engine.state.iteration:
            checkpoint(engine)

    trainer.add_event_handler(Events.COMPLETED, save_last)
    return checkpoint


def _take_over_files(engine: Engine, checkpoint: Checkpoint, directory: Path) -> None:
    """Count the checkpoints already in ``directory`` (the resumed run's) towards ``n_saved``.

    Files from later iterations than the run's own belong to another run: its
    checkpoints would rank below them and never be kept, so the run is refused
    (on every rank: a collective call).
    """
    saved = (
        sorted((step, path.name) for path in directory.iterdir() if (step := _step_of(path)) is not None)
        if directory.is_dir()
        else []
    )
    iteration = engine.state.iteration
    later = sorted(
        {name for names in parallel.gather_objects([n for s, n in saved if s > iteration]) for name in names}
    )
    if later:
        raise ValueError(
            f"{directory} holds checkpoints of later iterations than this run's {iteration} ({', '.join(later)}): "
            "resume from the newest (resume_from_latest), or save to another directory"
        )
    checkpoint.load_state_dict({"_saved": saved})


def _step_of(path: Path) -> int | None:
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else None


def latest_checkpoint(dirname: str | Path) -> Path | None:
    """The ``checkpoint_{iteration}.pt`` file of ``dirname`` with the highest iteration, or None."""
    directory = Path(dirname)
    if not directory.is_dir():
        return None
    steps = [(step, path) for path in directory.iterdir() if (step := _step_of(path)) is not None]
    return max(steps)[1] if steps else None


def resume_from_latest(to_load: Mapping[str, Any], dirname: str | Path) -> Path | None:
    """Load the newest checkpoint of ``dirname`` into ``to_load``; return its path (None if there is none).

    See ``load_checkpoint`` for what is checked. In a distributed run every
    rank calls it and reads the same file.
    """
    path = latest_checkpoint(dirname)
    if path is not None:
        load_checkpoint(to_load, path)
    return path


def load_checkpoint(to_load: Mapping[str, Any], path: str | Path) -> None:
    """Load the checkpoint file ``path`` into the objects of ``to_load``: all of them, or none.

    The file is read with ``weights_only=True``, so loading it can never run
    code. Before anything is loaded, every name in ``to_load`` must be in
    it, and every object must accept its part: models the same keys and
    shapes, wrappers, optimizers, the trainer and the ``ResumableLoader``
    their states. On any mismatch a ``ValueError`` names the file and what
    differs, and the objects are left as they were.
    """
    path = Path(path)
    state = _read_checkpoint(path)
    if len(to_load) == 1 and (name := next(iter(to_load))) not in state:
        state = {name: state}  # Ignite's Checkpoint saves a lone object's state dict as the whole file
    missing = [name for name in to_load if name not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it holds {sorted(state)}: is it a checkpoint of this run?")
    for name, obj in to_load.items():
        try:
            _check_fits(obj, state[name])
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{path}: {name!r} does not match this run: {error}") from None
    Checkpoint.load_objects(dict(to_load), state)


def _read_checkpoint(path: Path) -> Mapping[str, Any]:
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
            raise ValueError(
                f"{path} holds objects other than tensors and plain containers; loading it could run code, "
                "so it is refused (checkpoints written by attach_checkpoint hold none)"
            ) from None
        raise ValueError(f"{path} is not a readable checkpoint: {_first_line(error)}") from None
    except PermissionError as error:
        raise ValueError(f"cannot read checkpoint {path}: {error.strerror}") from None
    except Exception as error:  # truncated or damaged files surface as RuntimeError, EOFError, OSError, ...
        raise ValueError(
            f"{path} is not a readable checkpoint: truncated, damaged, or not written by torch.save "
            f"({_first_line(error)})"
        ) from None
    if damaged:
        raise ValueError(f"{path} is damaged: its record {damaged!r} fails its CRC check")
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a checkpoint dict, got {checks.describe(state)}")
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


def _check_fits(obj: Any, saved: Any) -> None:
    """Raise if ``saved`` cannot be loaded into ``obj``; change nothing."""
    if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        obj = obj.module  # Checkpoint saves and loads the wrapped module
    if isinstance(obj, nn.Module):
        saved = checks.mapping("the saved model state", saved)
        expected = obj.state_dict()
        missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        if missing or unexpected:
            raise ValueError(f"the model lacks {unexpected} and the checkpoint lacks {missing}")
        shapes = [
            f"{key}: saved {tuple(saved[key].shape)}, model {tuple(value.shape)}"
            for key, value in expected.items()
            if isinstance(saved[key], torch.Tensor) and saved[key].shape != value.shape
        ]
        if shapes:
            raise ValueError(f"shapes differ: {'; '.join(shapes)}")
    elif isinstance(obj, torch.optim.Optimizer):
        OptimWrapper(obj)._check_state_dict(saved)
    elif isinstance(obj, Engine):
        Engine(lambda engine, batch: None).load_state_dict(checks.mapping("the saved trainer state", saved))
    check = getattr(obj, "_check_state_dict", None)
    if check is not None:
        check(saved)
