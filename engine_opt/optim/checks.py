"""Argument checks shared by the wrappers and the builder.

Every check raises ``TypeError`` or ``ValueError`` with a message that names the
argument, shows the value received and says what is accepted.

Example:
    >>> positive_int("accumulative_counts", 2)
    2
    >>> positive_int("accumulative_counts", 0)
    Traceback (most recent call last):
    ...
    ValueError: accumulative_counts must be a positive int, got 0
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def describe(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, followed by its type.

    Example:
        >>> describe("sgd")
        "'sgd' of type str"
    """
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{text} of type {type(value).__name__}"


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an ``int`` of at least 1 (``bool`` is refused).

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value`` is below 1.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def mapping(name: str, value: Any) -> Mapping[str, Any]:
    """Return ``value`` if it is a mapping, else raise ``TypeError`` naming ``name``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict, got {describe(value)}")
    return value


def path(name: str, value: Any) -> Path:
    """Return ``value`` as a ``Path`` if it is a str or a path, else raise ``TypeError`` naming ``name``.

    Example:
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

    Example:
        >>> known_keys("clip_grad", ["max_norm", "maxnorm"], ["max_norm", "norm_type"])
        Traceback (most recent call last):
        ...
        ValueError: clip_grad got unknown key(s) ['maxnorm']; accepted: ['max_norm', 'norm_type']
    """
    accepted = list(accepted)
    unknown = [key for key in given if key not in accepted]
    if unknown:
        raise ValueError(f"{name} got unknown key(s) {unknown}; accepted: {sorted(accepted)}")
