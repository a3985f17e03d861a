"""``SpikeGuard``: drop updates whose loss or gradient norm spikes, and roll back after a run of them.

``NonFiniteGuard`` catches ``nan`` and ``inf``; a long run is also wrecked by
finite spikes. The guard keeps, on the device, a running mean and variance of
each window's loss and gradient norm, and judges each window against the band
``mean + z * std``. Nothing in the per-update path is read on the host; the
rollback decision is read once every ``check_every`` updates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from ..engine.events import OptimEvents
from ..engine.resumable_loader import ResumableLoader
from ..engine.state import optim_state
from ..optim import checks, window_state
from ..optim.distributed import collective_device, replicated_value, world_size
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict

_MODES = ("skip", "rollback")
_SIGNALS = ("loss", "grad_norm")
# One float64 vector per member: how many windows were folded in, the two running means and variances,
# the current run of consecutive spikes, the spikes so far, and whether a run reached k since the last check.
_FIELDS = ("count", "loss_mean", "loss_var", "norm_mean", "norm_var", "streak", "spikes", "tripped")
_STATE_KEYS = ("members", "window_losses", "windows", "next_check", "rollbacks", "snapshot")
Stats = torch.Tensor


def _clone_tree(value: Any) -> Any:
    """``value`` with every tensor cloned (a state dict that later updates cannot change)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {key: _clone_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tree(item) for item in value)
    return value


def _mean_over_ranks(window_loss: torch.Tensor, items: int | torch.Tensor | None) -> torch.Tensor:
    """The window's loss over all ranks' items: the ranks' mean loss, or with ``num_items`` the summed losses
    divided by the summed item counts (one all-reduce in a multi-process run)."""
    count = torch.as_tensor(1 if items is None else items, dtype=torch.float64, device=window_loss.device)
    pair = torch.stack([window_loss.reshape(()), count.reshape(())])
    if world_size() > 1:
        reduced = pair.to(collective_device())
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        pair = reduced.to(window_loss.device)
    return pair[0] / pair[1]


class SpikesPersist(RuntimeError):
    """Raised by a ``SpikeGuard`` that trips after ``max_rollbacks`` rollbacks, once it has rolled back again.

    The wrappers and the ``restore`` objects then hold the last good state
    (the newest snapshot): a checkpoint saved now keeps it.
    """


