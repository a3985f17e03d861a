"""A Python config's validation: its metrics on held-out data every N epochs and at the end, logged as ``val/NAME``.

Every rank evaluates the whole validation set (Ignite's metrics then agree
across ranks). The loader has its own random generator, so evaluating draws
nothing from torch's global one: the training run's dropout and noise, and a
resumed run's, are the same whether or when it evaluates.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from ignite.engine import Engine, Events, create_supervised_evaluator
from ignite.metrics import Metric
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..engine.process import prepare_batch


class Validation:
    """Evaluate ``model`` on ``dataset`` after every ``every``-th epoch and after the last one.

    Args:
        model: The model being trained (not its DDP wrapper).
        dataset: The validation data, ``(x, y)`` items.
        batch_size: Its batch size.
        metrics: Ignite metrics by name.
        device: Where the model is.
        every: Evaluate after every ``every``-th epoch (and after the run's last).
        num_workers: The validation loader's worker processes.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset[Any],
        batch_size: int,
        metrics: dict[str, Metric],
        device: torch.device,
        every: int,
        num_workers: int = 0,
    ) -> None:
        self.model, self.every = model, every
        self.loader: DataLoader[Any] = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator()
        )
        self.evaluator = create_supervised_evaluator(model, metrics=metrics, device=device, prepare_batch=prepare_batch)
        self.last: dict[str, float] = {}
        """The latest values of the metrics that are numbers, by name."""

    def attach(self, trainer: Engine, log: Any = None) -> None:
        """Evaluate at ``trainer``'s cadence; ``log(tag, value, iteration)`` (TensorBoard's ``add_scalar``) each."""
        every = self.every
        trainer.add_event_handler(
            Events.EPOCH_COMPLETED(every=every) | Events.COMPLETED(_last_off_cadence(every)), self._evaluate, log
        )

    def _evaluate(self, trainer: Engine, log: Any) -> None:
        training = self.model.training
        try:
            metrics = self.evaluator.run(self.loader).metrics
        finally:
            self.model.train(training)
        self.last = {name: float(value) for name, value in metrics.items() if _is_number(value)}
        if log is not None:
            for name, value in self.last.items():
                log(f"val/{name}", value, trainer.state.iteration)


def _last_off_cadence(every: int) -> Any:
    """At the run's end, if its last epoch was not on the cadence; not when a signal stopped it early."""

    def last(engine: Engine, _: Any) -> bool:
        return engine.state.epoch == engine.state.max_epochs and engine.state.epoch % every != 0

    return last


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1)
