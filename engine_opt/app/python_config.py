"""A Python run config (``engine-opt train --config my_run.py``): the user's model, data and loss, read and checked.

The file is run as a Python script (after seeding torch, ``random`` and numpy
with ``--seed``, so weights and data made in it are the same on every rank and
every run; its folder on ``sys.path``, so it imports the modules beside it), and these
top-level names are read, in MMEngine's style; ``type`` is a callable or a
dotted import path, the other keys its keyword arguments:

- ``model``: an ``nn.Module``, or ``dict(type=..., **kwargs)`` that builds one.
- ``train_dataloader``: ``dict(dataset=..., batch_size=64, num_workers=0)``;
  ``dataset`` a ``Dataset`` or ``dict(type=..., **kwargs)``; ``batch_size``
  is one iteration's batch over all processes, as ``--batch-size`` (which
  overrides it). MMEngine's ``sampler=dict(type='DefaultSampler',
  shuffle=True)`` is what the command does anyway, and accepted.
- ``val_dataloader`` (optional): likewise; evaluated after every
  ``train_cfg['val_interval']`` epochs (default 1) and at the end.
- ``loss_fn`` (optional): ``loss_fn(y_pred, y)``, a callable, a dotted path
  or ``dict(type='torch.nn.CrossEntropyLoss', ...)``; default
  ``torch.nn.functional.cross_entropy``. Without one, a model that defines
  MMEngine's ``train_step(data, optim_wrapper)`` trains itself.
- ``optim_wrapper`` (optional): a ``build_optim_wrapper`` config; without
  one, the wrapper options (``--dtype``, ``--lr``, ...) describe it.
- ``param_scheduler`` (optional): MMEngine's config (``build_param_scheduler``).
- ``train_cfg`` (optional): ``dict(max_epochs=N, val_interval=1)``;
  ``--epochs`` overrides ``max_epochs``.
- ``val_metrics`` (optional): ``{name: ignite.metrics.Metric}``; default
  ``accuracy`` and ``loss``.
- ``handlers`` (optional): a list of ``(event, handler)`` pairs
  (``(Events.ITERATION_COMPLETED, TerminateOnNan())``), objects with
  ``attach(trainer)``, or callables ``attach(trainer)`` called once, all
  attached after the command's own.

The rest of an MMEngine runner config (``default_hooks``, ``work_dir``,
``_base_``, ...) is refused by name with the option that does its job, and
so is a dict or list whose name is a letter away from one the command reads
(``optim_wraper``); other names (helpers, constants, imports) are the file's
own business. Each dataset's first item is checked at set-up: the
supervised step splits batches into ``(x, y)``.

Examples:
    >>> import tempfile, textwrap
    >>> from pathlib import Path
    >>> run_config = textwrap.dedent('''
    ...     import torch
    ...     from torch.utils.data import TensorDataset
    ...     model = torch.nn.Linear(4, 2)
    ...     data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    ...     train_dataloader = dict(batch_size=8, dataset=data)
    ...     train_cfg = dict(max_epochs=3)
    ... ''')
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     path = Path(directory, "tiny.py")
    ...     _ = path.write_text(run_config)
    ...     config = load_python_config(path, seed=0)
    >>> config.name, config.batch_size, config.max_epochs
    ('tiny', 8, 3)
"""

from __future__ import annotations

import contextlib
import runpy
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.metrics import Accuracy, Loss, Metric
from torch import nn
from torch.utils.data import Dataset, IterableDataset, default_collate

from ..engine.process import prepare_batch
from ..optim import checks
from ..optim.build import import_path
from .config import UsageError
from .tasks import Task, cross_entropy_sum, make_loader, seed_all

