"""Names that moved to another package, still found at their old import path, with a warning naming their home.

Each public name has one home. A package that used to export a name that
has moved keeps finding it (``from engine_opt.handlers import
attach_checkpoint`` goes on working): its module ``__getattr__`` calls
``find_moved``, which warns (``DeprecationWarning``, at the line that
imported it) and returns the name from its home.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     find_moved("old_home", "sqrt", {"sqrt": "math"})(16.0), str(caught[0].message)
    (4.0, 'old_home.sqrt moved to math.sqrt: import it from there')
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from typing import Any


def find_moved(package: str, name: str, homes: Mapping[str, str]) -> Any:
    """``name`` from its home module in ``homes``, for ``package``'s module ``__getattr__``.

    Args:
        package: The old home's module name, for the messages.
        name: The attribute asked for.
        homes: Each moved name's home module, e.g. ``{"attach_checkpoint": "engine_opt.checkpoint"}``.

    Raises:
        AttributeError: ``name`` is not one of ``homes``.
    """
    home = homes.get(name)
    if home is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    # stacklevel 3: past this function and the module's __getattr__, at the caller's import
    warnings.warn(f"{package}.{name} moved to {home}.{name}: import it from there", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(home), name)
