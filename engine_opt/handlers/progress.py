"""``attach_progress_bar``: Ignite's ``ProgressBar`` showing the loss, learning rate and loss scale."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

from ..optim import checks
from ..optim.wrapper import OptimWrapper
from ..optim.wrapper_dict import OptimWrapperDict, member_prefix, members


def _loss_values(output: Any) -> dict[str, float]:
    """The engine output's numbers: a scalar loss, or a dict's scalar values by key."""
    if isinstance(output, Mapping):
        return {str(key): number for key, value in output.items() if (number := _number(value)) is not None}
    number = _number(output)
    return {} if number is None else {"loss": number}


def _number(value: Any) -> float | None:
    """``value`` as a float when it is one real number (a one-element tensor, a Python or NumPy scalar), else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return value.item()
    if isinstance(value, Real) and not isinstance(value, bool):
        return float(value)
    return None


def progress_values(
    optim_wrapper: OptimWrapper | OptimWrapperDict, show_lr: bool = True
) -> Callable[[Any], dict[str, float]]:
    """An ``output_transform`` for ``ProgressBar``: loss(es), first-group lr (unless ``show_lr=False``), loss scale.

    Examples:
        >>> model = torch.nn.Linear(1, 1)
        >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.5))
        >>> show = progress_values(wrapper)
        >>> show(torch.tensor(0.25))
        {'loss': 0.25, 'lr': 0.5}
    """
    shown = members(optim_wrapper)

    def transform(output: Any) -> dict[str, float]:
        values = _loss_values(output)
        for name, wrapper in shown:
            prefix = member_prefix(name)
            if show_lr:  # the output's own values keep their names
                values.setdefault(f"{prefix}lr", wrapper.param_groups[0]["lr"])
            if wrapper.loss_scaler is not None:
                values.setdefault(f"{prefix}scale", wrapper.loss_scaler.get_scale())
        return values

    return transform


def compact(value: float, power_of_two: bool = False) -> str:
    """``value`` as the bar shows it: 3 significant digits; with ``power_of_two``, a power of two >= 1024 as ``2^k``.

    Examples:
        >>> compact(65536.0, power_of_two=True)
        '2^16'
        >>> compact(65536.0), compact(0.001), compact(1.23456), compact(3e-05)
        ('6.55e+04', '0.001', '1.23', '3e-05')
    """
    mantissa, exponent = math.frexp(value)
    if power_of_two and mantissa == 0.5 and exponent - 1 >= 10:
        return f"2^{exponent - 1}"
    return f"{value:.3g}"


def attach_progress_bar(
    trainer: Engine,
    optim_wrapper: OptimWrapper | OptimWrapperDict,
    every: int = 1,
    show_lr: bool = True,
    **tqdm_kwargs: Any,
) -> ProgressBar:
    """Attach a ``ProgressBar`` that shows the loss, learning rate and loss scale, compactly.

    Showing values reads them on the host; ``every`` refreshes the bar every
    ``every`` iterations to keep that rare. Numbers are shown with 3
    significant digits, loss scales as powers of two, so the bar of a GAN's
    two float16 members (two losses, two scales) fits 120 columns; each
    learning rate shown adds about 17 (``show_lr=False`` leaves them out).

    Args:
        trainer: The trainer.
        optim_wrapper: The wrapper (or dict) whose lr and loss scale to show.
        every: Refresh period in iterations.
        show_lr: Show each member's first-group learning rate (leave it out when it is constant).
        **tqdm_kwargs: Passed to ``ProgressBar`` (``persist``, ``bar_format``...).

    Returns:
        The attached ``ProgressBar``.
    """
    checks.positive_int("every", every)
    values = progress_values(optim_wrapper, show_lr)
    bar = ProgressBar(**tqdm_kwargs)
    event = Events.ITERATION_COMPLETED(every=every)
    bar.attach(trainer, output_transform=lambda output: _shown(values(output)), event_name=event)
    return bar


def _shown(values: dict[str, float]) -> dict[str, str]:
    """Each value compact; loss scales (``scale``, ``gen.scale``...) as powers of two."""
    return {key: compact(value, power_of_two=key.split(".")[-1] == "scale") for key, value in values.items()}
