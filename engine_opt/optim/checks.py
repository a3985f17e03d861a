"""Argument checks, for every layer: the one home of "an int that is not a bool" and its kin.

Every check raises ``TypeError`` or ``ValueError`` with a message that names the
argument, shows the value received and says what is accepted. The checks of a
saved state (``saved_int``) raise ``ValueError`` whatever is wrong: the value
was read from a file, not typed by the caller.

Examples:
    >>> positive_int("accumulative_counts", 2)
    2
    >>> positive_int("accumulative_counts", 0)
    Traceback (most recent call last):
    ...
    ValueError: accumulative_counts must be a positive int, got 0
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeGuard


def describe(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, followed by its type.

    Examples:
        >>> describe("sgd")
        "'sgd' of type str"
    """
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{text} of type {type(value).__name__}"


def is_int(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` and not a ``bool`` (``True`` is an int to Python, never a count here).

    Examples:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> TypeGuard[int | float]:
    """Whether ``value`` is an ``int`` or a ``float`` and not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an ``int`` of at least 1 (``bool`` is refused).

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value`` is below 1.
    """
    if not is_int(value):
        raise TypeError(f"{name} must be a positive int, got {describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def int_at_least(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` of at least ``minimum`` (``bool`` is refused).

    Examples:
        >>> int_at_least("warmup", -1, 0)
        Traceback (most recent call last):
        ...
        ValueError: warmup must be an int >= 0, got -1
    """
    if not is_int(value):
        raise TypeError(f"{name} must be an int >= {minimum}, got {describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def saved_int(name: str, value: Any, minimum: int) -> int:
    """``int_at_least`` for a value read from a saved state: a ``ValueError`` whatever is wrong.

    Examples:
        >>> saved_int("state_dict['position']", "3", 0)
        Traceback (most recent call last):
        ...
        ValueError: state_dict['position'] must be an int >= 0, got '3'
    """
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def real(name: str, value: Any) -> float:
    """Return ``value`` if it is a finite real number (``bool`` refused).

    Examples:
        >>> real("gamma", float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: gamma must be a finite number, got nan
    """
    if not is_real(value):
        raise TypeError(f"{name} must be a number, got {describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def number(name: str, value: Any, accepted: str = "a number") -> float:
    """Return ``value`` if it is a real number (``bool`` refused); else a ``TypeError``: ``name`` must be ``accepted``.

    The range is the caller's to check, in its own words.
    """
    if not is_real(value):
        raise TypeError(f"{name} must be {accepted}, got {describe(value)}")
    return value


def number_in(name: str, value: Any, accepted: str, within: Callable[[float], bool]) -> float:
    """Return ``value`` as a float if it is a finite real number for which ``within`` holds.

    Examples:
        >>> number_in("decay", 1.0, "a number in [0, 1)", lambda value: 0 <= value < 1)
        Traceback (most recent call last):
        ...
        ValueError: decay must be a number in [0, 1), got 1.0
    """
    if not (math.isfinite(number(name, value, accepted)) and within(value)):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return float(value)


def flag(name: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (``1`` and ``'yes'`` are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")
    return value


def mapping(name: str, value: Any) -> Mapping[str, Any]:
    """Return ``value`` if it is a mapping, else raise ``TypeError`` naming ``name``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict, got {describe(value)}")
    return value


def path(name: str, value: Any) -> Path:
    """Return ``value`` as a ``Path`` if it is a str or a path, else raise ``TypeError`` naming ``name``.

    Examples:
        >>> path("dirname", 3)
        Traceback (most recent call last):
        ...
        TypeError: dirname must be a str or a path, got 3 of type int
    """
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or a path, got {describe(value)}")
    return Path(value)


def stateful(name: str, value: Any) -> Any:
    """Return ``value`` if it has ``state_dict`` and ``load_state_dict`` methods, else raise ``TypeError``."""
    if not (callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))):
        raise TypeError(f"{name} must have state_dict and load_state_dict methods, got {describe(value)}")
    return value


def known_keys(name: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """Raise ``ValueError`` if ``given`` holds a key outside ``accepted``.

    Examples:
        >>> known_keys(  # doctest: +NORMALIZE_WHITESPACE
        ...     "clip_grad", ["max_norm", "maxnorm"], ["max_norm", "norm_type"])
        Traceback (most recent call last):
        ...
        ValueError: clip_grad got unknown key(s) ['maxnorm'];
        accepted: ['max_norm', 'norm_type']
    """
    accepted = list(accepted)
    unknown = [key for key in given if key not in accepted]
    if unknown:
        raise ValueError(f"{name} got unknown key(s) {unknown}; accepted: {sorted(accepted)}")
