"""An Ignite logger, with its OutputHandler in its module as Ignite's own loggers have, that records what it gets."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine
from ignite.handlers.base_logger import BaseLogger, BaseOutputHandler


class RecordingLogger(BaseLogger):
    """Keeps ``(step, values)`` of every log, and every ``OutputHandler`` made for it."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []
        self.output_handlers: list[OutputHandler] = []

    def _create_output_handler(self, *args: Any, **kwargs: Any) -> OutputHandler:
        return OutputHandler(*args, **kwargs)

    def _create_opt_params_handler(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class OutputHandler(BaseOutputHandler):
    """Hands the output's values and the step to the logger; counts itself, as Visdom's keeps windows."""

    def __init__(self, tag: str, output_transform: Any = None, global_step_transform: Any = None) -> None:
        super().__init__(tag, None, output_transform, global_step_transform)
        self.registered_with: list[RecordingLogger] = []

    def __call__(self, engine: Engine, logger: Any, event_name: Any) -> None:
        if logger not in self.registered_with:
            self.registered_with.append(logger)
            logger.output_handlers.append(self)
        step = self.global_step_transform(engine, event_name)
        logger.records.append((step, dict(self._setup_output_metrics_state_attrs(engine, key_tuple=False))))
