"""The data position and the random generators: what a run needs to resume mid-epoch exactly.

``ResumableLoader`` wraps the data so a checkpoint also holds the data
position and the random number generators: a run resumed mid-epoch, in a new
process, sees the same batches and random numbers as one that never stopped.
``rng_state``/``set_rng_state`` save and restore the generators themselves.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch.utils.data import Dataset, DistributedSampler

from ..optim import checks, distributed

_STATE_KEYS = ("epoch_rng", "position", "rng")


Generators = torch.Generator | Sequence[torch.Generator] | None
"""A generator of the user's (a ``DataLoader``'s, a sampler's), several, or none."""


def rng_state(generator: Generators = None) -> dict[str, Any]:
    """The states of torch's (CPU and initialised CUDA), Python's and NumPy's global generators.

    With ``generator``, that generator's state is included too (with a
    sequence of them, each one's, in order). Holds only tensors, numbers and
    tuples, so it loads with ``weights_only=True``.

    Examples:
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
    if isinstance(generator, torch.Generator):
        state["generator"] = generator.get_state()
    elif generator is not None:
        state["generators"] = [each.get_state() for each in generator]
    return state


def check_rng_state(where: str, state: Any) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``set_rng_state`` can restore ``state``; change nothing.

    Examples:
        >>> check_rng_state("rng", {"torch": torch.get_rng_state()})
        Traceback (most recent call last):
        ...
        ValueError: rng must be what rng_state() returned: it lacks ['python']
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} must be what rng_state() returned, got {checks.describe(state)}")
    missing = [key for key in ("torch", "python") if key not in state]
    if missing:
        raise ValueError(f"{where} must be what rng_state() returned: it lacks {missing}")
    python = state["python"]
    generators = state.get("generators", [])
    if not isinstance(generators, list):
        raise ValueError(f"{where} must be what rng_state() returned: its generators are no list")
    byte_states = [state["torch"], *state.get("cuda", []), *([state["generator"]] if "generator" in state else [])]
    byte_states += generators
    numpy = state.get("numpy", (None, torch.zeros(1, dtype=torch.int64), 0, 0, 0.0))
    well_formed = (
        all(isinstance(value, torch.Tensor) and value.dtype == torch.uint8 for value in byte_states)
        and isinstance(python, tuple)
        and len(python) == 3
        and isinstance(python[1], tuple)
        and isinstance(numpy, tuple)
        and len(numpy) == 5
        and isinstance(numpy[1], torch.Tensor)
    )
    if not well_formed:
        raise ValueError(f"{where} must be what rng_state() returned: its generator states are malformed")


def set_rng_state(state: Mapping[str, Any], generator: Generators = None) -> None:
    """Restore what ``rng_state`` returned (``generator`` as given to it).

    A state of one generator (``rng_state(loader.generator)``, or an earlier
    release's) restores the first of a sequence.
    """
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    generators = [generator] if isinstance(generator, torch.Generator) else list(generator or ())
    saved = state["generators"] if "generators" in state else [state["generator"]] if "generator" in state else []
    for each, each_state in zip(generators, saved, strict=False):
        each.set_state(each_state)


def _generators_of(data: Any) -> tuple[torch.Generator, ...]:
    """The generators a ``DataLoader``'s order comes from: its own, its sampler's, its batch sampler's sampler's."""
    sampler = getattr(data, "sampler", None)
    inner = getattr(getattr(data, "batch_sampler", None), "sampler", None)
    found = [getattr(owner, "generator", None) for owner in (data, sampler, inner)]
    distinct = {id(generator): generator for generator in found if isinstance(generator, torch.Generator)}
    return tuple(distinct.values())


class ResumableLoader:
    """An iterable of batches whose state is its position and the random generators.

    Each pass records the generators' states as it begins; ``state_dict``
    adds the number of batches given out and the generators' states now. A
    loaded state takes effect at the next pass: the generators are set as
    they were when the interrupted pass began, the batches already used are
    drawn again and dropped, then the generators are set as they were at the
    checkpoint. So a shuffled ``DataLoader`` (and dropout, augmentation...)
    continues exactly.

    In a distributed run each rank's generators are saved. A state saved by
    another number of processes loads too: between passes always, mid-pass
    where a ``DistributedSampler`` orders the data of both runs alike (the
    same number of samples, ``seed``, ``shuffle``, ``drop_last`` and global
    batch, ``batch_size`` times the processes): then the batches given out
    so far are the same samples at any number of processes, and they are
    skipped. Each process then keeps its own random generators (a rank of
    the new run has no saved counterpart). A ``DistributedSampler`` pads the
    data to a multiple of the processes by repeating samples (or trims it
    with ``drop_last``): a state loads on another number only where that
    makes the same total (``sampled_total``), so the resumed run repeats the
    samples the interrupted one would have; elsewhere it is refused, naming
    the numbers that would be exact (any divisor, when the count divides the
    samples).

    Args:
        data: A ``DataLoader`` or any re-iterable of batches. The generators
            of a ``DataLoader``, its sampler's and its batch sampler's
            sampler's (``RandomSampler(dataset, generator=g)``, a common way
            to seed the order) are saved too.

    Examples:
        >>> from torch.utils.data import DataLoader
        >>> def shuffled():
        ...     return DataLoader(torch.arange(6), batch_size=2, shuffle=True)
        >>> loader = ResumableLoader(shuffled())
        >>> batches = iter(loader)
        >>> first = next(batches)
        >>> state = loader.state_dict()
        >>> rest = [batch.tolist() for batch in batches]
        >>> resumed = ResumableLoader(shuffled())
        >>> resumed.load_state_dict(state)
        >>> [batch.tolist() for batch in resumed] == rest
        True
    """

    def __init__(self, data: Iterable[Any]) -> None:
        if not isinstance(data, Iterable) or isinstance(data, (Iterator, str, bytes)):
            raise TypeError(
                f"data must be a re-iterable collection of batches such as a DataLoader, got {checks.describe(data)}"
            )
        self.data = data
        self._generators = _generators_of(data)
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
            pending = self._own_streams(pending)
            self._passes = pending.get("passes", self._passes)
        if pending is not None and pending["epoch_rng"] is not None and not self._at_end(pending["position"]):
            self._begin_pass(self._passes - 1)
            set_rng_state(pending["epoch_rng"], self._generators)
            batches = iter(self.data)
            skipped = sum(1 for _ in zip(range(pending["position"]), batches, strict=False))
            self._check_position(pending["position"], skipped)
            set_rng_state(pending["rng"], self._generators)
            self._epoch_rng = pending["epoch_rng"]
            self._position = skipped
            return self._counted(batches)
        if pending is not None:
            self._check_position(pending["position"], self._length())
            set_rng_state(pending["rng"], self._generators)
        self._begin_pass(self._passes)
        self._passes += 1
        self._epoch_rng = rng_state(self._generators)
        self._position = 0
        return self._counted(iter(self.data))

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

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
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

        ``{'epoch_rng', 'position', 'rng', 'passes', 'length', 'order'}``
        (``'length'``: batches per pass, ``None`` if unknown; ``'order'``:
        the ``DistributedSampler``'s settings, ``None`` without one); in a
        distributed run also ``'ranks'``, every rank's generator states (a
        collective call: every rank must make it, as Ignite's ``Checkpoint`` does).
        """
        if self._pending is not None:
            return dict(self._pending)
        state: dict[str, Any] = {
            "epoch_rng": self._epoch_rng,
            "position": self._position,
            "rng": rng_state(self._generators),
            "passes": self._passes,
            "length": self._length(),
            "order": _order(self.data),
        }
        if distributed.world_size() > 1:
            state["ranks"] = distributed.gather_objects({"epoch_rng": state["epoch_rng"], "rng": state["rng"]})
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Take ``state_dict`` into effect at the next pass over the data (checked first)."""
        self.check_state_dict(state_dict)
        self._pending = dict(state_dict)

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise ``ValueError``/``TypeError`` if ``state_dict`` cannot be loaded; change nothing."""
        state_dict = checks.mapping("state_dict", state_dict)
        checks.known_keys("state_dict", state_dict, (*_STATE_KEYS, "passes", "ranks", "length", "order"))
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}; pass what ResumableLoader.state_dict() returned")
        for key in ("position", "passes"):
            checks.saved_int(f"state_dict[{key!r}]", state_dict.get(key, 0), 0)
        ranks = state_dict.get("ranks")
        if ranks is not None and (not isinstance(ranks, list) or not ranks):
            raise ValueError(f"state_dict['ranks'] must be a list of each rank's generator states, got {ranks!r}")
        saved_world = 1 if ranks is None else len(ranks)
        if saved_world == distributed.world_size():
            self._check_position(state_dict["position"], self._length())
        else:
            self._check_same_samples(state_dict, saved_world)
            if not _between_passes(state_dict):
                self._check_same_order(state_dict, saved_world)
                self._check_position(state_dict["position"], self._length())
        for where, streams in [("state_dict", state_dict)] + [
            (f"state_dict['ranks'][{rank}]", checks.mapping(f"state_dict['ranks'][{rank}]", states))
            for rank, states in enumerate(ranks or [])
        ]:
            for key in ("epoch_rng", "rng"):
                if key == "rng" or streams.get(key) is not None:
                    check_rng_state(f"{where}[{key!r}]", streams.get(key))
                    self._check_generator_count(f"{where}[{key!r}]", streams[key])

    def _check_generator_count(self, where: str, state: Mapping[str, Any]) -> None:
        """A state of as many data generators as this loader has (its DataLoader's, its samplers')."""
        saved = len(state.get("generators", []))
        if "generators" in state and saved != len(self._generators):
            raise ValueError(
                f"{where} holds the states of {saved} data generator(s), this loader's data has "
                f"{len(self._generators)} (a DataLoader's own and its sampler's): resume with the data the run "
                "was checkpointed with"
            )

    def _check_same_order(self, state_dict: Mapping[str, Any], saved_world: int) -> None:
        """A state of another number of processes: refused mid-pass unless the batches so far are the same samples."""
        position = state_dict["position"]
        if "length" not in state_dict:
            raise ValueError(
                f"the data state was saved by a run of {saved_world} process(es) by an earlier release, which "
                f"recorded neither the length of its pass nor its sampler: whether its batch {position} ended the "
                f"pass is unknown, so it resumes on {saved_world} process(es) only"
            )
        saved, order = state_dict.get("order"), _order(self.data)
        if saved is None or saved != order:
            raise ValueError(
                f"the data state was saved mid-pass (after batch {position}) by a run of {saved_world} process(es), "
                f"this run has {distributed.world_size()}: its batches so far are the same samples only where a "
                "DistributedSampler orders both runs' data alike (the same samples, seed, shuffle, drop_last and "
                f"global batch = batch_size x processes); saved {saved}, this run {order}. Resume with as many "
                "processes, or from a checkpoint between passes"
            )

    def _check_same_samples(self, state_dict: Mapping[str, Any], saved_world: int) -> None:
        """A state of another number of processes: refused where a ``DistributedSampler`` pads (or trims) the
        data to another total there, which repeats (or drops) other samples than the interrupted run did."""
        saved, order = state_dict.get("order"), _order(self.data)
        if not isinstance(saved, Mapping) or order is None:
            return
        if (saved.get("samples"), saved.get("drop_last")) != (order["samples"], order["drop_last"]):
            return  # other data: the mid-pass order check says so, and a whole next pass is this data's own
        samples, drop_last, world = order["samples"], order["drop_last"], distributed.world_size()
        before, now = sampled_total(samples, saved_world, drop_last), sampled_total(samples, world, drop_last)
        if before == now:
            return
        exact = [count for count in range(1, 1025) if sampled_total(samples, count, drop_last) == before]
        how = "drops samples" if drop_last else "repeats samples"
        raise ValueError(
            f"the data state was saved by a run of {saved_world} process(es), this run has {world}: a "
            f"DistributedSampler over {samples} samples gives {before} a pass on {saved_world} and {now} on {world} "
            f"(it {how} so that every process has as many), so this run would see other samples than the "
            f"interrupted one. Resume on a number of processes that gives {before}: "
            f"{', '.join(map(str, exact[:8]))}{', ...' if len(exact) > 8 else ''}"
        )

    def _own_streams(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with this rank's generator states: its saved ones, or its current ones (another world size)."""
        ranks = state.get("ranks")
        saved_world = 1 if ranks is None else len(ranks)
        if saved_world == distributed.world_size():
            return state if ranks is None else {**state, **ranks[distributed.rank()]}
        now = rng_state(self._generators)
        if _between_passes(state):  # the next pass is whole, however long this run's passes are
            return {**state, "position": 0, "epoch_rng": None, "rng": now}
        return {**state, "epoch_rng": now, "rng": now}


def _between_passes(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` was saved before a pass began or after it ended (by its own length)."""
    position = state["position"]
    return state["epoch_rng"] is None or position == 0 or position == state.get("length")


def sampled_total(samples: int, processes: int, drop_last: bool) -> int:
    """The samples a ``DistributedSampler`` hands out per pass over all processes: padded up to a multiple of
    ``processes`` by repeating some, or trimmed down to one with ``drop_last``.

    Examples:
        >>> sampled_total(4096, 3, drop_last=False), sampled_total(4096, 3, True)
        (4098, 4095)
    """
    checks.int_at_least("samples", samples, 0)
    checks.positive_int("processes", processes)
    # torch's own rule, not a copy of it: the sampler computes its total when it is made
    indices = cast("Dataset[int]", range(samples))  # all the sampler reads of a dataset is its length
    return DistributedSampler(indices, num_replicas=processes, rank=0, drop_last=drop_last).total_size


def _order(data: Any) -> dict[str, Any] | None:
    """What makes a ``DistributedSampler``'s global batches the same samples at any number of processes."""
    sampler = getattr(data, "sampler", None)
    batch_size = getattr(data, "batch_size", None)
    if not isinstance(sampler, DistributedSampler) or not isinstance(batch_size, int):
        return None
    return {
        "samples": len(sampler.dataset),  # type: ignore[arg-type]
        "seed": sampler.seed,
        "shuffle": sampler.shuffle,
        "drop_last": sampler.drop_last,
        "global_batch": batch_size * sampler.num_replicas,
    }
