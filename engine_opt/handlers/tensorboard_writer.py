"""``write_scalars``, ``write_hparams``: the one place that builds TensorBoard records.

``SummaryWriter.add_scalar`` writes one event per scalar, and TensorBoard's
writer thread computes a pure-Python CRC per event while holding the GIL;
one event holding every scalar of a log costs one hand-off. The event is a
``Summary`` protobuf of TensorBoard's (``tensorboard.compat.proto``), handed
to the open ``SummaryWriter``'s ``file_writer.add_summary``; when either
is missing, or the writer is closed, it falls back to ``add_scalar`` per
tag.

``write_hparams`` writes a run's settings for TensorBoard's HPARAMS tab into
the run's own event file: torch's ``add_hparams`` opens a second writer in a
sub-directory, which TensorBoard lists as a run of its own, apart from the
curves the metrics name.

Examples:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> with tempfile.TemporaryDirectory() as log_dir:
    ...     writer = SummaryWriter(log_dir)
    ...     write_scalars(writer, {"lr": 0.1, "momentum": 0.9}, step=1)
    ...     write_hparams(writer, {"lr": 0.1, "optimizer": "SGD"}, ["train/loss"])
    ...     writer.close()
"""

from __future__ import annotations

from typing import Any


def write_scalars(writer: Any, scalars: dict[str, float], step: int) -> None:
    """Write ``scalars`` at ``step`` through ``writer`` (a ``SummaryWriter``), as one event where it can."""
    summary = _summary(scalars)
    file_writer = getattr(writer, "file_writer", None)  # set while the writer is open, None once closed
    if summary is None or file_writer is None:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        return
    file_writer.add_summary(summary, step)


def _summary(scalars: dict[str, float]) -> Any:
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary
    except ImportError:  # tensorboard's layout changed: one event per scalar instead
        return None
    return Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()])


def write_hparams(
    writer: Any, hparams: dict[str, float | str | bool], metrics: list[str], *, ended: bool = False
) -> None:
    """Write ``hparams`` (the run's settings) and the tags of its ``metrics`` curves for TensorBoard's HPARAMS tab.

    Call it at the run's start, and with ``ended=True`` once it has ended well: that writes only the
    record of a successful end (its status in the tab; a run that crashes has none). Nothing is written
    through a closed writer, or one without a ``file_writer``.
    """
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    file_writer = getattr(writer, "file_writer", None)
    if file_writer is None:
        return
    # the metrics' values are the curves of those tags the run logs: their placeholder values are not written
    experiment, session_start, session_end = hparams_summaries(  # type: ignore[no-untyped-call]
        dict(hparams), dict.fromkeys(metrics, 0.0)
    )
    for summary in (session_end,) if ended else (experiment, session_start):
        file_writer.add_summary(summary)
