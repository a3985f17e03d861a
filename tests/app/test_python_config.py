"""A Python run config: the user's model and data trained by the command, compared with the written-out loop."""

from __future__ import annotations

import re
import runpy
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from engine_opt.app.cli import main
from engine_opt.app.config import UsageError
from engine_opt.app.python_config import load_python_config, python_task

from oracle import assert_same_tensors
from scalars import read_hparams, read_scalars

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "configs" / "digits.py"

TINY = """
import torch
from torch.utils.data import TensorDataset

model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
train_dataloader = dict(
    batch_size=10, dataset=TensorDataset(torch.randn(45, 6), torch.randint(0, 3, (45,)))
)
optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9))
param_scheduler = [dict(type="MultiStepLR", milestones=[1], gamma=0.1)]
train_cfg = dict(max_epochs=2)
"""


MMENGINE_MODEL = """
import torch
from mmengine.model import BaseModel
from torch.utils.data import TensorDataset

class Regressor(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, y, mode="tensor"):
        return dict(loss=torch.nn.functional.mse_loss(self.linear(x), y))

model = Regressor()
train_dataloader = dict(batch_size=8, dataset=TensorDataset(torch.randn(16, 4), torch.randn(16, 1)))
"""
"""A model of MMEngine's that trains itself (its train_step), and its data."""

NO_WRAPPER = TINY.replace('optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9))\n', "")

DICT_ITEMS = """
class Dicts(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"img": torch.zeros(2), "label": 1}

train_dataloader["dataset"] = Dicts()
"""


