"""Names and modules that moved, still found at their old import path, with a warning naming their home.

Each public name has one home. A package that used to export a name that
has moved keeps finding it (``from engine_opt.handlers import
attach_checkpoint`` goes on working), and a module that moved keeps its old
path as a module of one function: their module ``__getattr__`` calls
``find_moved``, which warns (``DeprecationWarning``, at the line that asked
for the name) and returns the name from its home.

Examples:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     sqrt = find_moved("old_home", "sqrt", {"sqrt": "math"})
    ...     sqrt(16.0), str(caught[0].message)
    (4.0, 'old_home.sqrt moved to math.sqrt: import it from there')
    >>> find_moved("old_home", "sqroot", "math")
    Traceback (most recent call last):
    ...
    AttributeError: module 'old_home' has no attribute 'sqroot'
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from typing import Any


def find_moved(old: str, name: str, homes: Mapping[str, str] | str) -> Any:
    """``name`` from its home, for the module ``__getattr__`` of ``old``, its former home.

    Args:
        old: The former home's module name, for the messages.
        name: The attribute asked for.
        homes: Each moved name's home module (``{"attach_checkpoint": "engine_opt.checkpoint"}``), or the one
            module every name of ``old`` moved to.

    Raises:
        AttributeError: ``name`` did not move there (a typo, or a private name).
    """
    home = homes if isinstance(homes, str) else homes.get(name)
    module = None if home is None or name.startswith("_") else importlib.import_module(home)
    if module is None or not hasattr(module, name):
        raise AttributeError(f"module {old!r} has no attribute {name!r}")
    # stacklevel 3: past this function and the module's __getattr__, at the line that asked
    warnings.warn(f"{old}.{name} moved to {home}.{name}: import it from there", DeprecationWarning, stacklevel=3)
    return getattr(module, name)
