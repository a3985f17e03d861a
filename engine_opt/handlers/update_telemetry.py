"""``UpdateTelemetryHandler``: per param group and per layer norms of the gradients, the update and the weights.

Tags (``{m}`` is ``''`` for one wrapper and ``'{name}/'`` for each member of
an ``OptimWrapperDict``; ``{g}`` is a param group's label, as
``OptimParamsHandler`` names it (``group_labels``); ``{l}`` a layer prefix;
every tag starts with ``'{tag}/'``, ``telemetry/`` by default):

============================= =====================================================================
``{m}grad_norm/{g}``           2-norm of the group's gradients before clipping (unscaled under float16)
``{m}update_norm/{g}``         2-norm of the group's parameter change made by the update
``{m}weight_norm/{g}``         2-norm of the group's parameters after the update
``{m}update_ratio/{g}``        ``update_norm / weight_norm``
``{m}layer_grad_norm/{l}``     the same four for the parameters under a layer prefix
``{m}grad_norm_total``         2-norm of all the member's gradients before clipping
``{m}clipped``                 1.0 if clipping changed this update's gradients, else 0.0 (with ``clip_grad``)
``{m}clip_rate``               the fraction of the handler's measured updates that were clipped (with ``clip_grad``)
``{m}loss_scale``              the float16 grad scaler's scale after the update
============================= =====================================================================

(``layer_update_norm``, ``layer_weight_norm`` and ``layer_update_ratio``
complete the layer row.) Only every ``every``-th update of each member (its
own ``step_count``) is measured; a measured update that float16 or a guard
skips logs nothing. With FSDP2 or HSDP (``DTensor`` parameters sharded over
every rank) each rank measures its shards and one all-reduce of the squared
norms per measured update makes them the whole tensors' norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers.base_logger import BaseHandler, BaseLogger
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..optim import checks
from ..optim.foreach import tensor_norms
from ..optim.hooks import StepEvent
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict, member_tag, members
from .params_logger import ScalarWriter, group_labels

_FAMILIES = ("grad_norm", "update_norm", "weight_norm", "update_ratio")
_OUTCOMES = [StepEvent.OPTIM_STEP_COMPLETED, StepEvent.OPTIM_STEP_SKIPPED]


def layer_prefixes(model: nn.Module, depth: int) -> list[str]:
    """The module prefixes ``depth`` levels deep that hold parameters, in the model's order.

    A parameter of a module shallower than ``depth`` is under its module's
    name (its own name at the root).

    Examples:
        >>> from torch.nn import Linear, Sequential
        >>> model = Sequential(Linear(1, 1), Sequential(Linear(1, 1)))
        >>> layer_prefixes(model, 1), layer_prefixes(model, 2)
        (['0', '1'], ['0', '1.0'])
    """
    prefixes: dict[str, None] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        module = parts[:-1] or parts
        prefixes[".".join(module[:depth])] = None
    return list(prefixes)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded ``DTensor`` (FSDP2's parameters and gradients); any other tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def _replicas(params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``None`` for plain parameters; else how many ranks hold each element of each parameter.

    A ``DTensor`` is held by the ranks of its mesh's replicated dimensions; a
    plain tensor beside sharded ones (FSDP2's ignored parameters), whole, by
    every rank.

    Raises:
        ValueError: For ``DTensor``s whose mesh does not span every rank (pipeline stages and such).
    """
    meshes = [getattr(param, "device_mesh", None) for param in params]
    if all(mesh is None for mesh in meshes):
        return None
    world = dist.get_world_size()
    counts = []
    for param, mesh in zip(params, meshes, strict=True):
        if mesh is None:
            counts.append(world)
            continue
        if mesh.size() != world:
            raise ValueError(
                f"UpdateTelemetryHandler measures DTensor parameters whose mesh spans every rank (FSDP2, HSDP, "
                f"tensor parallelism); got a mesh of {mesh.size()} of {world} ranks"
            )
        placements = param.placements  # type: ignore[attr-defined]
        counts.append(math.prod(mesh.size(dim) for dim, where in enumerate(placements) if where.is_replicate()))
    return torch.tensor(counts, dtype=torch.float32, device=params[0].device)


def _over_ranks(local: torch.Tensor, replicas: torch.Tensor | None, how: str = "norm") -> torch.Tensor:
    """Per-parameter norms of the local parts (``how='norm'``) or maxima (``'max'``) into the whole tensors'."""
    if replicas is None:
        return local
    if how == "max":
        reduced = local.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return reduced
    squares = local.square()
    dist.all_reduce(squares, op=dist.ReduceOp.SUM)  # each element once per rank that holds it
    return (squares / replicas.to(squares.device, squares.dtype)).sqrt()


