"""The ``implementation`` key of a wrapper config: torch's for-loop, foreach or fused update, chosen or picked.

torch's built-in optimizers run one update three ways: a Python loop over the
parameters (``foreach=False``, torch's default on the CPU), batched kernels
over lists of tensors (``foreach=True``, its default on CUDA) and one fused
kernel per device and dtype (``fused=True``, never its default). A config
without ``implementation`` passes neither argument, so it keeps torch's
default exactly (an MMEngine config stays bitwise MMEngine's; ``None`` is the
same as leaving it out). With
``'for-loop'``, ``'foreach'`` or ``'fused'`` the optimizer gets the matching
argument, refused where the optimizer, its parameters' devices or dtypes
cannot run it. ``'auto'`` picks from ``FASTEST``, the fastest implementation
``benchmarks/bandwidth.py`` measured for the optimizer type, device and
dtype, and torch's default (``'default'``) for any combination it does not list.

How the results relate (``docs/semantics.md``): ``'foreach'`` gives the
for-loop's parameters bitwise in float32; ``'fused'`` evaluates the same
formulas in another order inside one kernel, within a few float32 units in the
last place per step, and in bfloat16 it rounds once per step instead of after
each operation (more accurate, and different by bfloat16 units).

Examples:
    >>> import torch
    >>> params = [torch.nn.Parameter(torch.zeros(2))]
    >>> choice, kwargs = choose("auto", torch.optim.AdamW, params, {}, "optimizer")
    >>> str(choice), kwargs
    ("'fused' (auto)", {'fused': True})
    >>> choose("fused", torch.optim.LBFGS, params, {}, "optimizer")
    Traceback (most recent call last):
    ...
    ValueError: implementation='fused': optimizer LBFGS takes no 'fused' ...
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

KEY = "implementation"
"""The wrapper config's key."""

IMPLEMENTATIONS = ("auto", "for-loop", "foreach", "fused")
"""The values ``implementation`` accepts."""

DEFAULT = "default"
"""What ``'auto'`` picks where ``FASTEST`` lists nothing: torch's own choice (neither argument passed)."""

# What each explicit choice sets: (foreach, fused). The argument torch needs is passed; the other is only checked.
_SETTINGS: dict[str, tuple[bool, bool]] = {"for-loop": (False, False), "foreach": (True, False), "fused": (False, True)}

FASTEST: dict[tuple[str, str, torch.dtype], str] = {
    (name, "cpu", dtype): "fused" for name in ("SGD", "Adam", "AdamW") for dtype in (torch.float32, torch.bfloat16)
}
"""``'auto'``'s table: (optimizer class name, device type, parameter dtype) to the fastest implementation.

From ``benchmarks/bandwidth.py`` (``docs/benchmarks.md``): on the CPU the fused
update of Adam and AdamW ran 2-6 times faster than the for-loop and the foreach
one at 20M-100M parameters, float32 and bfloat16 (float16 mixed precision keeps
float32 parameters); SGD with momentum's for-loop is a few whole-tensor kernels
already, and fused was as fast or faster by median in most rows and at 100M,
slower by minimum in some 1M-20M rows, within this busy machine's noise. Only measured combinations
are listed; the class must be torch's own (a subclass may change its step).
"""

# torch 2.13's list, where its private one is missing
_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu", "mtia", "privateuseone")


@dataclass(frozen=True)
class Implementation:
    """What a config's ``implementation`` asked for, and what the optimizer runs.

    Attributes:
        requested: The config's value, one of ``IMPLEMENTATIONS``.
        chosen: ``'for-loop'``, ``'foreach'``, ``'fused'``, or ``'default'`` (``'auto'`` left torch's
            own choice); for a routed optimizer, each route's as ``'route: chosen'``, joined by ``', '``.

    Examples:
        >>> str(Implementation("auto", "fused"))
        "'fused' (auto)"
        >>> str(Implementation("foreach", "foreach"))
        "'foreach'"
    """

    requested: str
    chosen: str

    def __str__(self) -> str:
        return f"{self.chosen!r} (auto)" if self.requested == "auto" else repr(self.chosen)


def check(value: Any) -> str:
    """``value`` if it is one of ``IMPLEMENTATIONS``; a ``TypeError`` or ``ValueError`` naming the key otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"optim wrapper config {KEY!r} must be a str, one of {list(IMPLEMENTATIONS)}, got {value!r}")
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"optim wrapper config {KEY!r} must be one of {list(IMPLEMENTATIONS)}, got {value!r}")
    return value


def _arguments(optimizer_cls: type) -> set[str]:
    try:
        return set(inspect.signature(optimizer_cls).parameters)
    except (TypeError, ValueError):  # a signature Python cannot read: no argument is known
        return set()


def fused_devices() -> list[str]:
    """The device types with fused optimizer kernels, from torch (a private helper, with a fallback).

    Examples:
        >>> "cpu" in fused_devices()
        True
    """
    try:
        from torch.utils import _foreach_utils
    except ImportError:
        return list(_FUSED_DEVICES)
    read = getattr(_foreach_utils, "_get_fused_kernels_supported_devices", None)
    try:
        return list(read()) if read is not None else list(_FUSED_DEVICES)
    except (RuntimeError, TypeError):
        return list(_FUSED_DEVICES)


def step_flags(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's ``foreach`` and ``fused``: torch's ``load_state_dict`` replaces them with the saved ones."""
    return [{key: group[key] for key in ("foreach", "fused") if key in group} for group in optimizer.param_groups]


