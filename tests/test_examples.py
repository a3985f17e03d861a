"""The tutorial's nine sections (examples/tutorial_*.py) run and print what the tutorial says."""

from __future__ import annotations

import copy
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name, capsys):
    namespace = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    return namespace, capsys.readouterr().out


def test_single_precision_wrapper_equals_the_plain_loop(capsys):
    plain, _ = run("tutorial_1_pytorch_fp32", capsys)
    wrapped, _ = run("tutorial_2_wrapper_fp32", capsys)
    for a, b in zip(wrapped["model"].parameters(), plain["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(wrapped["model"].bias, torch.nn.Linear(1, 1).bias)  # it trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA section 4 adds a loss scaler that section 3 lacks")
def test_amp_wrapper_equals_the_plain_autocast_loop_on_cpu(capsys):
    plain, _ = run("tutorial_3_pytorch_amp", capsys)
    wrapped, _ = run("tutorial_4_wrapper_amp", capsys)
    assert wrapped["optim_wrapper"].cast_dtype is torch.bfloat16
    for a, b in zip(wrapped["model"].parameters(), plain["model"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_amp_accumulation_matches_the_exact_plain_loop(capsys):
    run("tutorial_5_pytorch_amp_accumulation", capsys)  # the tutorial's own loop runs
    wrapped, _ = run("tutorial_6_wrapper_amp_accumulation", capsys)
    device = wrapped["device"]
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler(device, enabled=device == "cuda")
    for idx in range(10):
        with torch.autocast(device):
            loss = F.l1_loss(model(torch.zeros(10, 1, 1, 1, device=device)), torch.ones(10, 1, 1, 1, device=device))
        scaler.scale(loss / 2).backward()
        if (idx + 1) % 2 == 0:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    for a, b in zip(wrapped["model"].parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert wrapped["optim_wrapper"].applied_steps + wrapped["optim_wrapper"].skipped_steps == 5


def test_lr_and_momentum_print_as_in_the_tutorial(capsys):
    _, out = run("tutorial_7_lr_momentum", capsys)
    assert out.splitlines() == [
        "get info from optimizer ------",
        "0.01",
        "0",
        "get info from wrapper ------",
        "{'lr': [0.01]}",
        "{'momentum': [0]}",
    ]


def test_state_dicts_export_and_load(capsys):
    namespace, out = run("tutorial_8_state_dict", capsys)
    lines = out.splitlines()
    assert lines[0] == "print state_dict" and lines[-1] == "load state_dict" and len(lines) == 4
    assert lines[1].startswith("{'state': {}, 'param_groups': [{'lr': 0.01, 'momentum': 0,")
    assert "'loss_scaler'" not in lines[1] and "'loss_scaler': " in lines[2]
    expected_scaler = namespace["amp_optim_wrapper"].state_dict()["loss_scaler"]
    assert lines[2].endswith(f"'loss_scaler': {expected_scaler}}}")


def test_several_optimizers_print_as_in_the_tutorial(capsys):
    _, out = run("tutorial_9_several_optimizers", capsys)
    assert out.splitlines() == [
        "wrapper_dict = wrapper1 + wrapper2",
        "{'gen.lr': [0.01], 'disc.lr': [0.01]}",
        "{'gen.momentum': [0], 'disc.momentum': [0]}",
    ]


def test_run_tutorial_runs_all_nine(capsys):
    runpy.run_path(str(EXAMPLES / "run_tutorial.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("== ")] == [
        f"== {path.stem}" for path in sorted(EXAMPLES.glob("tutorial_*.py"))
    ]
    assert len(list(EXAMPLES.glob("tutorial_*.py"))) == 9


def test_the_readme_example_runs(capsys):
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "{'lr': [0.001]} 2 False"


def run_with_args(name, monkeypatch, capsys, *args):
    monkeypatch.setattr("sys.argv", [name, *map(str, args)])
    return run(name, capsys)


def test_gan_example_updates_each_member(capsys):
    namespace, out = run("gan_two_wrappers", capsys)
    assert out.splitlines()[0] == "generator updates 64, all updates 96, skipped 0"  # 64 iterations, disc every 2
    assert namespace["optim_wrapper"]["disc"].applied_steps == 32
    assert all(param.requires_grad for param in namespace["gan"].parameters())  # the member contexts restored them


def test_trainer_example_logs_checkpoints_and_averages(tmp_path, monkeypatch, capsys):
    namespace, out = run_with_args("trainer_with_handlers", monkeypatch, capsys, tmp_path)
    assert "updates applied 64, skipped 0" in out
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert sorted(path.name for path in (tmp_path / "checkpoints").glob("*.pt")) == [
        "checkpoint_112.pt",
        "checkpoint_128.pt",
    ]
    assert namespace["scheduler"].last_epoch == namespace["updates"] == 64


def test_resume_example_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, capsys):
    _, stopped = run_with_args("resume", monkeypatch, capsys, tmp_path / "a", "--stop-at", 10)
    _, resumed = run_with_args("resume", monkeypatch, capsys, tmp_path / "a")
    _, straight = run_with_args("resume", monkeypatch, capsys, tmp_path / "b")
    assert "iteration 10: updates 3" in stopped
    assert resumed.splitlines()[0] == f"resumed from {tmp_path / 'a' / 'checkpoint_10.pt'} at iteration 10"
    assert resumed.splitlines()[1:] == straight.splitlines()[1:]
    for _ in range(2):  # a complete run, run again on its directory: it is not trained anew, and nothing fails
        _, again = run_with_args("resume", monkeypatch, capsys, tmp_path / "a")
        assert again.splitlines()[0].endswith("at iteration 24: the 4 epochs are done, nothing left to train")
        assert again.splitlines()[1:] == straight.splitlines()[1:]


@pytest.mark.slow
def test_distributed_example_reduces_once_per_window_in_two_processes(tmp_path):
    with socket.socket() as sock:  # a free port for the ranks to meet on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_PORT": str(port)}
    args = [sys.executable, str(EXAMPLES / "distributed.py"), str(tmp_path / "checkpoints")]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "2 process(es): 16 iterations, 4 updates, 4 gradient reductions"
    assert " INFO" not in result.stdout + result.stderr  # no launcher dump
    one = subprocess.run([*args[:2], str(tmp_path / "one"), "--nproc", "1"], capture_output=True, text=True)
    assert one.stdout.splitlines()[-1] == "1 process(es): 16 iterations, 4 updates, 0 gradient reductions"


@pytest.mark.slow
def test_distributed_example_runs_on_two_nodes_under_torchrun(tmp_path):
    """Two node processes of one rank each, meeting on this machine; the checkpoints on a disk both share."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    example = [str(EXAMPLES / "distributed.py"), str(tmp_path / "checkpoints")]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--node-rank", str(rank), *example],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert outputs[0][0].splitlines()[-1] == "2 process(es): 16 iterations, 4 updates, 4 gradient reductions"
    assert outputs[1][0] == ""


def test_sections_5_and_6_say_why_their_numbers_differ(capsys):
    _, out = run("tutorial_5_pytorch_amp_accumulation", capsys)
    assert "section 6 prints other numbers" in out


@pytest.mark.parametrize(
    ("name", "usage"),
    [
        ("resume", "checkpoint_dir"),
        ("distributed", "checkpoint_dir"),
        ("trainer_with_handlers", "[log_dir]"),
        ("mmengine_config", "[--resume CKPT]"),
    ],
)
def test_help_works_on_the_examples_that_take_arguments(name, usage, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {name}.py") and usage in out


def mmengine_run(namespace, epochs, checkpoint=None):
    """MMEngine's own objects on the example's config, stepped as its runner steps them (one update per batch)."""
    mmengine_optim = pytest.importorskip("mmengine.optim")
    from mmengine.registry import PARAM_SCHEDULERS

    torch.manual_seed(0)
    model, data, cfg = namespace["TinyViT"](), namespace["make_data"](), namespace["cfg"]
    wrapper = mmengine_optim.build_optim_wrapper(model, copy.deepcopy(cfg["optim_wrapper"]))
    schedulers = [
        PARAM_SCHEDULERS.build(copy.deepcopy(item), default_args=dict(optimizer=wrapper, epoch_length=len(data)))
        for item in cfg["param_scheduler"]
    ]
    start = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        wrapper.load_state_dict(checkpoint["optimizer"])
        for scheduler, state in zip(schedulers, checkpoint["param_schedulers"], strict=True):
            scheduler.load_state_dict(state)
        start = checkpoint["meta"]["epoch"]
    for _ in range(start, epochs):
        for x, y in data:
            wrapper.update_params(F.cross_entropy(model(x), y))
            for scheduler in schedulers:
                if not scheduler.by_epoch:
                    scheduler.step()
        for scheduler in schedulers:
            if scheduler.by_epoch:
                scheduler.step()
    saved = dict(
        state_dict=copy.deepcopy(model.state_dict()),
        optimizer=copy.deepcopy(wrapper.state_dict()),
        param_schedulers=[copy.deepcopy(scheduler.state_dict()) for scheduler in schedulers],
        meta=dict(epoch=epochs, iter=epochs * len(data)),
    )
    return model, saved


@pytest.mark.filterwarnings("ignore:Detected call of `scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_mmengine_config_trains_and_resumes_an_mmengine_checkpoint_as_mmengine(tmp_path, capsys):
    namespace = runpy.run_path(str(EXAMPLES / "mmengine_config.py"))
    ours = namespace["main"]([])
    assert "epoch 4, updates applied 24" in capsys.readouterr().out
    theirs, _ = mmengine_run(namespace, epochs=4)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    _, checkpoint = mmengine_run(namespace, epochs=2)  # an MMEngine run saved at the end of epoch 2
    torch.save(checkpoint, tmp_path / "epoch_2.pth")
    resumed = namespace["main"](["--resume", str(tmp_path / "epoch_2.pth")])
    theirs, _ = mmengine_run(namespace, epochs=4, checkpoint=checkpoint)  # MMEngine's own continuation
    for (name, a), b in zip(resumed.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


RUNNER = """
import copy, runpy, sys
import torch, torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.runner import Runner

namespace = runpy.run_path(sys.argv[1])
data = namespace["make_data"]()


class Model(namespace["TinyViT"], BaseModel):
    def forward(self, x, y=None, mode="tensor"):
        out = super().forward(x)
        return dict(loss=F.cross_entropy(out, y)) if mode == "loss" else out


class Samples(torch.utils.data.Dataset):  # the example's batches, sample by sample, batched again in order
    x, y = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return dict(x=self.x[index], y=self.y[index])


torch.manual_seed(0)
model = Model()
loader = torch.utils.data.DataLoader(Samples(), batch_size=len(data[0][0]), shuffle=False)
cfg = namespace["cfg"]
runner = Runner(
    model=model, work_dir=sys.argv[2], train_dataloader=loader, optim_wrapper=copy.deepcopy(cfg["optim_wrapper"]),
    param_scheduler=copy.deepcopy(cfg["param_scheduler"]), train_cfg=copy.deepcopy(cfg["train_cfg"]),
    default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1)), default_scope="mmengine",
)
runner.train()
"""


@pytest.mark.slow
def test_mmengine_config_resumes_a_checkpoint_mmengines_runner_saved(tmp_path, capsys):
    pytest.importorskip("mmengine.runner")
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    subprocess.run([sys.executable, str(script), str(EXAMPLES / "mmengine_config.py"), str(tmp_path)], check=True)
    final = torch.load(tmp_path / "epoch_4.pth", weights_only=False)["state_dict"]
    namespace = runpy.run_path(str(EXAMPLES / "mmengine_config.py"))
    for model in (namespace["main"]([]), namespace["main"](["--resume", str(tmp_path / "epoch_2.pth")])):
        assert list(model.state_dict()) == list(final)
        for name, value in model.state_dict().items():
            assert torch.equal(value, final[name]), name


def test_mmengine_config_refuses_a_checkpoint_that_is_not_mmengines_in_one_line(tmp_path, capsys):
    namespace = runpy.run_path(str(EXAMPLES / "mmengine_config.py"))
    path = tmp_path / "checkpoint_4.pt"
    torch.save({"model": {}, "optim_wrapper": {}, "trainer": {}}, path)  # this project's own layout
    with pytest.raises(SystemExit) as end:
        namespace["main"](["--resume", str(path)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert end.value.code == 2
    assert "is not a checkpoint of MMEngine's runner: it holds ['model', 'optim_wrapper', 'trainer']" in err