_REFUSED = {
    "_base_": "inheritance between config files is not supported: write one file (Python imports work)",
    "default_hooks": "the command logs, checkpoints and shows progress itself: see --log-every, --checkpoint-every",
    "custom_hooks": "give Ignite handlers in `handlers` (objects with attach(trainer), or callables)",
    "work_dir": "use --log-dir and --checkpoint-dir",
    "load_from": "use --resume, with the run's own checkpoint directory",
    "resume": "use --resume",
    "launcher": "use --nproc-per-node, or start the command with torchrun",
    "env_cfg": "use --backend and --threads",
    "randomness": "use --seed",
    "val_evaluator": "give Ignite metrics in `val_metrics` ({name: metric})",
    "val_cfg": "validation runs every train_cfg['val_interval'] epochs",
    "test_dataloader": "the command trains and validates; test with your own script",
    "test_evaluator": "the command trains and validates; test with your own script",
    "test_cfg": "the command trains and validates; test with your own script",
    "visualizer": "the command logs to TensorBoard in --log-dir",
    "vis_backends": "the command logs to TensorBoard in --log-dir",
    "log_processor": "the command logs to TensorBoard in --log-dir",
    "log_level": "use --verbose",
    "default_scope": "MMEngine's registries are not used: give `type` as a callable or a dotted import path",
    "auto_scale_lr": "scale the learning rate in optim_wrapper yourself",
    "model_wrapper_cfg": "the command wraps the model in DistributedDataParallel itself in a distributed run",
    "data_preprocessor": "put the data preprocessor in the model config, as MMEngine's BaseModel takes it",
}
"""MMEngine runner keys a config may hold that the command does not run, each with what does its job here."""
_LOADER_KEYS = ("dataset", "batch_size", "num_workers", "sampler", "collate_fn")
_NAMES = (
    "model",
    "train_dataloader",
    "val_dataloader",
    "loss_fn",
    "optim_wrapper",
    "param_scheduler",
    "train_cfg",
    "val_metrics",
    "handlers",
)
"""The top-level names the command reads."""
_TRAIN_CFG_KEYS = ("type", "by_epoch", "max_epochs", "val_interval")


@dataclass(frozen=True)
class PythonConfig:
    """What a Python run config defines, checked; ``None`` where the file leaves the choice to the options."""

    name: str
    """The file's stem: the task's name (``runs/NAME`` is the default log directory)."""
    model: nn.Module
    train_dataset: Dataset[Any]
    batch_size: int | None = None
    num_workers: int = 0
    val_dataset: Dataset[Any] | None = None
    val_batch_size: int | None = None
    val_num_workers: int = 0
    loss_fn: Callable[..., torch.Tensor] | None = None
    optim_wrapper: dict[str, Any] | None = None
    param_scheduler: Any = None
    max_epochs: int | None = None
    val_interval: int = 1
    val_metrics: dict[str, Metric] = field(default_factory=dict)
    handlers: list[Any] = field(default_factory=list)


_BUILT = "raised while building what a Python run config names"
"""The note on an exception of the config's own code (a factory it names): it propagates as raised."""


@contextlib.contextmanager
def folder_on_path(path: Path) -> Iterator[None]:
    """The config file's folder first on ``sys.path`` meanwhile, as for ``python FILE.py`` (left as it was after).

    The command holds it while the config runs and while what it names (model, data, optimizer, schedules) is
    built, so dotted paths and imports reach the modules beside the file.
    """
    folder = str(path.resolve().parent)
    if folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def load_python_config(path: Path, seed: int) -> PythonConfig:
    """Run ``path`` with torch, ``random`` and numpy seeded by ``seed`` and read what it defines.

    The file's folder is first on ``sys.path`` meanwhile (``folder_on_path``).

    Raises:
        UsageError: The file cannot be read or is not valid Python, or a name
            it defines is refused or malformed (the message names it, the
            value received and what is accepted). An exception the file's own
            code raises (running, or building what ``dict(type=...)`` names)
            propagates as raised, with a note naming the file.
    """
    seed_all(seed)
    with folder_on_path(path):
        namespace = _run(path)
        _refuse_unread(path, namespace)
        where = f"--config {path}:"
        try:
            return _read(path, namespace, where)
        except (TypeError, ValueError) as error:
            notes = getattr(error, "__notes__", [])
            built = [index for index, note in enumerate(notes) if note.startswith(_BUILT)]
            if built:  # the config's own code's: raised again with its traceback and chain, the file named
                notes[built[-1]] += f" in {path}"
                raise
            raise UsageError(f"{where} {error}") from None