def put_back_step_flags(optimizer: torch.optim.Optimizer, flags: list[dict[str, Any]]) -> None:
    """Set each param group's ``foreach`` and ``fused`` as ``step_flags`` read them."""
    for group, kept in zip(optimizer.param_groups, flags, strict=True):
        group.update(kept)


def _auto(optimizer_cls: type, params: Iterable[torch.Tensor], cfg: Mapping[str, Any], sparse: bool) -> str:
    """``FASTEST``'s entry for every parameter's (device type, dtype) if they agree, else ``'default'``."""
    if sparse or cfg.get("differentiable") or not {"foreach", "fused"} <= _arguments(optimizer_cls):
        return DEFAULT
    kinds = {(param.device.type, param.dtype) for param in params}
    if optimizer_cls is not getattr(torch.optim, optimizer_cls.__name__, None):
        return DEFAULT
    picks = {FASTEST.get((optimizer_cls.__name__, device, dtype), DEFAULT) for device, dtype in kinds}
    return picks.pop() if len(picks) == 1 else DEFAULT


def _argument(chosen: str) -> str:
    """The optimizer argument that selects ``chosen``."""
    return "fused" if chosen == "fused" else "foreach"


def _check_runs(
    chosen: str, optimizer_cls: type, params: list[torch.Tensor], cfg: Mapping[str, Any], where: str, sparse: bool
) -> None:
    """Refuse what ``optimizer_cls`` cannot run as ``chosen`` (named as the config's key, value and what works)."""
    name = optimizer_cls.__name__
    accepted = _arguments(optimizer_cls)
    works = [value for value in _SETTINGS if _argument(value) in accepted]
    head = f"{KEY}={chosen!r}: {where} {name}"
    if _argument(chosen) not in accepted:
        can = f"it can run {works}" if works else "it has no foreach or fused update; leave the key out"
        raise ValueError(f"{head} takes no {_argument(chosen)!r} argument; {can} ('auto' leaves it as torch builds it)")
    if chosen == "fused":
        if cfg.get("differentiable"):
            raise ValueError(f"{head}: fused=True cannot be differentiable=True; choose 'foreach' or 'for-loop'")
        if sparse:
            raise ValueError(
                f"{head}: the model has a module with sparse gradients (sparse=True), which no fused kernel takes; "
                "choose 'foreach' or 'for-loop'"
            )
        devices = fused_devices()
        for param in params:
            if param.device.type not in devices or not torch.is_floating_point(param):
                raise ValueError(
                    f"{head}: a parameter of dtype {param.dtype} on {param.device.type} has no fused kernel "
                    f"(floating-point parameters on {devices} have); choose 'foreach' or 'for-loop'"
                )


def choose(
    requested: Any,
    optimizer_cls: type,
    params: list[torch.Tensor],
    cfg: Mapping[str, Any],
    where: str,
    sparse: bool = False,
) -> tuple[Implementation, dict[str, bool]]:
    """The implementation ``requested`` gives ``optimizer_cls`` over ``params``, and the arguments that make it.

    Args:
        requested: The config's ``implementation`` value.
        optimizer_cls: The optimizer class the config builds.
        params: Its parameter tensors; those without ``requires_grad`` (frozen: never stepped) are not looked at.
        cfg: The optimizer config, ``type`` left out (not modified): a ``foreach`` or ``fused`` in it must
            agree with the choice, and ``'auto'`` takes neither.
        where: How the messages name the optimizer config (``'optimizer'``, ``"routes['muon'] optimizer"``).
        sparse: Whether the model makes sparse gradients (an ``Embedding`` with ``sparse=True``): no fused
            kernel takes them, so ``'auto'`` leaves torch's default and ``'fused'`` is refused.

    Returns:
        What was chosen, and the keyword arguments to add to the optimizer's (empty for ``'default'``).

    Raises:
        ValueError: An unknown value; an optimizer, device or dtype that cannot run the choice; a
            ``foreach``/``fused`` in ``cfg`` that contradicts it.
    """
    requested = check(requested)
    params = [param for param in params if param.requires_grad]
    given = {key: cfg[key] for key in ("foreach", "fused") if cfg.get(key) is not None}
    if requested == "auto":
        if given:
            raise ValueError(
                f"{KEY}='auto' picks foreach/fused itself, but the {where} config sets {given}: drop them, "
                f"or choose one of {list(_SETTINGS)} instead of 'auto'"
            )
        chosen = _auto(optimizer_cls, params, cfg, sparse)
    else:
        chosen = requested
        settings = dict(zip(("foreach", "fused"), _SETTINGS[chosen], strict=True))
        for key, value in given.items():
            if value != settings[key]:
                raise ValueError(
                    f"{KEY}={chosen!r} means {key}={settings[key]}, but the {where} config sets {key}={value!r}: "
                    f"drop {key} from it, or choose the implementation it means"
                )
        _check_runs(chosen, optimizer_cls, params, cfg, where, sparse)
    if chosen == DEFAULT:
        return Implementation(requested, chosen), {}
    return Implementation(requested, chosen), (
        {"fused": True} if chosen == "fused" else {"foreach": chosen == "foreach"}
    )


def combined(requested: str, chosen: Mapping[str, Implementation]) -> Implementation:
    """One ``Implementation`` for a routed optimizer, from each route's.

    Examples:
        >>> routes = {
        ...     "muon": Implementation("auto", "default"),
        ...     "default": Implementation("auto", "fused"),
        ... }
        >>> str(combined("auto", routes))
        "'muon: default, default: fused' (auto)"
    """
    return Implementation(requested, ", ".join(f"{name}: {one.chosen}" for name, one in chosen.items()))