class _Member:
    """One member's measurement: fixed layout, and the hooks of the one update being measured."""

    def __init__(
        self,
        name: str | None,
        wrapper: OptimWrapper,
        layers: list[str],
        param_names: dict[int, str],
        every: int,
        results: list[tuple[_Member, torch.Tensor]],
    ):
        self.every = every
        self.results = results  # where each measured update's stacked values wait for the handler's next read
        self.wrapper = wrapper
        self.prefix = member_tag(name)
        groups = wrapper.param_groups
        ordered = [param for group in groups for param in group["params"]]
        # Parameters in runs of one device and dtype, so each snapshot is one flat tensor per run.
        runs: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, param in enumerate(ordered):
            runs.setdefault((param.device, param.dtype), []).append(index)
        order = [index for indices in runs.values() for index in indices]
        position = {index: place for place, index in enumerate(order)}
        self.params: list[torch.Tensor] = [ordered[index] for index in order]
        self.runs: list[tuple[int, int, list[int]]] = []
        start = 0
        for indices in runs.values():
            end = start + len(indices)
            self.runs.append((start, end, [_local(self.params[place]).numel() for place in range(start, end)]))
            start = end
        self.device = self.params[0].device
        self.one_kind = len(runs) == 1
        self.replicas = _replicas(self.params)  # sharded (FSDP2, HSDP): each rank measures its parts
        rows: list[tuple[str, str, list[int]]] = []
        first = 0
        for label, group in zip(group_labels(wrapper), groups, strict=True):
            rows.append(("", label, [position[first + k] for k in range(len(group["params"]))]))
            first += len(group["params"])
        for layer in layers:
            chosen = [position[i] for i, param in enumerate(ordered) if _under(param_names.get(id(param), ""), layer)]
            if chosen:
                rows.append(("layer_", layer, chosen))
        self.rows = [
            (kind, label, torch.tensor(places, dtype=torch.long, device=self.device)) for kind, label, places in rows
        ]
        self.labels = [(kind, label) for kind, label, _ in rows]
        clip = wrapper.clip_grad_kwargs
        self.clip: tuple[str, float] | None = None
        if clip is not None:
            kind = "value" if "clip_value" in clip else "norm"
            self.clip = (kind, float(clip["clip_value" if kind == "value" else "max_norm"]))
        self.clipped = 0
        self.measured = 0
        self.armed: list[RemovableHandle] = []
        self.seen = wrapper.step_count  # at the last check
        self.delta = 1  # steps between the last two checks
        self.grad_norms: torch.Tensor | None = None
        self.grad_max: torch.Tensor | None = None
        self.before: list[torch.Tensor] = []
        self.window = -1  # the wrapper's inner_count at the measured step
        self.measuring = 0  # and its step_count

    def _stack(self, norms: list[torch.Tensor]) -> torch.Tensor:
        if self.one_kind:
            return torch.stack(norms)
        return torch.stack([norm.to(self.device, torch.float32) for norm in norms])

    def arm(self) -> None:
        """Hook the next measured update if it may come before the next check; otherwise hook nothing."""
        count = self.wrapper.step_count
        if self.before and count < self.measuring:  # the measured step raised: forget it
            self.before, self.grad_norms = [], None
            while self.armed:
                self.armed.pop().remove()
        delta, self.seen = count - self.seen, count
        per_check, self.delta = max(1, delta, self.delta), delta  # the most steps of the last two intervals
        if not self.armed and self.every - count % self.every <= per_check:
            self.armed.append(self.wrapper.register_step_hook(self.before_step, [StepEvent.BEFORE_OPTIM_STEP]))

    def before_step(self, wrapper: OptimWrapper, event: StepEvent, loss: torch.Tensor | None) -> None:
        """The gradients are complete and unscaled: their norms, and a snapshot of the parameters."""
        if wrapper.step_count % self.every:  # armed early: checks come less often than steps
            return
        self.armed.pop().remove()
        self.window, self.measuring = wrapper.inner_count, wrapper.step_count
        locals_ = [_local(param) for param in self.params]
        grads = [
            _local(param.grad) if param.grad is not None else local.new_zeros(())
            for param, local in zip(self.params, locals_, strict=True)
        ]
        self.grad_norms = self._stack(tensor_norms(grads))
        if self.clip is not None and self.clip[0] == "value":
            self.grad_max = _over_ranks(self._stack(tensor_norms(grads, float("inf"))).max(), self.replicas, "max")
        with torch.no_grad():
            self.before = [torch.cat([p.reshape(-1) for p in locals_[start:end]]) for start, end, _ in self.runs]
        self.armed.append(wrapper.register_step_hook(self.after_step, _OUTCOMES))

    def after_step(self, wrapper: OptimWrapper, event: StepEvent, loss: torch.Tensor | None) -> None:
        """The update is applied: its norms, stacked in one tensor on the device, wait for the next log."""
        self.armed.pop().remove()
        before, self.before = self.before, []
        grads, self.grad_norms = self.grad_norms, None
        if event is StepEvent.OPTIM_STEP_SKIPPED or grads is None or wrapper.inner_count != self.window:
            return  # skipped, or the measured step raised and this is a later window's
        with torch.no_grad():
            locals_ = [_local(param) for param in self.params]
            weights = self._stack(tensor_norms(locals_))
            changes: list[torch.Tensor] = []
            for (start, end, sizes), old in zip(self.runs, before, strict=True):
                now = torch.cat([p.reshape(-1) for p in locals_[start:end]])
                changes.extend(torch.split(now.sub_(old), sizes))
            updates = self._stack(tensor_norms(changes))
            if self.replicas is not None:  # the parts' norms into whole tensors' norms: one all-reduce of squares
                grads, updates, weights = _over_ranks(torch.stack([grads, updates, weights]), self.replicas).unbind()
            values = [
                torch.linalg.vector_norm(norms[index])
                for _, _, index in self.rows
                for norms in (grads, updates, weights)
            ]
            values.append(torch.linalg.vector_norm(grads))
            if self.clip is not None:
                values.append(self._clip_flag(wrapper).to(self.device, grads.dtype))
            self.results.append((self, torch.stack(values)))

    def _clip_flag(self, wrapper: OptimWrapper) -> torch.Tensor:
        """Whether clipping changed the gradients, decided on the device as torch's clipping does."""
        assert self.clip is not None
        kind, limit = self.clip
        if kind == "value":
            assert self.grad_max is not None
            return self.grad_max > limit
        norm = wrapper.grad_norm
        if norm is None:
            return torch.zeros(())
        return limit / (norm + 1e-6) < 1.0  # clip_grad_norm_ scales by min(1, max_norm / (norm + 1e-6))

    def scalars(self, values: list[float]) -> dict[str, float]:
        """The tags of one measured update, from its stacked values read on the host."""
        scalars: dict[str, float] = {}
        for row, (kind, label) in enumerate(self.labels):
            grad, update, weight = values[3 * row : 3 * row + 3]
            ratio = update / weight if weight else float("nan")
            for family, value in zip(_FAMILIES, (grad, update, weight, ratio), strict=True):
                scalars[f"{self.prefix}{kind}{family}/{label}"] = value
        scalars[f"{self.prefix}grad_norm_total"] = values[3 * len(self.labels)]
        if self.clip is not None:
            self.measured += 1
            self.clipped += values[-1] > 0
            scalars[f"{self.prefix}clipped"] = values[-1]
            scalars[f"{self.prefix}clip_rate"] = self.clipped / self.measured
        scaler = getattr(self.wrapper, "loss_scaler", None)
        if scaler is not None:
            scalars[f"{self.prefix}loss_scale"] = float(scaler.get_scale())
        return scalars


