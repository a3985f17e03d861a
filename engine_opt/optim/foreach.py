"""``tensor_norms``: the one place the project touches torch's private ``torch._foreach_norm``, fenced with a fallback.

``torch._foreach_norm(tensors, ord)`` computes the norm of each tensor of a
list in batched kernels (on CUDA, a few launches for the whole list instead of
one per tensor). It is private: where it is missing, or refuses the input,
``tensor_norms`` falls back to the public ``torch.linalg.vector_norm`` per
tensor, which gives the same values (``tests/handlers/test_update_telemetry.py``
fails when torch changes the name, its signature, or what it computes).

Examples:
    >>> import torch
    >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([[-2.0]])])
    [tensor(5.), tensor(2.)]
    >>> tensor_norms([torch.tensor([3.0, -4.0])], float("inf"))
    [tensor(4.)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tensor_norms(tensors: Sequence[torch.Tensor], ord: float = 2.0) -> list[torch.Tensor]:
    """The ``ord``-norm of each tensor (flattened), as 0-d tensors on each one's device; nothing read on the host.

    Args:
        tensors: The tensors (any shapes, devices and floating dtypes).
        ord: The norm's order, as ``torch.linalg.vector_norm`` takes it (``2.0``, ``float('inf')``...).
    """
    if not tensors:
        return []
    foreach_norm = getattr(torch, "_foreach_norm", None)
    if foreach_norm is not None:
        try:
            return list(foreach_norm(list(tensors), ord))
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # a combination the private kernel refuses: the public path below handles every one
    return fallback_norms(tensors, ord)


def fallback_norms(tensors: Sequence[torch.Tensor], ord: float = 2.0) -> list[torch.Tensor]:
    """``tensor_norms`` through the public ``torch.linalg.vector_norm``, one call per tensor.

    Examples:
        >>> import torch
        >>> fallback_norms([torch.tensor([3.0, 4.0])])
        [tensor(5.)]
    """
    return [torch.linalg.vector_norm(tensor, ord) for tensor in tensors]
