"""The wrapper config that engine-opt's options describe: what build_optim_wrapper gets, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from engine_opt import build_optim_wrapper
from engine_opt.app.cli import build_parser
from engine_opt.app.config import UsageError, wrapper_config
from engine_opt.app.tasks import make_task


def config_of(*options, task="classifier"):
    args = build_parser().parse_args(["train", "--task", task, *options])
    return wrapper_config(args, make_task(task, seed=0, batch_size=8))


def test_the_options_make_the_config_they_name():
    assert config_of() == {"type": "OptimWrapper", "optimizer": {"type": "AdamW", "lr": 1e-3}, "implementation": "auto"}
    cfg = config_of("--dtype", "fp16", "--accumulate", "3", "--clip-norm", "0.5", "--optimizer", "SGD", "--lr", "0.1")
    assert cfg == {
        "type": "AmpOptimWrapper",
        "optimizer": {"type": "SGD", "lr": 0.1},
        "dtype": "fp16",
        "accumulative_counts": 3,
        "clip_grad": {"max_norm": 0.5},
        "implementation": "auto",
    }


def test_the_command_picks_the_fastest_update_and_a_config_file_keeps_torchs_default(tmp_path):
    task = make_task("classifier", seed=0, batch_size=8)
    assert build_optim_wrapper(task.model, config_of()).optimizer.defaults["fused"] is True
    path = tmp_path / "wrapper.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "lr": 0.5}}))
    assert build_optim_wrapper(task.model, config_of("--config", str(path))).optimizer.defaults["fused"] is None


@pytest.mark.parametrize(
    ("option", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_each_dtype_option_builds_a_wrapper_of_that_dtype(option, dtype):
    task = make_task("classifier", seed=0, batch_size=8)
    wrapper = build_optim_wrapper(task.model, config_of("--wrapper", "AmpOptimWrapper", "--dtype", option))
    assert wrapper.cast_dtype is dtype


def test_the_gan_gets_one_config_per_member():
    cfg = config_of("--task", "gan", "--accumulate", "2", task="gan")
    assert sorted(cfg) == ["disc", "gen"] and cfg["gen"]["accumulative_counts"] == 2
    assert cfg["gen"] is not cfg["disc"] and cfg["gen"]["optimizer"] is not cfg["disc"]["optimizer"]


def test_a_config_file_replaces_the_options(tmp_path):
    path = tmp_path / "wrapper.json"
    path.write_text(json.dumps({"optimizer": {"type": "SGD", "lr": 0.5}}))
    assert config_of("--config", str(path)) == {"optimizer": {"type": "SGD", "lr": 0.5}}
    with pytest.raises(
        UsageError, match=r"--config holds the whole wrapper config; drop --accumulate, --lr or edit the file"
    ):
        config_of("--config", str(path), "--lr", "0.1", "--accumulate", "2")
    with pytest.raises(UsageError, match=r"--dtype bf16 needs --wrapper AmpOptimWrapper"):
        config_of("--wrapper", "OptimWrapper", "--dtype", "bf16")


def test_muon_takes_the_hidden_layers_and_never_the_last_one_however_deep():
    from engine_opt.app.config import _muon_routes

    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    )
    cfg = {"optimizer": {"type": "AdamW", "lr": 1e-3}, "routes": _muon_routes(model, 1e-3)}
    muon = build_optim_wrapper(model, cfg).optimizer["muon"]
    taken = [param for group in muon.param_groups for param in group["params"]]
    assert taken == [model[0].weight, model[2][0].weight]  # '0.weight' also names '2.0.weight': the last, left out


def test_a_config_that_is_not_utf8_or_holds_another_tasks_members_is_refused_in_a_line(tmp_path):
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{")
    args = build_parser().parse_args(["train", "--config", str(binary)])
    with pytest.raises(UsageError, match=r"is not UTF-8 text: invalid start byte at byte 0"):
        wrapper_config(args, make_task("classifier", seed=0, batch_size=64))
    gan = tmp_path / "gan.json"
    gan.write_text(json.dumps({"gen": {"optimizer": {"type": "SGD"}}, "disc": {"optimizer": {"type": "SGD"}}}))
    assert build_parser().parse_args(["train", "--config", str(gan)]).task == "gan"
    args = build_parser().parse_args(["train", "--config", str(gan), "--task", "classifier"])
    with pytest.raises(UsageError, match=r"holds the gan task's members \['disc', 'gen'\], and --task is classifier"):
        wrapper_config(args, make_task("classifier", seed=0, batch_size=64))


def test_dtype_and_threads_refusals_name_what_is_accepted(capsys):
    for options, message in [
        (
            ["--dtype", "float64"],
            "invalid choice: 'float64' (choose from 'fp32', 'bf16', 'fp16', 'float32', 'bfloat16', 'float16')",
        ),
        (["--threads", "3000000000"], "expected a thread count from 1 to 1024, got '3000000000'"),
    ]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", *options])
        assert message in capsys.readouterr().err
    assert build_parser().parse_args(["train", "--dtype", "bfloat16"]).dtype == "bf16"


def test_implementation_torch_leaves_torchs_default_as_runs_made_before_the_option():
    assert "implementation" not in config_of("--implementation", "torch")
    assert config_of("--implementation", "foreach")["implementation"] == "foreach"
    assert config_of("--implementation", "for-loop", task="gan")["gen"]["implementation"] == "for-loop"