def _refuse_unread(path: Path, namespace: dict[str, Any]) -> None:
    """Refuse MMEngine's runner keys and names one letter from those the command reads (a typo trains silently)."""
    for key, why in _REFUSED.items():
        if key in namespace:
            raise UsageError(f"--config {path}: {key!r} is an MMEngine runner key engine-opt does not run; {why}")
    if isinstance(namespace.get("optimizer"), Mapping) and "optim_wrapper" not in namespace:
        raise UsageError(
            f"--config {path}: 'optimizer' is MMCV's key; engine-opt reads optim_wrapper=dict(optimizer=...)"
        )
    for name, value in namespace.items():
        if name in _NAMES or name.startswith("_") or not isinstance(value, (Mapping, list, tuple)):
            continue
        close = [known for known in _NAMES if known not in namespace and _one_edit_apart(name, known)]
        if close:
            raise UsageError(
                f"--config {path}: {name!r} is not a name engine-opt reads; did you mean {close[0]!r}? "
                f"(it reads {list(_NAMES)})"
            )


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether ``a`` becomes ``b`` by one inserted, deleted or changed letter, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    short, long = sorted((a, b), key=len)
    first = next((i for i, (x, y) in enumerate(zip(short, long, strict=False)) if x != y), len(short))
    if len(short) < len(long):
        return short[first:] == long[first + 1 :]
    swapped = short[first : first + 2] == long[first : first + 2][::-1]
    return short[first + 1 :] == long[first + 1 :] or (swapped and short[first + 2 :] == long[first + 2 :])


def _run(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"--config: {path} is not a file")
    try:
        return runpy.run_path(str(path), run_name="__engine_opt_config__")
    except SyntaxError as error:
        raise UsageError(f"--config: {path} is not valid Python: {error.msg} (line {error.lineno})") from None
    except OSError as error:
        raise UsageError(f"--config: cannot read {path}: {error.strerror}") from None
    except Exception as error:
        error.add_note(f"raised while running the config file {path}")
        raise


def _read(path: Path, namespace: dict[str, Any], where: str) -> PythonConfig:
    if "model" not in namespace or "train_dataloader" not in namespace:
        missing = [key for key in ("model", "train_dataloader") if key not in namespace]
        raise ValueError(
            f"a Python run config defines 'model' and 'train_dataloader'; missing {missing} "
            "(a JSON --config holds a wrapper config for the built-in tasks)"
        )
    model = _built("model", namespace["model"], nn.Module)
    train = _loader_cfg("train_dataloader", namespace["train_dataloader"])
    val = (
        None if namespace.get("val_dataloader") is None else _loader_cfg("val_dataloader", namespace["val_dataloader"])
    )
    loss_fn = _loss_fn(namespace.get("loss_fn"))
    train_cfg = _train_cfg(namespace.get("train_cfg"))
    optim_wrapper = namespace.get("optim_wrapper")
    if optim_wrapper is not None:
        optim_wrapper = dict(checks.mapping("optim_wrapper", optim_wrapper))
    trains_itself = loss_fn is None and callable(getattr(model, "train_step", None))
    if trains_itself and val is not None:
        raise ValueError(
            "val_dataloader: a model that trains itself (MMEngine's train_step) validates through its val_step "
            "and MMEngine's evaluators, which the command does not run; drop val_dataloader, or give loss_fn"
        )
    if not trains_itself:  # the supervised step splits each batch into (x, y): found out now, not at iteration 1
        _check_items("train_dataloader", train["dataset"])
        if val is not None:
            _check_items("val_dataloader", val["dataset"])
    default_loss = not trains_itself and loss_fn in (None, F.cross_entropy)
    return PythonConfig(
        name=path.stem,
        model=model,
        train_dataset=train["dataset"],
        batch_size=train.get("batch_size"),
        num_workers=train.get("num_workers", 0),
        val_dataset=None if val is None else val["dataset"],
        val_batch_size=None if val is None else val.get("batch_size"),
        val_num_workers=0 if val is None else val.get("num_workers", 0),
        loss_fn=F.cross_entropy if default_loss else loss_fn,
        optim_wrapper=optim_wrapper,
        param_scheduler=namespace.get("param_scheduler"),
        max_epochs=train_cfg.get("max_epochs"),
        val_interval=train_cfg.get("val_interval", 1),
        val_metrics=_val_metrics(namespace.get("val_metrics"), val is not None, loss_fn),
        handlers=_handlers(namespace.get("handlers")),
    )