def write(tmp_path, text, name="run.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run(tmp_path, *args):
    return main(["train", "--no-progress", "--log-dir", str(tmp_path / "logs"), *args])


def checkpoint(tmp_path, iteration):
    return torch.load(tmp_path / "logs" / "checkpoints" / f"checkpoint_{iteration}.pt", weights_only=True)


def written_out_loop(config, seed, epochs):
    """The plain loop: the config run as the command runs it, its batches in the sampler's order, SGD by hand."""
    torch.manual_seed(seed)
    namespace = runpy.run_path(str(config))
    model, dataset = namespace["model"], namespace["train_dataloader"]["dataset"]
    batch_size = namespace["train_dataloader"]["batch_size"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * (0.1 if epoch >= 1 else 1.0)  # MultiStepLR, milestone at epoch 1
        sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(order), batch_size):
            x, y = dataset[order[start : start + batch_size]]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model


@pytest.mark.slow  # runs the command
def test_a_python_config_trains_as_the_written_out_loop(tmp_path, capsys):
    config = write(tmp_path, TINY)
    assert run(tmp_path, "--config", str(config), "--seed", "3") == 0
    assert "trained run to epoch 2 (10 iterations)" in capsys.readouterr().out
    expected = written_out_loop(config, seed=3, epochs=2)
    assert_same_tensors(checkpoint(tmp_path, 10)["model"], expected.state_dict())


@pytest.mark.slow  # runs the command twice
def test_the_options_override_the_configs_epochs_and_batch_size(tmp_path, capsys):
    config = write(tmp_path, TINY.replace("param_scheduler", "unused_schedule"))
    assert run(tmp_path, "--config", str(config), "--epochs", "3", "--batch-size", "15") == 0
    assert "trained run to epoch 3 (9 iterations)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(tmp_path / "b", "--config", str(config), "--dtype", "bf16")
    assert "'s optim_wrapper holds the whole wrapper config; drop --dtype" in capsys.readouterr().err
    no_wrapper = write(tmp_path, TINY.replace("optim_wrapper", "unused_wrapper").replace("param_", "unused_"), "w.py")
    assert run(tmp_path / "c", "--config", str(no_wrapper), "--dtype", "bf16", "--lr", "0.01") == 0
    wrapper = checkpoint(tmp_path / "c", 10)["run"]["wrapper"]
    described = {key: wrapper[key] for key in ("type", "optimizer", "dtype")}
    assert described == {"type": "AmpOptimWrapper", "optimizer": {"type": "AdamW", "lr": 0.01}, "dtype": "bf16"}


@pytest.mark.slow  # trains the digits three times
def test_the_digits_config_reaches_the_stated_accuracy_and_resumes_bitwise(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert run(tmp_path / "whole", "--config", str(DIGITS)) == 0
    accuracy = float(re.search(r"validation: +accuracy ([0-9.]+)", capsys.readouterr().out).group(1))
    assert accuracy >= 0.96  # the config's docstring states 0.972 to 0.975 over seeds 0 to 2
    scalars = read_scalars(tmp_path / "whole" / "logs")
    assert [step for step, _ in scalars["val/accuracy"]] == [115, 230, 345, 460]  # every 5 epochs of 23 iterations
    assert scalars["val/accuracy"][-1][1] == pytest.approx(accuracy, abs=1e-4)
    hparams, metrics = read_hparams(tmp_path / "whole" / "logs")
    assert metrics == ["train/loss", "val/accuracy", "val/loss"] and hparams["task"] == "digits"
    assert hparams["param_scheduler"].startswith("[{'type': 'LinearLR'") and hparams["wrapper.optimizer.lr"] == 5e-3
    # stopped after iteration 400 (mid-epoch, dropout's random state and the schedules saved), then resumed
    assert run(tmp_path / "split", "--config", str(DIGITS), "--checkpoint-every", "100") == 0
    (tmp_path / "split" / "logs" / "checkpoints" / "checkpoint_460.pt").unlink()  # the newest left: 400
    capsys.readouterr()
    assert run(tmp_path / "split", "--config", str(DIGITS), "--resume") == 0
    assert "checkpoint_400.pt" in capsys.readouterr().out.split("resumed from:")[1].splitlines()[0]
    whole, split = checkpoint(tmp_path / "whole", 460), checkpoint(tmp_path / "split", 460)
    assert_same_tensors(split["model"], whole["model"])
    assert_same_tensors(split["optim_wrapper"], whole["optim_wrapper"])


@pytest.mark.slow  # runs the command
def test_a_model_that_trains_itself_through_mmengines_train_step(tmp_path):
    pytest.importorskip("mmengine")
    config = write(tmp_path, MMENGINE_MODEL + 'optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.1))\n')
    assert run(tmp_path, "--config", str(config), "--epochs", "1") == 0
    torch.manual_seed(0)
    namespace = runpy.run_path(str(config))
    linear, (x, y) = namespace["model"].linear, namespace["train_dataloader"]["dataset"].tensors
    sampler = DistributedSampler(range(16), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(0)
    order = list(sampler)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    for start in (0, 8):
        batch = order[start : start + 8]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(linear(x[batch]), y[batch]).backward()
        optimizer.step()
    saved = checkpoint(tmp_path, 2)["model"]
    assert_same_tensors({key.removeprefix("linear."): value for key, value in saved.items()}, linear.state_dict())


@pytest.mark.slow  # runs the command
def test_the_configs_handlers_are_attached_after_the_commands_own(tmp_path):
    seen = tmp_path / "seen.txt"
    config = write(
        tmp_path,
        TINY
        + f"""
from ignite.engine import Events

class Counter:
    def attach(self, trainer):
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: open({str(seen)!r}, "a").write("epoch\\n"))

def at_the_end(trainer):
    trainer.add_event_handler(Events.COMPLETED, lambda engine: open({str(seen)!r}, "a").write("end\\n"))

handlers = [Counter(), at_the_end, (Events.STARTED, lambda engine: open({str(seen)!r}, "a").write("start\\n"))]
""",
    )
    assert run(tmp_path, "--config", str(config)) == 0
    assert seen.read_text().split() == ["start", "epoch", "epoch", "end"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (TINY + "work_dir = 'out'", r"'work_dir' is an MMEngine runner key engine-opt does not run; use --log-dir"),
        (TINY + "_base_ = ['x.py']", r"'_base_' is an MMEngine runner key .*write one file"),
        ("import torch\nmodel = torch.nn.Linear(2, 2)", r"missing \['train_dataloader'\]"),
        (
            TINY + "model = 3",
            r"model must be a Module or dict\(type=..., \*\*kwargs\) that builds one, got 3 of type int",
        ),
        (TINY + "model = dict(type='no.such.Thing')", r"model\['type'\] must be a callable or a dotted import path"),
        (TINY + "model = dict(type=lambda: 3)", r"model: .* built 3 of type int, not a Module"),
        (TINY + "train_dataloader['shuffle'] = True", r"train_dataloader.*'shuffle'"),
        (
            TINY + "train_dataloader['batch_size'] = 0",
            r"train_dataloader\['batch_size'\] must be a positive int, got 0",
        ),
        (TINY + "train_dataloader['sampler'] = dict(type='InfiniteSampler')", r"other samplers are not supported"),
        (TINY + "train_dataloader['dataset'] = [1, 2]", r"train_dataloader\['dataset'\] must be a Dataset"),
        (TINY + "train_cfg = dict(max_iters=100)", r"trains by epochs; give max_epochs"),
        (TINY + "train_cfg = dict(max_epochs=0)", r"train_cfg\['max_epochs'\] must be a positive int, got 0"),
        (TINY + "val_metrics = dict(acc=3)", r"val_metrics needs a val_dataloader"),
        (TINY + "handlers = [3]", r"handlers\[0\] must be an \(event, handler\) pair, have attach\(trainer\)"),
        (TINY + "loss_fn = 'no_such_module.loss'", r"loss_fn must be a callable or a dotted import path"),
        ("model = (", r"is not valid Python: .* \(line 1\)"),
        (
            NO_WRAPPER + "optim_wraper = dict(optimizer=dict(type='SGD'))",
            r"'optim_wraper' .* did you mean 'optim_wrapper'",
        ),
        (NO_WRAPPER + "optimizer = dict(type='SGD', lr=0.1)", r"'optimizer' is MMCV's key; .*optim_wrapper=dict"),
        (
            TINY + DICT_ITEMS,
            r"train_dataloader\['dataset'\] items must be \(x, y\) pairs, .* got dict with keys \['img', 'label'\]",
        ),
        (TINY + "train_dataloader['collate_fn'] = dict(type='pseudo_collate')", r"other collate functions"),
        (TINY + "handlers = [(1, 2, 3)]", r"handlers\[0\] must be an \(event, handler\) pair"),
        (TINY + "val_dataloadr = dict(dataset=None)", r"'val_dataloadr' .* did you mean 'val_dataloader'"),
        (
            TINY + "class Stream(torch.utils.data.IterableDataset):\n    def __iter__(self):\n        yield 1\n"
            "train_dataloader['dataset'] = Stream()",
            r"train_dataloader\['dataset'\] must be a map-style Dataset",
        ),
        (TINY + "train_dataloader['dataset'] = TensorDataset(torch.zeros(0, 6))", r"'dataset'\] is empty"),
    ],
    ids=lambda value: value if len(value) < 30 else None,
)
def test_a_config_that_cannot_run_is_refused_by_name(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        load_python_config(write(tmp_path, text), seed=0)


def test_the_configs_own_error_propagates_with_the_file_named(tmp_path):
    path = write(tmp_path, "raise KeyError('missing')")
    with pytest.raises(KeyError) as error:
        load_python_config(path, seed=0)
    assert f"raised while running the config file {path}" in error.value.__notes__


def test_the_config_is_run_with_torch_seeded_and_given_to_the_command_unchanged(tmp_path):
    path = write(tmp_path, TINY)
    first, second = load_python_config(path, seed=5), load_python_config(path, seed=5)
    assert_same_tensors(first.model.state_dict(), second.model.state_dict())
    assert (first.name, first.batch_size, first.max_epochs) == ("run", 10, 2)
    assert first.optim_wrapper == {"optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9}}
    assert sorted(first.val_metrics) == []


@pytest.mark.slow  # starts the command's parser in a subprocess-free way but runs main
@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--task", "gan"], "--task gan: the Python config"),
        (["--schedule", "cosine"], "--schedule cosine: --config"),
    ],
)
def test_options_the_config_replaces_are_refused(tmp_path, capsys, extra, said):
    config = write(tmp_path, TINY)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--config", str(config), *extra)
    assert exit_info.value.code == 2 and said in capsys.readouterr().err


def test_numpy_is_seeded_too_and_the_configs_folder_imports(tmp_path):
    (tmp_path / "beside_the_config.py").write_text(
        "import numpy\ndef order():\n    return numpy.random.permutation(10).tolist()\n"
    )
    path = write(tmp_path, TINY + "from beside_the_config import order\nsplit = order()\n")
    first, second = (runpy_split(path) for _ in range(2))
    assert first == second
    assert str(tmp_path) not in __import__("sys").path  # the folder is taken off again


def runpy_split(path):
    load_python_config(path, seed=1)
    import beside_the_config  # imported by the config from its folder, left in sys.modules

    return beside_the_config.order()


def test_an_error_in_the_configs_own_code_keeps_its_type_and_traceback(tmp_path):
    path = write(tmp_path, TINY + "def broken():\n    return int('sixteen')\nmodel = dict(type=broken)\n")
    with pytest.raises(ValueError, match="invalid literal") as error:
        load_python_config(path, seed=0)
    assert not isinstance(error.value, UsageError)
    assert f"raised while building what a Python run config names: model in {path}" in error.value.__notes__


def test_the_default_loss_named_and_a_loss_class_given(tmp_path):
    named = load_python_config(write(tmp_path, TINY + "loss_fn = torch.nn.functional.cross_entropy"), seed=0)
    # --num-items samples works with it, as with the default
    assert python_task(named, seed=0, batch_size=10).item_loss_fn is not None
    given = load_python_config(write(tmp_path, TINY + "loss_fn = 'torch.nn.CrossEntropyLoss'", "c.py"), seed=0)
    assert isinstance(given.loss_fn, torch.nn.CrossEntropyLoss)
    assert python_task(given, seed=0, batch_size=10).item_loss_fn is None
    default_collate = load_python_config(
        write(tmp_path, TINY + "train_dataloader['collate_fn'] = dict(type='default_collate')", "d.py"), seed=0
    )
    assert default_collate.batch_size == 10


def test_a_model_that_trains_itself_is_refused_a_val_dataloader(tmp_path):
    pytest.importorskip("mmengine")
    text = MMENGINE_MODEL + "val_dataloader = dict(batch_size=8, dataset=train_dataloader['dataset'])\n"
    with pytest.raises(UsageError, match=r"val_dataloader: a model that trains itself .* drop val_dataloader"):
        load_python_config(write(tmp_path, text), seed=0)


@pytest.mark.slow  # runs the command twice
def test_num_items_counts_every_label_of_a_target_with_several(tmp_path, capsys):
    config = write(
        tmp_path,
        """
import torch
from torch.utils.data import TensorDataset

model = torch.nn.Sequential(torch.nn.Linear(6, 15), torch.nn.Unflatten(1, (3, 5)))
train_dataloader = dict(
    batch_size=8, dataset=TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32, 5)))
)
optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.1))
""",
    )
    losses = []
    for extra in ([], ["--num-items", "samples"]):
        assert run(tmp_path / str(len(extra)), "--config", str(config), "--epochs", "2", *extra) == 0
        losses.append(float(re.search(r"last epoch loss: +loss ([0-9.]+)", capsys.readouterr().out).group(1)))
    assert losses[1] == pytest.approx(losses[0], abs=2e-4)  # full batches: the same mean, the same updates


@pytest.mark.slow  # runs the command
def test_a_refused_config_writes_nothing_into_an_existing_checkpoint_directory(tmp_path):
    existing = tmp_path / "logs" / "checkpoints"
    existing.mkdir(parents=True)
    with pytest.raises(SystemExit):
        run(tmp_path, "--config", str(write(tmp_path, TINY + "work_dir = 'out'")))
    assert list(existing.iterdir()) == []


@pytest.mark.slow  # runs the command twice
def test_a_resume_names_what_the_config_file_sets(tmp_path, capsys):
    config = write(tmp_path, TINY.replace("param_scheduler", "unused"), "first.py")
    assert run(tmp_path, "--config", str(config), "--epochs", "1") == 0
    changed = write(tmp_path, TINY.replace("param_scheduler", "unused").replace("batch_size=10", "batch_size=9"))
    with pytest.raises(SystemExit):
        run(tmp_path, "--config", str(changed), "--epochs", "2", "--resume")
    err = capsys.readouterr().err
    assert "the task (the config file's name) run, the checkpoint's first" in err
    assert "--batch-size (or the config's) 9, the checkpoint's 10" in err


@pytest.mark.slow  # runs the command
def test_the_wrapper_options_are_named_for_their_own_errors(tmp_path, capsys):
    config = write(tmp_path, TINY.replace("optim_wrapper", "unused").replace("param_scheduler", "unused_s"))
    with pytest.raises(SystemExit):
        run(tmp_path, "--config", str(config), "--implementation", "fused", "--optimizer", "RMSprop")
    assert "engine-opt: error: the wrapper options: implementation='fused'" in capsys.readouterr().err


@pytest.mark.slow  # runs the command
def test_members_without_a_step_that_updates_them_are_one_line(tmp_path, capsys):
    text = TINY.replace(
        "model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))",
        "model = torch.nn.ModuleDict(dict(gen=torch.nn.Linear(6, 3), disc=torch.nn.Linear(3, 1)))",
    ).replace(
        'optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9))',
        'optim_wrapper = dict(gen=dict(optimizer=dict(type="SGD", lr=0.1)), disc=dict(optimizer=dict(type="SGD")))',
    )
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--config", str(write(tmp_path, text.replace("param_scheduler", "unused"))))
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and "OptimWrapperDict" in line


def test_helper_names_beside_the_ones_read_are_the_files_own(tmp_path):
    text = NO_WRAPPER + (
        'optimizer = dict(type="SGD", lr=0.1)\n'
        "\noptim_wrapper = dict(optimizer=optimizer)\nhandler = (1, print)\nhandlers = [handler]\n"
        "train_loader = train_dataloader\nmodels = [model]\n"
    )
    config = load_python_config(write(tmp_path, text), seed=0)
    assert config.optim_wrapper["optimizer"]["type"] == "SGD" and len(config.handlers) == 1


def test_the_configs_own_error_keeps_its_chain(tmp_path):
    text = TINY + (
        "def data():\n    try:\n        open('/no/such/file')\n    except OSError as error:\n"
        "        raise RuntimeError('cannot load the data') from error\n"
        "train_dataloader = dict(dataset=dict(type=data))\n"
    )
    with pytest.raises(RuntimeError, match="cannot load the data") as error:
        load_python_config(write(tmp_path, text), seed=0)
    assert isinstance(error.value.__cause__, FileNotFoundError)


def test_an_optimizer_beside_the_config_is_found_by_its_dotted_path(tmp_path):
    from engine_opt.app.cli import build_parser
    from engine_opt.app.train import build

    (tmp_path / "optimizers_beside.py").write_text("import torch\nclass MySGD(torch.optim.SGD):\n    pass\n")
    text = TINY.replace('type="SGD"', 'type="optimizers_beside.MySGD"')
    args = build_parser().parse_args(["train", "--config", str(write(tmp_path, text)), "--log-dir", str(tmp_path)])
    assert type(build(args).optim_wrapper.optimizer).__name__ == "MySGD"