class UpdateTelemetryHandler(BaseHandler):
    """Measure every ``every``-th update: per group and per layer gradient, update and weight norms, clipping.

    An update that is not measured meets no hook of it: each time the
    handler is called (attach it with an Ignite logger at
    ``Events.ITERATION_COMPLETED``, without a filter: ``every`` is the
    filter) it checks each member's ``step_count`` and, when the next
    measured update may come before the next call, registers the hooks
    that measure it, for that update alone. The norms are computed on the
    device in batched kernels and read to the host once per log (one
    ``tolist()``); each measured update is logged at the trainer's iteration
    that applied it (the x-axis of ``OptimParamsHandler`` and of the loss).
    It works with any Ignite logger as ``OptimParamsHandler`` does; use one
    handler per logger. ``read()`` gives the values without a logger.

    Args:
        optim_wrapper: An ``OptimWrapper`` or ``OptimWrapperDict``.
        every: Measure each member's ``every``-th, ``2 * every``-th... update
            (its own ``step_count``, checkpointed with it).
        model: The model, to name parameters for ``layers`` or ``depth``.
        layers: Module prefixes (``'encoder'``, ``'head.0'``) to measure apart too.
        depth: Measure apart every module prefix this deep instead (``layer_prefixes``).
        tag: Common prefix of the tags (``'telemetry'``); ``None`` for none.
        global_step_transform: ``f(engine, event_name) -> int``, replacing the iteration.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> telemetry = UpdateTelemetryHandler(wrapper, every=2, model=model, depth=1)
        >>> for _ in range(2):
        ...     wrapper.update_params(model(torch.ones(4, 2)).square().mean())
        ...     # once per iteration: it also hooks the next measured update
        ...     values = telemetry.read()
        >>> sorted(tag for tag in values if tag.startswith("layer_update_norm"))
        ['layer_update_norm/0', 'layer_update_norm/1']
        >>> values["update_norm/group_0"] > 0, telemetry.read()
        (True, {})
        >>> telemetry.close()
    """

    def __init__(
        self,
        optim_wrapper: OptimWrapper | OptimWrapperDict,
        every: int = 10,
        model: nn.Module | None = None,
        layers: Sequence[str] | None = None,
        depth: int | None = None,
        tag: str | None = "telemetry",
        global_step_transform: Callable[[Engine, Any], int] | None = None,
    ) -> None:
        if not isinstance(optim_wrapper, (OptimWrapper, OptimWrapperDict)):
            raise TypeError(
                f"optim_wrapper must be an OptimWrapper or an OptimWrapperDict, got {checks.describe(optim_wrapper)}"
            )
        self._every = checks.positive_int("every", every)
        if tag is not None and not isinstance(tag, str):
            raise TypeError(f"tag must be a str or None, got {checks.describe(tag)}")
        if global_step_transform is not None and not callable(global_step_transform):
            raise TypeError(f"global_step_transform must be callable, got {checks.describe(global_step_transform)}")
        prefixes = self._layers(model, layers, depth)
        self.param_names = {} if model is None else {id(p): name for name, p in model.named_parameters()}
        self.optim_wrapper = optim_wrapper
        self.tag = tag
        self.global_step_transform = global_step_transform
        self._pending: list[tuple[_Member, torch.Tensor]] = []
        self._members = [
            _Member(name, wrapper, prefixes, self.param_names, self._every, self._pending)
            for name, wrapper in members(optim_wrapper)
        ]
        measured = {label for member in self._members for kind, label in member.labels if kind}
        missing = [prefix for prefix in prefixes if prefix not in measured]
        if missing and model is not None:
            raise ValueError(
                f"layers: {missing!r} name no parameter of the wrapper's optimizers; accepted: module prefixes of "
                f"model.named_parameters() such as {layer_prefixes(model, 1)[:8]!r}"
            )
        self._arm()
        self._writer = ScalarWriter(default_tag="telemetry")

    @property
    def every(self) -> int:
        """Measure each member's ``every``-th update; set it to change the period from the next check on."""
        return self._every

    @every.setter
    def every(self, value: int) -> None:
        self._every = checks.positive_int("every", value)
        for member in self._members:
            member.every = self._every

    @staticmethod
    def _layers(model: nn.Module | None, layers: Sequence[str] | None, depth: int | None) -> list[str]:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {checks.describe(model)}")
        if layers is not None and depth is not None:
            raise ValueError(f"give layers or depth, not both; got layers={layers!r} and depth={depth!r}")
        if layers is None and depth is None:
            return []
        if model is None:
            raise ValueError(
                f"layers={layers!r} and depth={depth!r} need model=, the module whose parameter names they refer to"
            )
        if depth is not None:
            return layer_prefixes(model, checks.positive_int("depth", depth))
        assert layers is not None
        if isinstance(layers, str) or not all(isinstance(layer, str) and layer for layer in layers):
            raise TypeError(f"layers must be a list of module prefixes (non-empty str), got {checks.describe(layers)}")
        return list(dict.fromkeys(layers))

    def read(self) -> dict[str, float]:
        """The values measured since the last read, by tag (without ``tag/``); ``{}`` if none. One host read.

        It also checks whether the next measured update comes before the next
        read, and hooks it if so: without a logger, read once per iteration.
        """
        self._arm()
        if not self._pending:
            return {}
        pending = list(self._pending)
        self._pending.clear()  # the members append to this very list
        device = pending[0][1].device
        values = torch.cat([stacked.to(device) for _, stacked in pending]).tolist()  # the one host read
        scalars: dict[str, float] = {}
        start = 0
        for member, stacked in pending:
            scalars.update(member.scalars(values[start : start + len(stacked)]))
            start += len(stacked)
        return scalars

    def _arm(self) -> None:
        for member in self._members:
            member.arm()

    def close(self) -> None:
        """Remove the hooks waiting for a measured update; a later ``read()`` or log hooks the next one again."""
        for member in self._members:
            while member.armed:
                member.armed.pop().remove()

    def __call__(self, engine: Engine, logger: Any, event_name: str | Events) -> None:
        if not self._pending:  # the cost of an iteration without a measured update: this check, and _arm
            self._arm()
            return
        if not isinstance(logger, BaseLogger):
            raise TypeError(f"UpdateTelemetryHandler works with an Ignite logger, got {checks.describe(logger)}")
        scalars = self.read()
        step = engine.state.iteration
        if self.global_step_transform is not None:
            step = self.global_step_transform(engine, event_name)
        self._writer.write(engine, logger, event_name, self.tag, step, scalars)