class SpikeGuard:
    """Cancel updates whose loss or gradient norm lies beyond ``mean + z * std``; roll back after ``k`` in a row.

    For each member (``members``: all, or the names given), each window's loss
    (the sum of its micro-steps' losses as given to ``backward``, i.e. the
    window's mean loss; unscaled under float16) and its gradient norm (the
    unscaled gradients before clipping) feed an exponential moving mean and
    variance (``decay``; the first windows are averaged plainly). Once
    ``max(warmup, 2)`` windows are in, a window with a watched value above
    ``mean + z * std`` is a spike: the guard cancels its update through
    ``wrapper.cancel_step(when=spike)``, decided on the device (the step is
    taken back there), it is not folded into the statistics, and it is
    counted. The wrapper counts the update in ``skipped_steps`` and fires
    ``OPTIM_STEP_SKIPPED`` rather than ``OPTIM_STEP_COMPLETED``, as for a
    float16 step the scaler skips: schedules that advance on applied updates
    do not advance. A window with a non-finite value is neither a spike nor
    folded in (that is ``NonFiniteGuard``'s and the float16 scaler's job).
    In a multi-process run the window's loss is averaged over the ranks (one
    all-reduce on the device) before it is judged, so every rank decides alike.

    With ``mode='rollback'``, ``k`` spikes in a row trip the guard; every
    ``check_every`` updates it reads that on the host (its only host read):
    if tripped, the wrappers and the objects of ``restore`` (the model,
    schedulers...) go back to the newest snapshot, taken every
    ``snapshot_every`` updates (and when the run starts) at a check with the
    guard not tripped. The data is not rewound, so the batches since the
    snapshot are skipped; the trainer's iteration goes on, and the wrappers
    keep their counts (micro-steps, updates applied and skipped: an applied
    update a rollback undid stays counted) and the guard its statistics
    (the spikes were never folded in), so it judges on after a rollback with
    no new warm-up. After ``max_rollbacks`` rollbacks, the next trip rolls
    back once more and raises ``SpikesPersist`` (a ``RuntimeError``): the run
    stops at its last good state.

    ``state_dict`` holds the statistics, the counts and the snapshot: put the
    guard in the checkpoint and a resumed run makes the decisions of the run
    that never stopped.

    Args:
        mode: ``'skip'`` (cancel spikes) or ``'rollback'`` (cancel, and roll back after ``k`` in a row).
        z: Width of the band in standard deviations, > 0.
        warmup: Windows folded in before the guard judges, >= 0 (at least 2 are needed).
        decay: Weight of the past in the moving statistics, in [0, 1).
        watch: The values judged: ``'loss'``, ``'grad_norm'``, or both.
        k: Consecutive spikes that trip a rollback, >= 1.
        max_rollbacks: Rollbacks allowed before a trip stops the run, >= 0.
        check_every: Updates between two host reads of the trip flag, >= 1.
        snapshot_every: Updates between snapshots, a multiple of ``check_every``.
        restore: Objects with ``state_dict``/``load_state_dict`` that a rollback
            restores besides the wrappers (the model at least); not the
            trainer nor the data.
        members: A member name or names of an ``OptimWrapperDict`` to watch; ``None``: all.

    Attributes:
        rollbacks: Rollbacks so far.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from engine_opt import OptimWrapper, create_trainer
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
        >>> trainer = create_trainer(model, wrapper, F.mse_loss)
        >>> guard = SpikeGuard("skip", z=4.0, warmup=3)
        >>> guard.attach(trainer)
        >>> x = torch.ones(1, 1)
        >>> data = [(x, torch.full((1, 1), 1.0 + i % 2)) for i in range(6)]
        >>> data.append((x, torch.full((1, 1), 1e3)))
        >>> _ = trainer.run(data)
        >>> guard.spikes()
        {None: 1}
    """

    def __init__(
        self,
        mode: Literal["skip", "rollback"] = "skip",
        *,
        z: float = 6.0,
        warmup: int = 20,
        decay: float = 0.99,
        watch: str | Iterable[str] = ("loss", "grad_norm"),
        k: int = 3,
        max_rollbacks: int = 3,
        check_every: int = 10,
        snapshot_every: int = 100,
        restore: Mapping[str, Any] | None = None,
        members: str | Iterable[str] | None = None,
    ) -> None:
        if not isinstance(mode, str) or mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
        self.mode = mode
        self.z = checks.number_in("z", z, "a finite number > 0", lambda value: value > 0)
        self.decay = checks.number_in("decay", decay, "a number in [0, 1)", lambda value: 0 <= value < 1)
        self.warmup = checks.int_at_least("warmup", warmup, 0)
        watched = [watch] if isinstance(watch, str) else list(watch) if isinstance(watch, Iterable) else None
        if not watched or any(name not in _SIGNALS for name in watched):
            raise ValueError(f"watch must be one or both of {list(_SIGNALS)}, got {watch!r}")
        self.watch = tuple(name for name in _SIGNALS if name in watched)
        self.k = checks.positive_int("k", k)
        self.max_rollbacks = checks.int_at_least("max_rollbacks", max_rollbacks, 0)
        self.check_every = checks.positive_int("check_every", check_every)
        self.snapshot_every = checks.positive_int("snapshot_every", snapshot_every)
        if self.snapshot_every % self.check_every:
            raise ValueError(
                f"snapshot_every must be a multiple of check_every ({check_every}), got {snapshot_every!r}"
            )
        self.restore = self._check_restore(restore)
        if mode == "rollback" and not self.restore:
            raise ValueError(
                "restore must name the objects a rollback restores besides the wrappers (at least the model), "
                "e.g. restore={'model': model}, with mode='rollback'; got none"
            )
        if members is not None and not isinstance(members, (str, Iterable)):
            raise TypeError(f"members must be a member name, names or None, got {checks.describe(members)}")
        self.members: tuple[str, ...] | None = (
            None if members is None else (members,) if isinstance(members, str) else tuple(members)
        )
        if self.members is not None and not self.members:
            raise ValueError("members must name at least one member, or be None for all; got none")
        self.rollbacks = 0
        self._stats: dict[str | None, Stats] = {}
        self._windows = 0  # windows judged so far, all members (a host count: no read)
        self._next_check = self.check_every
        self._snapshot: dict[str, Any] | None = None
        self._window_loss: dict[str | None, torch.Tensor] = {}  # the window so far, by member
        self._window_items: dict[str | None, int | torch.Tensor | None] = {}  # num_items so far, by member
        self._engine: Engine | None = None

    @staticmethod
    def _check_restore(restore: Any) -> dict[str, Any]:
        if restore is None:
            return {}
        restore = checks.mapping("restore", restore)
        for name, obj in restore.items():
            if isinstance(obj, (Engine, OptimWrapper, OptimWrapperDict, ResumableLoader)):
                raise TypeError(
                    f"restore[{name!r}] must not be the trainer, a wrapper or the data, got {type(obj).__name__}: "
                    "the guard restores the wrappers itself, and the trainer and the data go on"
                )
            if not callable(getattr(obj, "state_dict", None)) or not callable(getattr(obj, "load_state_dict", None)):
                raise TypeError(
                    f"restore[{name!r}] must have state_dict() and load_state_dict(), got {checks.describe(obj)}"
                )
        return dict(restore)

    # ------------------------------------------------------------------ attaching

    def attach(self, engine: Engine) -> None:
        """Attach to a trainer built by ``create_trainer`` (once: a guard judges one trainer's updates)."""
        state = optim_state(engine)  # refuses other engines
        if self._engine is not None:
            raise ValueError(
                f"engine: this SpikeGuard is attached already (to {type(self._engine).__name__} at "
                f"{id(self._engine):#x}); make one guard per trainer (attaching twice would count each loss twice)"
            )
        unknown = [name for name in self.members or () if name not in state.members]
        if unknown:
            raise ValueError(f"members {unknown} are not members of the trainer's wrappers {list(state.members)}")
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(OptimEvents.BACKWARD_COMPLETED, self._add_loss)
        engine.add_event_handler(OptimEvents.BEFORE_OPTIM_STEP, self._judge)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    def _watched(self, name: str | None) -> bool:
        return self.members is None or name in self.members

    def _started(self, engine: Engine) -> None:
        if self.mode == "rollback" and self._snapshot is None:
            self._snapshot = self._take_snapshot(engine)

    # ------------------------------------------------------------------ the per-update path (no host reads)

    def _add_loss(self, engine: Engine) -> None:
        state = optim_state(engine)
        name, wrapper = state.member()
        if state.loss is None or not self._watched(name) or "loss" not in self.watch:
            return
        loss = state.loss.detach().to(torch.float64)
        scaler = wrapper.loss_scaler
        if scaler is not None:  # the loss given to backward was multiplied by the scale: divide it out
            loss = loss / scaler.scale(torch.ones((), device=loss.device, dtype=torch.float32)).to(torch.float64)
        previous = self._window_loss.get(name)
        self._window_loss[name] = loss if previous is None else previous + loss.to(previous.device)
        self._window_items[name] = wrapper.window_items  # num_items: the window's losses are sums over these

    def _judge(self, engine: Engine) -> None:
        name, wrapper = optim_state(engine).member()
        if not self._watched(name):
            return
        grads = [param.grad for group in wrapper.param_groups for param in group["params"] if param.grad is not None]
        window_loss = self._window_loss.pop(name, None)
        items = self._window_items.pop(name, None)
        if window_loss is not None:
            window_loss = _mean_over_ranks(window_loss, items)
        if not grads:
            return
        norm = replicated_value(torch.nn.utils.get_total_norm(grads)).to(torch.float64)  # FSDP2: over all shards
        stats = self._member_stats(name, norm.device)
        values = []
        if "loss" in self.watch:
            missing = torch.full((), math.nan, dtype=torch.float64, device=norm.device)
            values.append(missing if window_loss is None else window_loss.to(norm.device))
        if "grad_norm" in self.watch:
            values.append(norm)
        self._stats[name], spike = self._decide(stats, torch.stack(values))
        self._windows += 1
        if self._windows > max(self.warmup, 2):  # before, no window can be a spike
            wrapper.cancel_step(when=spike)

    def _member_stats(self, name: str | None, device: torch.device) -> Stats:
        stats = self._stats.get(name)
        if stats is None:
            stats = torch.zeros(len(_FIELDS), dtype=torch.float64, device=device)
        elif stats.device != device:
            stats = stats.to(device)
        return stats

    def _decide(self, stats: Stats, values: torch.Tensor) -> tuple[Stats, torch.Tensor]:
        """The next statistics and whether ``values`` (the watched ones, in ``_SIGNALS`` order) are a spike."""
        count, loss_mean, loss_var, norm_mean, norm_var, streak, spikes, tripped = stats.unbind()
        mean_var = {"loss": (loss_mean, loss_var), "grad_norm": (norm_mean, norm_var)}
        means = torch.stack([mean_var[name][0] for name in self.watch])
        variances = torch.stack([mean_var[name][1] for name in self.watch])
        finite = torch.isfinite(values).all()
        warm = count >= max(self.warmup, 2)
        spike = warm & finite & (values > means + self.z * variances.sqrt()).any()
        good = finite & ~spike
        weight = torch.maximum(1.0 / (count + 1.0), torch.full_like(count, 1.0 - self.decay))
        delta = values - means
        new_means = torch.where(good, means + weight * delta, means)
        new_vars = torch.where(good, (1.0 - weight) * (variances + weight * delta * delta), variances)
        updated = dict(zip(self.watch, zip(new_means.unbind(), new_vars.unbind(), strict=True), strict=True))
        loss_mean, loss_var = updated.get("loss", (loss_mean, loss_var))
        norm_mean, norm_var = updated.get("grad_norm", (norm_mean, norm_var))
        streak = torch.where(spike, streak + 1, torch.where(good, torch.zeros_like(streak), streak))
        tripped = torch.maximum(tripped, (streak >= self.k).to(tripped.dtype))
        new = torch.stack([count + good, loss_mean, loss_var, norm_mean, norm_var, streak, spikes + spike, tripped])
        return new, spike

    # ------------------------------------------------------------------ checks and rollbacks (host reads)

    def _iteration_completed(self, engine: Engine) -> None:
        if self.mode != "rollback" or self._windows < self._next_check:
            return
        while self._next_check <= self._windows:
            self._next_check += self.check_every
        if self._tripped():
            self._roll_back(engine)
        elif self._windows % self.snapshot_every < self.check_every:
            self._snapshot = self._take_snapshot(engine)

    def _tripped(self) -> bool:
        flags = [stats[_FIELDS.index("tripped")].cpu() for stats in self._stats.values()]
        return bool(flags) and bool(torch.stack(flags).any())

    def _take_snapshot(self, engine: Engine) -> dict[str, Any]:
        wrappers = {str(name): wrapper.state_dict() for name, wrapper in optim_state(engine).members.items()}
        objects = {name: obj.state_dict() for name, obj in self.restore.items()}
        snapshot: dict[str, Any] = _clone_tree({"wrappers": wrappers, "objects": objects})
        return snapshot

    def _roll_back(self, engine: Engine) -> None:
        snapshot = self._snapshot
        if snapshot is None:  # taken when the run starts
            raise RuntimeError("SpikeGuard: tripped before the run started")
        self._restore(engine, snapshot)
        for name, stats in self._stats.items():  # the streak is over; statistics and counts go on
            stats = stats.clone()
            stats[_FIELDS.index("streak")] = 0
            stats[_FIELDS.index("tripped")] = 0
            self._stats[name] = stats
        if self.rollbacks >= self.max_rollbacks:  # a checkpoint of this state resumes judging anew
            raise SpikesPersist(
                f"SpikeGuard: {self.k} loss/gradient spikes in a row again at iteration {engine.state.iteration}, "
                f"after {self.rollbacks} rollback(s) (max_rollbacks={self.max_rollbacks}); the run is stopped, "
                "rolled back to its last good state: lower the learning rate, clip the gradients, or look at the "
                "data around this iteration"
            )
        self.rollbacks += 1

    def _restore(self, engine: Engine, snapshot: Mapping[str, Any]) -> None:
        """The snapshot's weights, optimizer states and ``restore`` objects; the counts and open windows of now."""
        for name, wrapper in optim_state(engine).members.items():
            saved = window_state.at_position(snapshot["wrappers"][str(name)], wrapper.state_dict())
            wrapper.load_state_dict(_clone_tree(saved))
        for name, obj in self.restore.items():
            obj.load_state_dict(_clone_tree(snapshot["objects"][name]))

    # ------------------------------------------------------------------ what happened, and state

    def spikes(self) -> dict[str | None, int]:
        """Spikes so far (cancelled updates), by member name (``None`` for one wrapper). Reads the device."""
        return {name: int(stats[_FIELDS.index("spikes")].item()) for name, stats in self._stats.items()}

    def statistics(self) -> dict[str | None, dict[str, float]]:
        """Each member's statistics by field name (``count``, ``loss_mean``, ...). Reads the device."""
        return {name: dict(zip(_FIELDS, stats.tolist(), strict=True)) for name, stats in self._stats.items()}

    def _guard_state(self) -> dict[str, Any]:
        return {
            "members": [[name, stats] for name, stats in self._stats.items()],
            "window_losses": [[name, loss] for name, loss in self._window_loss.items()],
            "windows": self._windows,
            "next_check": self._next_check,
        }

    def _load_guard_state(self, state: Mapping[str, Any]) -> None:
        self._stats = {name: stats.detach().clone() for name, stats in state["members"]}
        self._window_loss = {name: loss.detach().clone() for name, loss in state["window_losses"]}
        self._windows = state["windows"]
        self._next_check = state["next_check"]

    def state_dict(self) -> dict[str, Any]:
        """The statistics of each member, the counts and the rollback snapshot (tensors, ints, lists)."""
        state: dict[str, Any] = _clone_tree(self._guard_state())
        state.update(rollbacks=self.rollbacks, snapshot=self._snapshot)
        return state

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise ``ValueError``/``TypeError`` if ``state_dict`` cannot be loaded; change nothing."""
        state_dict = checks.mapping("state_dict", state_dict)
        checks.known_keys("state_dict", state_dict, _STATE_KEYS)
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}; pass what SpikeGuard.state_dict() returned")
        for key in ("windows", "next_check", "rollbacks"):
            checks.saved_int(f"state_dict[{key!r}]", state_dict[key], 0)
        entries = state_dict["members"]
        if not isinstance(entries, list):
            raise TypeError(f"state_dict['members'] must be a list, got {checks.describe(entries)}")
        for index, entry in enumerate(entries):
            ok = (
                isinstance(entry, (list, tuple))
                and len(entry) == 2
                and (entry[0] is None or isinstance(entry[0], str))
                and isinstance(entry[1], torch.Tensor)
                and entry[1].shape == (len(_FIELDS),)
                and entry[1].dtype == torch.float64
            )
            if not ok:
                raise ValueError(
                    f"state_dict['members'][{index}] must be [name, a float64 tensor of {len(_FIELDS)} statistics]"
                )
        losses = state_dict["window_losses"]
        if not isinstance(losses, list) or not all(
            isinstance(entry, (list, tuple))
            and len(entry) == 2
            and (entry[0] is None or isinstance(entry[0], str))
            and isinstance(entry[1], torch.Tensor)
            and entry[1].numel() == 1
            for entry in losses
        ):
            raise ValueError("state_dict['window_losses'] must be a list of [name, a one-element tensor]")
        snapshot = state_dict["snapshot"]
        if snapshot is not None and not (isinstance(snapshot, Mapping) and {"wrappers", "objects"} <= set(snapshot)):
            raise ValueError("state_dict['snapshot'] must be None or a snapshot the guard took")

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what ``state_dict()`` returned (checked first; the caller's dict is not changed)."""
        self.check_state_dict(state_dict)
        self._load_guard_state(state_dict)
        self.rollbacks = state_dict["rollbacks"]
        self._snapshot = None if state_dict["snapshot"] is None else _clone_tree(state_dict["snapshot"])


__all__ = ["SpikeGuard", "SpikesPersist"]