def _check_items(name: str, dataset: Dataset[Any]) -> None:
    """Refuse a dataset the command cannot batch by index, or whose first item is no ``(x, y)``."""
    if isinstance(dataset, IterableDataset) or not callable(getattr(dataset, "__len__", None)):
        raise TypeError(
            f"{name}['dataset'] must be a map-style Dataset, with __len__ and __getitem__ (the command shuffles "
            f"it with a DistributedSampler), got {checks.describe(dataset)}"
        )
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{name}['dataset'] is empty")
    try:
        item = dataset[0]
    except Exception as error:
        error.add_note(f"{_BUILT}: {name}['dataset'][0]")
        raise
    try:
        prepare_batch(default_collate([item]))
    except (TypeError, ValueError):
        keys = f" with keys {list(item)}" if isinstance(item, Mapping) else ""
        raise ValueError(
            f"{name}['dataset'] items must be (x, y) pairs, or dicts with keys 'x' and 'y' (or 'input' and "
            f"'target'), as the model's input and loss_fn's target; got {type(item).__name__}{keys}"
        ) from None


def _built(name: str, value: Any, kind: type) -> Any:
    """``value`` itself if it is a ``kind``, else built from ``dict(type=..., **kwargs)``."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, Mapping) or "type" not in value:
        raise TypeError(
            f"{name} must be a {kind.__name__} or dict(type=..., **kwargs) that builds one, "
            f"got {checks.describe(value)}"
        )
    kwargs = dict(value)
    factory = _callable(f"{name}['type']", kwargs.pop("type"))
    try:
        built = factory(**kwargs)
    except Exception as error:  # the config's own code: its traceback, not a usage message
        error.add_note(f"{_BUILT}: {name}")
        raise
    if not isinstance(built, kind):
        raise TypeError(f"{name}: {factory!r} built {checks.describe(built)}, not a {kind.__name__}")
    return built


def _callable(name: str, value: Any) -> Callable[..., Any]:
    """A callable, or the one a dotted import path names."""
    found = import_path(value, name) if isinstance(value, str) else value
    if not callable(found):
        raise ValueError(
            f"{name} must be a callable or a dotted import path to one ('mypkg.data.make_dataset'), "
            f"got {checks.describe(value)}"
        )
    return found  # type: ignore[no-any-return]


def _loader_cfg(name: str, value: Any) -> dict[str, Any]:
    cfg = dict(checks.mapping(name, value))
    checks.known_keys(name, cfg, _LOADER_KEYS)
    if "dataset" not in cfg:
        raise ValueError(f"{name} needs a 'dataset': dict(dataset=..., batch_size=64), got keys {sorted(cfg)}")
    sampler = cfg.pop("sampler", None)
    if sampler is not None and dict(checks.mapping(f"{name}['sampler']", sampler)) not in (
        {"type": "DefaultSampler", "shuffle": name == "train_dataloader"},
        {"type": "DefaultSampler"},
    ):
        raise ValueError(
            f"{name}['sampler'] {sampler!r}: the command shuffles the training data with a DistributedSampler "
            "seeded by --seed (MMEngine's DefaultSampler); other samplers are not supported"
        )
    collate_fn = cfg.pop("collate_fn", None)
    if collate_fn is not None and collate_fn not in ({"type": "default_collate"}, default_collate):
        raise ValueError(
            f"{name}['collate_fn'] {collate_fn!r}: the command batches items with torch's default_collate "
            "(dict(type='default_collate')); other collate functions are not supported"
        )
    cfg["dataset"] = _built(f"{name}['dataset']", cfg["dataset"], Dataset)
    if "batch_size" in cfg:
        checks.positive_int(f"{name}['batch_size']", cfg["batch_size"])
    if "num_workers" in cfg:
        checks.int_at_least(f"{name}['num_workers']", cfg["num_workers"], 0)
    return cfg


def _loss_fn(value: Any) -> Callable[..., torch.Tensor] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return _built("loss_fn", value, nn.Module)  # type: ignore[no-any-return]
    found: Any = _callable("loss_fn", value)
    if isinstance(found, type) and issubclass(found, nn.Module):  # torch.nn.CrossEntropyLoss: its instance
        found = _built("loss_fn", {"type": found}, nn.Module)
    return found  # type: ignore[no-any-return]


def _train_cfg(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    cfg = dict(checks.mapping("train_cfg", value))
    if "max_iters" in cfg or cfg.get("by_epoch", True) is not True:
        raise ValueError("train_cfg: engine-opt trains by epochs; give max_epochs (or --epochs), not max_iters")
    checks.known_keys("train_cfg", cfg, _TRAIN_CFG_KEYS)
    if cfg.get("type", "EpochBasedTrainLoop") != "EpochBasedTrainLoop":
        raise ValueError(f"train_cfg['type'] must be 'EpochBasedTrainLoop' (or left out), got {cfg['type']!r}")
    for key in ("max_epochs", "val_interval"):
        if key in cfg:
            checks.positive_int(f"train_cfg[{key!r}]", cfg[key])
    return cfg


def _val_metrics(value: Any, validates: bool, loss_fn: Callable[..., torch.Tensor] | None) -> dict[str, Metric]:
    if value is None:
        return {"accuracy": Accuracy(), "loss": Loss(loss_fn or F.cross_entropy)} if validates else {}
    if not validates:
        raise ValueError("val_metrics needs a val_dataloader to measure them on")
    metrics = dict(checks.mapping("val_metrics", value))
    for name, metric in metrics.items():
        if not isinstance(name, str) or not isinstance(metric, Metric):
            raise TypeError(
                f"val_metrics must map names to ignite.metrics.Metric objects, got {name!r}: {checks.describe(metric)}"
            )
    return metrics


def _handlers(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"handlers must be a list, got {checks.describe(value)}")
    for index, handler in enumerate(value):
        if isinstance(handler, tuple) and len(handler) == 2 and callable(handler[1]):
            continue  # (event, handler): trainer.add_event_handler(event, handler)
        if not (callable(getattr(handler, "attach", None)) or callable(handler)):
            raise TypeError(
                f"handlers[{index}] must be an (event, handler) pair, have attach(trainer), or be a callable "
                f"attach(trainer), got {checks.describe(handler)}"
            )
    return list(value)


def python_task(config: PythonConfig, seed: int, batch_size: int) -> Task:
    """The task the command trains from ``config``: its model, its shuffled training batches, its loss.

    The wrapper config is not the task's default: ``config.optim_wrapper``
    replaces the wrapper options, and without it they describe the wrapper
    from the built-in classifier's default, AdamW at lr 0.001.
    """
    generator = torch.Generator().manual_seed(seed)
    data = make_loader(config.train_dataset, batch_size, generator, seed, config.num_workers)
    default_cfg = {"type": "OptimWrapper", "optimizer": {"type": "AdamW", "lr": 1e-3}}
    # the loss summed over a batch's items (--num-items samples) is known for the default loss only
    item_loss_fn = cross_entropy_sum if config.loss_fn is F.cross_entropy else None
    return Task(config.name, config.model, data, default_cfg, loss_fn=config.loss_fn, item_loss_fn=item_loss_fn)
