"""The engine-opt command: a default run, resume, the GAN task, and clear errors with exit status 2."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from engine_opt.app.cli import main

from oracle import assert_same_tensors

ROOT = Path(__file__).resolve().parents[2]

# every test here runs the command, in-process (main, build) or as a process of its own
pytestmark = pytest.mark.slow


def run(tmp_path, *args):
    return main(["train", "--no-progress", "--log-dir", str(tmp_path / "logs"), *args])


def test_the_default_run_trains_logs_checkpoints_and_summarises(tmp_path, capsys):
    assert run(tmp_path, "--epochs", "2") == 0
    out = capsys.readouterr().out
    assert "trained classifier to epoch 2 (128 iterations)" in out
    assert "updates:          128 applied, 0 skipped" in out
    assert f"tensorboard --logdir {tmp_path / 'logs'}" in out
    assert (tmp_path / "logs" / "checkpoints" / "checkpoint_128.pt").is_file()
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


def test_resuming_continues_the_run_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(straight, "--epochs", "3", "--dtype", "bf16") == 0
    assert run(split, "--epochs", "1", "--dtype", "bf16") == 0
    assert run(split, "--epochs", "3", "--dtype", "bf16", "--resume") == 0
    expected = torch.load(straight / "logs" / "checkpoints" / "checkpoint_192.pt", weights_only=True)
    actual = torch.load(split / "logs" / "checkpoints" / "checkpoint_192.pt", weights_only=True)
    assert_same_tensors(actual["model"], expected["model"])
    assert_same_tensors(actual["optim_wrapper"], expected["optim_wrapper"])


def test_a_sharded_checkpoint_planted_in_the_runs_directory_runs_nothing_on_resume(tmp_path, capsys):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    assert run(tmp_path, "--epochs", "1") == 0
    checkpoints = tmp_path / "logs" / "checkpoints"
    names = list(torch.load(checkpoints / "checkpoint_64.pt", weights_only=True))
    planted = checkpoints / "checkpoint_999"
    planted.mkdir()
    objects = {"objects": {name: {} for name in names if name != "model"}, "models": ["model"], "optimizers": []}
    torch.save(objects, planted / "objects.pt")  # every name of the run's, so a load gets to the metadata
    (planted / ".metadata").write_bytes(pickle.dumps(Payload()))  # DCP would read it with pickle.load
    assert run(tmp_path, "--epochs", "2", "--resume") == 0  # the command writes files: it resumes from its own
    assert not marker.exists()
    assert "resumed from" in capsys.readouterr().out


def test_gan_with_a_config_file(tmp_path, capsys):
    one = {"type": "AmpOptimWrapper", "dtype": "float16", "optimizer": {"type": "Adam", "lr": 1e-3}}
    config = tmp_path / "gan.json"
    config.write_text(json.dumps({"gen": one, "disc": {**one, "accumulative_counts": 2}}))
    assert run(tmp_path, "--task", "gan", "--epochs", "1", "--config", str(config), "--schedule", "cosine") == 0
    out = capsys.readouterr().out
    assert "gen_loss" in out and "disc_loss" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["--task", "mnist"], "argument --task: invalid choice: 'mnist'"),
        (["--dtype", "fp16", "--wrapper", "OptimWrapper"], "--dtype fp16 needs --wrapper AmpOptimWrapper"),
        (["--optimizer", "Adamm"], "the wrapper options: .*'Adamm'"),
        (["--clip-norm", "-1"], "argument --clip-norm: expected a finite positive number, got '-1'"),
        (["--task", "gan", "--num-items", "samples"], "--num-items samples: the gan task has no per-sample loss"),
    ],
)
def test_bad_options_exit_with_a_message(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err


def test_bad_config_files(tmp_path, capsys):
    config = tmp_path / "cfg.json"
    for text, message in [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
        ('{"optimizer": {"type": "SGD", "lr": 0.1}, "accumulative_counts": 0}', "accumulative_counts must be"),
    ]:
        config.write_text(text)
        with pytest.raises(SystemExit):
            run(tmp_path, "--config", str(config))
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tmp_path, "--config", str(tmp_path / "missing.json"))
    assert "cannot read" in capsys.readouterr().err
    config.write_text(json.dumps({"optimizer": {"type": "SGD", "lr": 0.1}}))
    with pytest.raises(SystemExit):
        run(tmp_path, "--config", str(config), "--task", "gan")
    assert "the gan task needs an OptimWrapperDict with members 'gen' and 'disc'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tmp_path, "--config", str(config), "--lr", "0.1")
    assert "--config holds the whole wrapper config; drop --lr" in capsys.readouterr().err


def test_an_earlier_run_is_not_overwritten_or_shortened(tmp_path, capsys):
    assert run(tmp_path, "--epochs", "1") == 0
    with pytest.raises(SystemExit):
        run(tmp_path, "--epochs", "2")
    assert "holds checkpoints of an earlier run; pass --resume" in capsys.readouterr().err
    assert run(tmp_path, "--epochs", "2", "--resume") == 0
    with pytest.raises(SystemExit):
        run(tmp_path, "--epochs", "1", "--resume")
    assert "--epochs 1 is less than the resumed run's 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(
            tmp_path,
            "--epochs",
            "3",
            "--resume",
            "--task",
            "gan",
            "--checkpoint-dir",
            str(tmp_path / "logs/checkpoints"),
        )
    assert "--resume:" in capsys.readouterr().err


def test_an_unwritable_log_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--no-progress", "--log-dir", str(tmp_path / "file" / "logs")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("engine-opt: error:") and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--device", "cuda")
    assert "no CUDA device is available here; use --device cpu" in capsys.readouterr().err


def test_python_dash_m():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "engine_opt", "--version"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("engine-opt 0.1.0")


@pytest.mark.parametrize(
    ("options", "differences"),
    [
        (["--batch-size", "32"], ["--batch-size 32, the checkpoint's 64"]),
        (
            ["--seed", "3", "--optimizer", "SGD"],
            [
                "\n  --seed 3, the checkpoint's 0\n",
                "\n  --optimizer (the wrapper config's 'optimizer.type'): 'SGD' here, 'AdamW' in the checkpoint",
            ],
        ),
        (
            ["--dtype", "float16"],  # torch's name for fp16
            [
                "\n  --wrapper (the wrapper config's 'type'): 'AmpOptimWrapper' here, 'OptimWrapper' in the checkpoint",
                "\n  --dtype (the wrapper config's 'dtype'): 'fp16' here, not set in the checkpoint",
            ],
        ),
        (["--schedule", "cosine"], ["--schedule cosine, the checkpoint's constant"]),
        (["--num-items", "samples"], ["--num-items samples, the checkpoint's off"]),
        (["--spike-guard", "skip"], ["--spike-guard skip, the checkpoint's off"]),
        (
            ["--implementation", "torch"],  # as a run made before the option: torch's default
            ["\n  --implementation (the wrapper config's 'implementation'): not set here, 'auto' in the checkpoint"],
        ),
    ],
)
def test_a_resume_with_other_options_is_refused_with_every_difference_listed(tmp_path, capsys, options, differences):
    assert run(tmp_path, "--epochs", "1") == 0
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--epochs", "2", "--resume", *options)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "this run differs from the checkpoint's" in err
    for difference in differences:
        assert difference in err


def test_a_run_made_before_the_implementation_option_resumes_with_implementation_torch(tmp_path, capsys):
    assert run(tmp_path, "--epochs", "1", "--implementation", "torch") == 0  # its config has no 'implementation'
    with pytest.raises(SystemExit):
        run(tmp_path, "--epochs", "2", "--resume")
    err = capsys.readouterr().err
    assert "--implementation (the wrapper config's 'implementation'): 'auto' here, not set" in err
    assert "(a checkpoint from before --implementation: resume it with --implementation torch)" in err
    assert run(tmp_path, "--epochs", "2", "--resume", "--implementation", "torch") == 0


def test_more_epochs_continue_a_constant_schedule_but_not_a_cosine_one(tmp_path, capsys):
    assert run(tmp_path / "constant", "--epochs", "1") == 0
    assert run(tmp_path / "constant", "--epochs", "2", "--resume") == 0
    assert run(tmp_path / "cosine", "--epochs", "1", "--schedule", "cosine") == 0
    with pytest.raises(SystemExit):
        run(tmp_path / "cosine", "--epochs", "2", "--resume", "--schedule", "cosine")
    assert "the cosine schedule was set for the checkpoint's 1 epochs" in capsys.readouterr().err


def test_sparse_adam_and_what_lbfgs_cannot_do_are_refused_like_other_unsupported_choices(tmp_path, capsys):
    for options, message in [
        (["--optimizer", "SparseAdam"], "needs sparse gradients"),
        (["--optimizer", "LBFGS", "--task", "gan"], "the gan task's step, which updates two models in turn"),
        (["--optimizer", "LBFGS", "--accumulate", "2"], "wrapper options: closure: a step that re-evaluates"),
        (["--optimizer", "LBFGS", "--dtype", "fp16"], "a float16 loss scale cannot go through"),
        (["--optimizer", "LBFGS", "--num-items", "samples"], "LBFGS re-evaluates one batch's mean loss"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path, *options)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_lbfgs_trains_the_classifier_one_closure_per_batch(tmp_path, capsys):
    config = ROOT / "examples" / "configs" / "classifier_lbfgs.json"
    assert run(tmp_path, "--epochs", "1", "--config", str(config), "--batch-size", "1024") == 0
    assert "updates:          4 applied, 0 skipped" in capsys.readouterr().out
    saved = torch.load(tmp_path / "logs" / "checkpoints" / "checkpoint_4.pt", weights_only=True)
    assert saved["optim_wrapper"]["optimizer_type"] == "LBFGS" and saved["optim_wrapper"]["state"]
    assert run(tmp_path, "--epochs", "2", "--config", str(config), "--batch-size", "1024", "--resume") == 0


def test_sam_trains_the_classifier_two_passes_per_update_and_resumes_bitwise(tmp_path, capsys):
    config = str(ROOT / "examples" / "configs" / "classifier_sam.json")
    assert run(tmp_path / "whole", "--epochs", "2", "--config", config) == 0
    assert run(tmp_path / "resumed", "--epochs", "1", "--config", config) == 0
    assert run(tmp_path / "resumed", "--epochs", "2", "--config", config, "--resume") == 0
    whole, resumed = (
        torch.load(path / "logs" / "checkpoints" / "checkpoint_128.pt", weights_only=True)
        for path in (tmp_path / "whole", tmp_path / "resumed")
    )
    assert_same_tensors(resumed["model"], whole["model"])
    assert "updates:          128 applied, 0 skipped" in capsys.readouterr().out
    assert run(tmp_path / "option", "--epochs", "1", "--sam", "0.05", "--dtype", "fp16") == 0


@pytest.mark.parametrize("options", [["--optimizer", "Muon"], ["--config", "classifier_muon.json"]])
def test_muon_beside_adamw_trains_the_classifier_and_resumes_bitwise(tmp_path, options):
    options = [
        str(ROOT / "examples" / "configs" / option) if option.endswith(".json") else option for option in options
    ]
    assert run(tmp_path / "whole", "--epochs", "2", *options) == 0
    assert run(tmp_path / "resumed", "--epochs", "1", *options) == 0
    assert run(tmp_path / "resumed", "--epochs", "2", *options, "--resume") == 0
    whole, resumed = (
        torch.load(path / "logs" / "checkpoints" / "checkpoint_128.pt", weights_only=True)
        for path in (tmp_path / "whole", tmp_path / "resumed")
    )
    assert_same_tensors(resumed, whole)
    assert whole["optim_wrapper"]["optimizer_type"] == "RoutedOptimizer(muon=Muon, default=AdamW)"


def test_muon_routes_each_gan_members_hidden_layers(tmp_path):
    assert run(tmp_path, "--epochs", "1", "--task", "gan", "--optimizer", "Muon") == 0
    saved = torch.load(tmp_path / "logs" / "checkpoints" / "checkpoint_64.pt", weights_only=True)
    gen = saved["optim_wrapper"]["gen"]
    assert gen["optimizer_type"] == "RoutedOptimizer(muon=Muon, default=AdamW)"
    assert [len(group["params"]) for group in gen["param_groups"]] == [2, 4]  # gen's two hidden weights; the rest


def test_what_sam_cannot_do_is_refused_by_the_command(tmp_path, capsys):
    for options, message in [
        (["--sam", "0.05", "--task", "gan"], "sam re-evaluates the model during its step, and the gan task's step"),
        (["--sam", "0.05", "--accumulate", "2"], "accumulative_counts=2 would need every micro-batch"),
        (["--sam", "-1"], "argument --sam: expected a finite positive number"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path, *options)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def command(cwd, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "engine_opt", "train", "--no-progress", "--accumulate", "3", *args]
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(("signal_number", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_command_with_a_checkpoint_it_resumes_from_exactly(tmp_path, signal_number, status):
    epochs, checkpoints = "20", tmp_path / "runs" / "classifier" / "checkpoints"
    with command(tmp_path, "--epochs", epochs, "--checkpoint-every", "100") as process:
        deadline = time.monotonic() + 300
        while not any(checkpoints.glob("checkpoint_*.pt")):  # training, past iteration 100
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
        process.send_signal(signal_number)
        out, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and out == ""
    stopped_at = int(lines[0].split(" at iteration ")[1].split(";")[0])
    assert lines[0] == (
        f"engine-opt: stopped by {signal.Signals(signal_number).name} at iteration {stopped_at}; saved "
        f"runs/classifier/checkpoints/checkpoint_{stopped_at}.pt; continue with the same options and --resume"
    )
    assert 100 <= stopped_at < 1280
    with command(tmp_path, "--epochs", epochs, "--checkpoint-every", "100", "--resume") as resumed:
        assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    (tmp_path / "straight").mkdir()
    with command(tmp_path / "straight", "--epochs", epochs, "--checkpoint-every", "100") as straight:
        assert straight.wait(timeout=300) == 0, straight.stderr.read()
    expected = torch.load(
        tmp_path / "straight" / checkpoints.relative_to(tmp_path) / "checkpoint_1280.pt", weights_only=True
    )
    actual = torch.load(checkpoints / "checkpoint_1280.pt", weights_only=True)
    for key in ("model", "optim_wrapper", "trainer"):
        assert_same_tensors(actual[key], expected[key], key)
    for key in ("position", "passes"):  # NumPy's generator, which the tasks do not use, starts unseeded
        assert actual["data"][key] == expected["data"][key]
    for stream in ("torch", "python"):
        assert_same_tensors(actual["data"]["rng"][stream], expected["data"]["rng"][stream], stream)


def test_a_second_ctrl_c_while_an_iteration_stalls_stops_at_once_with_what_is_saved(tmp_path, capsys):
    import threading

    from engine_opt.app import train as app_train

    make_task, calls = app_train.make_task, []

    def stalling_task(*args, **kwargs):
        task = make_task(*args, **kwargs)
        plain_loss = task.loss_fn

        def loss(prediction, target):
            calls.append(None)
            if len(calls) == 20:  # iteration 20 stalls; the user presses Ctrl-C, waits, presses it again

                def press_twice():
                    for _ in range(2):
                        time.sleep(0.3)
                        os.kill(os.getpid(), signal.SIGINT)

                threading.Thread(target=press_twice).start()
                time.sleep(60)
            return plain_loss(prediction, target)

        task.loss_fn = loss
        return task

    start = time.monotonic()
    with mock.patch.object(app_train, "make_task", stalling_task), pytest.raises(SystemExit) as end:
        run(tmp_path, "--epochs", "1", "--checkpoint-every", "8")
    assert end.value.code == 130 and time.monotonic() - start < 30
    newest = tmp_path / "logs" / "checkpoints" / "checkpoint_16.pt"
    assert capsys.readouterr().err == (
        "engine-opt: stopped at once by a second SIGINT during iteration 20, before it ended; the newest "
        f"checkpoint is {newest}; continue from it with --resume\n"
    )
    assert sorted(path.name for path in newest.parent.glob("*.pt")) == ["checkpoint_16.pt", "checkpoint_8.pt"]


def test_ctrl_c_before_training_ends_the_command_with_one_line_and_status_130(tmp_path, capsys):
    with mock.patch("engine_opt.app.train.make_task", side_effect=KeyboardInterrupt), pytest.raises(SystemExit) as end:
        run(tmp_path, "--epochs", "1")
    assert end.value.code == 130
    assert capsys.readouterr().err == (
        "engine-opt: interrupted by SIGINT outside the training loop; nothing was saved for it\n"
    )
    assert not (tmp_path / "logs").exists()


def test_ctrl_c_before_training_in_a_spawned_rank_is_an_error_not_a_stop_the_ranks_agreed_on(tmp_path, capsys):
    """Spawned ranks ignore SIGINT until training, so one raised there came from code: the rank fails (1)."""
    from engine_opt.app import cli

    args = cli.build_parser().parse_args(["train", "--no-progress", "--log-dir", str(tmp_path / "logs")])
    with mock.patch("engine_opt.app.train.make_task", side_effect=KeyboardInterrupt):
        assert cli._run(args, stop=mock.Mock(value=0)) == 1
    assert "interrupted by SIGINT outside the training loop" in capsys.readouterr().err


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out.split("\noptions:", 1)[1]
    blocks = re.split(r"\n  (?=--)", text)[1:]  # one block per option: its name, its help
    assert len(blocks) == 29  # with --sam, --threads, --log-every and --implementation
    for block in blocks:
        assert "default" in block, f"the help of {block.split()[0]} does not say its default"


@pytest.mark.parametrize(
    "config", sorted(ROOT.joinpath("examples", "configs").glob("*.json")), ids=lambda path: path.stem
)
def test_each_sample_config_trains(tmp_path, capsys, config):
    task = "gan" if config.stem.startswith("gan") else "classifier"
    assert run(tmp_path, "--task", task, "--epochs", "1", "--config", str(config)) == 0
    assert f"trained {task} to epoch 1" in capsys.readouterr().out


def test_a_new_run_is_refused_an_earlier_runs_log_directory(tmp_path, capsys):
    assert run(tmp_path, "--epochs", "1") == 0
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "elsewhere"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "holds the TensorBoard logs of an earlier run" in err and "--log-dir" in err
    events = sorted((tmp_path / "logs").glob("events.out.tfevents.*"))
    # --resume that finds no checkpoint where it looks starts no new run over the earlier run's curves either.
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--epochs", "2", "--resume", "--checkpoint-dir", str(tmp_path / "elsewhere"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--resume: no checkpoint in" in err and "--checkpoint-dir" in err
    assert sorted((tmp_path / "logs").glob("events.out.tfevents.*")) == events


def test_a_run_killed_before_its_first_checkpoint_is_started_over_by_resume(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run(tmp_path, "--epochs", "1") == 0
    for checkpoint in (tmp_path / "logs" / "checkpoints").glob("checkpoint_*.pt"):
        checkpoint.unlink()  # as a run SIGKILLed before its first checkpoint leaves it: its logs, no checkpoint
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--epochs", "1")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "it stopped before its first, or they were removed" in err
    assert "pass --resume to start that run over" in err
    mine = tmp_path / "mine"
    mine.mkdir()  # a user's empty directory proves no earlier run: that refusal says where the run saved
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--epochs", "1", "--checkpoint-dir", str(mine), "--resume")
    assert "pass the --checkpoint-dir that run saved to" in capsys.readouterr().err and mine.is_dir()
    assert run(tmp_path, "--epochs", "1", "--resume") == 0
    captured = capsys.readouterr()
    assert "starting the run from the start" in captured.err and "trained classifier to epoch 1" in captured.out
    accumulator = EventAccumulator(str(tmp_path / "logs"))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [*range(10, 61, 10), 64]  # drawn once


def test_a_damaged_newest_checkpoint_names_the_newest_that_reads_whole(tmp_path, capsys):
    assert run(tmp_path, "--epochs", "1", "--checkpoint-every", "16") == 0
    checkpoints = tmp_path / "logs" / "checkpoints"
    damaged = bytearray((checkpoints / "checkpoint_64.pt").read_bytes())
    damaged[len(damaged) // 2] ^= 1
    (checkpoints / "checkpoint_64.pt").write_bytes(damaged)
    before = sorted(path.name for path in checkpoints.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--epochs", "2", "--resume")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "checkpoint_64.pt is damaged" in err
    assert "checkpoint_48.pt is the newest that reads whole: move checkpoint_64.pt out of" in err
    assert "options of the interrupted run" not in err  # nothing about options: they were not the problem
    assert sorted(path.name for path in checkpoints.iterdir()) == before  # nothing deleted
    (checkpoints / "checkpoint_48.pt").write_bytes(damaged[:1000])  # the one before is damaged too
    with pytest.raises(SystemExit):
        run(tmp_path, "--epochs", "2", "--resume")
    assert "no other checkpoint in" in capsys.readouterr().err
    assert run(tmp_path, "--epochs", "1", "--checkpoint-every", "16", "--log-dir", str(tmp_path / "again")) == 0
    whole = (tmp_path / "again" / "checkpoints" / "checkpoint_48.pt").read_bytes()  # the same run, the same bytes
    (checkpoints / "checkpoint_32.pt").write_bytes(whole)  # 64 and 48 damaged, 32 whole
    (checkpoints / "checkpoint_48.pt").write_bytes(damaged)
    with pytest.raises(SystemExit):
        run(tmp_path, "--epochs", "2", "--resume")
    message = "checkpoint_32.pt is the newest that reads whole: move checkpoint_48.pt, checkpoint_64.pt out of"
    assert message in capsys.readouterr().err
    for name in ("checkpoint_32.pt", "checkpoint_64.pt"):
        (checkpoints / name).unlink()
    (checkpoints / "checkpoint_48.pt").write_bytes(whole)
    assert run(tmp_path, "--epochs", "2", "--resume") == 0
    assert f"resumed from:     {checkpoints / 'checkpoint_48.pt'}" in capsys.readouterr().out


def test_a_resume_mid_epoch_says_which_iterations_its_last_epoch_loss_covers(tmp_path, capsys):
    assert run(tmp_path, "--epochs", "1", "--checkpoint-every", "16") == 0
    (tmp_path / "logs" / "checkpoints" / "checkpoint_64.pt").unlink()  # as if stopped after iteration 48
    capsys.readouterr()
    assert run(tmp_path, "--epochs", "1", "--resume") == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "last epoch loss" in line)
    assert line.endswith("(its last 16 of 64 iterations: those run since the resume)")


def test_an_entry_named_like_a_checkpoint_is_refused_before_the_run_starts(tmp_path, capsys):
    (tmp_path / "logs" / "checkpoints" / "checkpoint_64.pt").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--epochs", "1")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "holds entries named like checkpoints that are none (checkpoint_64.pt (a directory))" in err
    assert [path.name for path in (tmp_path / "logs" / "checkpoints").glob("*checkpoint*")] == ["checkpoint_64.pt"]
    assert not list((tmp_path / "logs").glob("events.out.tfevents.*"))


def test_a_checkpoint_directory_ahead_of_the_run_is_one_line_not_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "engine_opt", "train", "--no-progress", "--log-dir", "logs", "--epochs"]
    assert subprocess.run([*argv, "1"], cwd=tmp_path, env=env, capture_output=True, timeout=300).returncode == 0
    checkpoints = tmp_path / "logs" / "checkpoints"
    (checkpoints / "checkpoint_64.pt").rename(checkpoints / "checkpoint_640.pt")  # named ahead of what it holds
    result = subprocess.run([*argv, "2", "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "engine-opt: error: logs/checkpoints holds checkpoints of later iterations than this run's 64 "
        "(checkpoint_640.pt): resume from the newest (resume_from_latest), or save to another directory"
    ]


def test_a_resumed_run_draws_each_curve_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run(tmp_path, "--epochs", "2", "--checkpoint-every", "100") == 0
    (tmp_path / "logs" / "checkpoints" / "checkpoint_128.pt").unlink()  # as if it died after iteration 100
    assert run(tmp_path, "--epochs", "2", "--checkpoint-every", "100", "--resume") == 0
    accumulator = EventAccumulator(str(tmp_path / "logs"))
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("train/loss")]
    assert steps == [*range(10, 121, 10), 128]  # 110, 120 and the last, 128, logged once, not twice


def test_a_batch_the_processes_do_not_divide_is_refused():
    from engine_opt.app import train as train_module

    args = build_parser_args("--batch-size", "3")
    with (
        pytest.raises(train_module.UsageError, match=r"--batch-size 3 .* must be a multiple of 2"),
        mock.patch.object(train_module, "world_size", lambda: 2),
    ):
        train_module.build(args)


def build_parser_args(*options):
    from engine_opt.app.cli import build_parser

    return build_parser().parse_args(["train", "--no-progress", "--log-dir", "unused", *options])


def test_the_progress_bar_of_two_float16_members_fits_120_columns():
    from engine_opt.handlers import attach_progress_bar

    args = build_parser_args("--task", "gan", "--dtype", "fp16", "--epochs", "1")
    from engine_opt.app.train import build

    run_ = build(args)
    shown = io.StringIO()
    attach_progress_bar(run_.trainer, run_.optim_wrapper, every=5, show_lr=False, file=shown, ncols=120)
    run_.trainer.run(run_.data, max_epochs=1)
    last = [line for line in shown.getvalue().replace("\r", "\n").split("\n") if "gen_loss" in line][-1]
    assert last.endswith("]") and "disc.scale=2^" in last, last  # nothing cut off at the end


@pytest.mark.parametrize("options", [["--task", "gan"], ["--accumulate", "4"]], ids=["gan", "accumulate4"])
def test_every_curve_of_the_command_shares_the_iteration_axis(tmp_path, options):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run(tmp_path, "--epochs", "2", *options) == 0
    accumulator = EventAccumulator(str(tmp_path / "logs"))
    accumulator.Reload()
    steps = {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    losses = [tag for tag in steps if tag.startswith("train/")]
    rates = [tag for tag in steps if "lr/" in tag]
    assert losses and rates
    for tag in losses:
        assert steps[tag] == [*range(10, 121, 10), 128], tag  # 128 iterations: every 10th, and the last
    for tag in rates:
        assert min(steps[tag]) == 0 and max(steps[tag]) == 128, (tag, steps[tag])  # the start, the end
        assert len(steps[tag]) >= 5, (tag, steps[tag])  # and the cadence between, on the same axis
    counts = [tag for tag in steps if tag.endswith("updates_applied")]
    assert len(counts) == (2 if "gan" in options else 1), counts
    for tag in counts:  # every member logged at the start, at each 10th update of its own, and at the end
        values = [event.value for event in accumulator.Scalars(tag)]
        assert values[0] == 0 and values[1:-1] == list(range(10, 10 * (len(values) - 2) + 1, 10)), (tag, values)
        assert len(values) >= 5 and values[-1] >= values[-2], (tag, values)


def test_the_logs_start_at_the_first_lr_and_end_at_the_last_on_the_chosen_cadence(tmp_path):
    from scalars import read_scalars

    assert run(tmp_path, "--epochs", "1", "--schedule", "cosine", "--log-every", "25", "--nonfinite", "skip") == 0
    scalars = read_scalars(tmp_path / "logs")
    lr = scalars["optim/lr/group_0"]
    assert [step for step, _ in lr] == [0, 25, 50, 64]
    assert lr[0][1] == pytest.approx(1e-3) and lr[-1][1] == pytest.approx(0.0, abs=1e-9)  # cosine: from lr to 0
    assert [step for step, _ in scalars["train/loss"]] == [25, 50, 64]
    assert [value for _, value in scalars["optim/updates_applied"]] == [0, 25, 50, 64]
    assert scalars["run/epoch"] == [(25, 1.0), (50, 1.0), (64, 1.0)]
    assert scalars["guard/nonfinite_skipped"] == [(25, 0.0), (50, 0.0), (64, 0.0)]
    speeds = [value for _, value in scalars["run/samples_per_second"]]
    assert len(speeds) == 3 and all(value > 0 for value in speeds)
    assert {tag.split("/")[0] for tag in scalars} == {"optim", "train", "run", "guard"}  # one prefix per kind


def test_the_spike_guards_counts_are_logged_per_member(tmp_path):
    from scalars import read_scalars

    assert run(tmp_path, "--epochs", "1", "--task", "gan", "--spike-guard", "skip") == 0
    scalars = read_scalars(tmp_path / "logs")
    for member in ("gen", "disc"):
        assert [step for step, _ in scalars[f"guard/spikes/{member}"]] == [*range(10, 61, 10), 64]
        assert any(tag.startswith(f"optim/{member}/lr/") for tag in scalars)


def test_verbose_shows_ignites_info_messages_and_puts_logging_back(tmp_path, capfd):
    import logging

    loggers = [logging.getLogger(name) for name in ("ignite", "torch")]
    before = [(logger.level, list(logger.handlers)) for logger in loggers]
    assert run(tmp_path, "--epochs", "1", "--log-dir", str(tmp_path / "quiet")) == 0
    assert "Engine run starting" not in capfd.readouterr().err
    assert run(tmp_path, "--epochs", "1", "--log-dir", str(tmp_path / "verbose"), "--verbose") == 0
    assert "INFO: Engine run starting with max_epochs=1" in capfd.readouterr().err
    assert [(logger.level, list(logger.handlers)) for logger in loggers] == before
    assert logging.root.manager.disable == logging.NOTSET


def test_a_batch_the_spawned_processes_do_not_divide_is_refused_before_they_start(tmp_path, capsys):
    from engine_opt.app import cli

    with (
        mock.patch.object(cli, "launch_ranks", side_effect=AssertionError("processes started")),
        pytest.raises(SystemExit) as exit_info,
    ):
        run(tmp_path, "--nproc-per-node", "3", "--batch-size", "64")
    assert exit_info.value.code == 2
    assert (
        "engine-opt: error: --batch-size 64 is the batch of one iteration over all 3 processes"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "logs").exists()


def test_a_config_read_from_a_pipe_is_read_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    config = (ROOT / "examples" / "configs" / "classifier_sam.json").read_text()
    argv = [sys.executable, "-m", "engine_opt", "train", "--no-progress", "--epochs", "1", "--config", "/dev/stdin"]
    result = subprocess.run(argv, input=config, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and "trained classifier to epoch 1" in result.stdout, result.stderr[-2000:]


def test_a_config_of_the_gans_members_selects_the_gan_task(tmp_path, capsys):
    assert run(tmp_path, "--epochs", "1", "--config", str(ROOT / "examples" / "configs" / "gan.json")) == 0
    assert "engine-opt: trained gan to epoch 1" in capsys.readouterr().out


def test_refused_options_leave_nothing_behind(tmp_path, capsys):
    gan_config = ROOT / "examples" / "configs" / "gan.json"
    mismatched = ["--config", str(gan_config), "--task", "classifier"]  # the GAN's members for the classifier
    for options in (mismatched, ["--optimizer", "SparseAdam"], ["--lr", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path, "--epochs", "1", *options)
        assert exit_info.value.code == 2, options
        assert not (tmp_path / "logs").exists(), options
    capsys.readouterr()


def test_num_items_samples_weights_each_update_by_its_windows_samples(tmp_path, capsys):
    """4096 samples in batches of 1000: windows of 2000, 2000 and the short last 96, each its samples' mean."""
    assert run(tmp_path, "--epochs", "1", "--batch-size", "1000", "--accumulate", "2", "--num-items", "samples") == 0
    assert "updates:          3 applied, 0 skipped" in capsys.readouterr().out
    from ignite.engine import Events

    from engine_opt.app.train import build

    built = build(build_parser_args("--batch-size", "1000", "--accumulate", "2", "--num-items", "samples"))
    built.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda engine: engine.terminate())
    built.trainer.run(built.data, max_epochs=1)  # stopped mid-window: the window's sample count is saved
    assert built.optim_wrapper.state_dict()["accumulated_items"] == 1000


def test_num_items_samples_shows_the_mean_loss_as_every_other_run_does(tmp_path, capsys):
    """The same updates (full batches: the mean over a batch's samples is the batch's mean loss): the same losses."""
    losses = []
    for name, options in (("mean", []), ("samples", ["--num-items", "samples"])):
        assert run(tmp_path / name, "--epochs", "1", "--batch-size", "64", *options) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if "last epoch loss" in line)
        losses.append(float(line.split()[-1]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-3), losses  # not the sum over 64 samples, 64 times more


@pytest.mark.parametrize(("status", "ignored"), [(130, True), (143, True), (1, False)])
def test_the_executable_ends_deaf_to_signals_once_a_signal_stopped_the_run(status, ignored):
    from engine_opt.app import cli

    previous = [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)]
    try:
        with mock.patch.object(cli, "main", side_effect=SystemExit(status)), pytest.raises(SystemExit) as end:
            cli.entry()
        assert end.value.code == status
        deaf = [signal.getsignal(number) is signal.SIG_IGN for number in (signal.SIGINT, signal.SIGTERM)]
        assert deaf == [ignored, ignored]  # a Ctrl-C while the stopped run's process shuts down prints nothing
    finally:
        for number, handler in zip((signal.SIGINT, signal.SIGTERM), previous, strict=True):
            signal.signal(number, handler)


def test_a_full_disk_under_the_tensorboard_logs_ends_the_command_with_one_line(tmp_path, capsys):
    import errno

    from tensorboard.summary.writer.record_writer import RecordWriter

    write, calls = RecordWriter.write, []

    def fill_up(self, data):  # the disk fills up after a while
        calls.append(None)
        if len(calls) > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    with mock.patch.object(RecordWriter, "write", fill_up), pytest.raises(SystemExit) as end:
        run(tmp_path, "--epochs", "3", "--checkpoint-every", "16")
    assert end.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    logs = tmp_path / "logs"
    assert err.startswith(f"engine-opt: error: [Errno 28] cannot write TensorBoard logs to {logs}: No space left")
    newest = int(err.split("checkpoint_")[1].split(".pt")[0])
    assert err.endswith(
        f"the newest checkpoint is {tmp_path / 'logs' / 'checkpoints'}/checkpoint_{newest}.pt "
        "(--resume continues from it)"
    )
    assert newest % 16 == 0 and (tmp_path / "logs" / "checkpoints" / f"checkpoint_{newest}.pt").is_file()


def test_a_ctrl_c_while_the_command_loads_ends_with_one_line_and_status_130(capsys):
    from engine_opt.app import start

    class Interrupted:  # a finder that is "loading" the command's modules when the Ctrl-C comes
        def find_spec(self, name, path=None, target=None):
            if name == "engine_opt.app.cli":
                raise KeyboardInterrupt
            return None

    with (
        mock.patch.dict(sys.modules),
        mock.patch.object(sys, "meta_path", [Interrupted(), *sys.meta_path]),
        mock.patch.object(sys, "argv", ["engine-opt", "train"]),
    ):
        sys.modules.pop("engine_opt.app.cli", None)
        with pytest.raises(SystemExit) as end:
            start.main()
    assert end.value.code == 130
    assert capsys.readouterr().err == "engine-opt: interrupted by SIGINT while starting; nothing was run\n"
    # what runs before that handler is light: torch and Ignite load after it, inside it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = "import sys, engine_opt.app.start; print(sorted({'torch', 'ignite'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout == "[]\n", result.stderr


@pytest.mark.parametrize(
    ("argv", "status", "said"),
    [
        (["--help"], 0, "Train with engine_opt's optimizer wrappers."),
        (["--version"], 0, "engine-opt 0.1.0"),
        (["train", "--help"], 0, "--nproc-per-node"),
        (["train", "--epochs", "0"], 2, "argument --epochs: expected a positive integer, got '0'"),
        (["train", "--dtype", "fp8"], 2, "argument --dtype: invalid choice: 'fp8'"),
    ],
)
def test_help_version_and_refused_arguments_answer_before_torch_loads(argv, status, said):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys\n"
        "from engine_opt.app.start import main\n"
        f"sys.argv = ['engine-opt', *{argv!r}]\n"
        "try:\n    main()\n"
        "except SystemExit as end:\n"
        "    print('loaded:', sorted({'torch', 'ignite'} & set(sys.modules)), file=sys.stderr)\n"
        "    raise\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == status and said in result.stdout + result.stderr
    assert "loaded: []" in result.stderr


def test_a_schedule_free_run_evaluates_and_resumes_in_eval_mode(tmp_path, capsys):
    config = str(ROOT / "examples" / "configs" / "classifier_schedulefree.json")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(straight, "--epochs", "2", "--config", config) == 0
    assert run(split, "--epochs", "1", "--config", config) == 0
    assert run(split, "--epochs", "2", "--config", config, "--resume") == 0
    expected = torch.load(straight / "logs" / "checkpoints" / "checkpoint_128.pt", weights_only=True)
    actual = torch.load(split / "logs" / "checkpoints" / "checkpoint_128.pt", weights_only=True)
    assert expected["optim_wrapper"]["param_groups"][0]["train_mode"] is False  # saved as it is meant
    assert_same_tensors(actual["model"], expected["model"])
    assert_same_tensors(actual["optim_wrapper"], expected["optim_wrapper"])


def test_a_directory_another_run_holds_is_refused_with_status_2_before_the_set_up(tmp_path, capsys):
    import filelock

    (tmp_path / "logs" / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "config-ran"
    config = tmp_path / "run.py"
    config.write_text(f"open({str(marker)!r}, 'w').close()\n")  # a set-up that would run the file leaves a mark
    other_run = filelock.FileLock(str(tmp_path / "logs" / "checkpoints" / ".engine_opt.lock"), timeout=0)
    with other_run, pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--config", str(config))
    assert exit_info.value.code == 2 and not marker.exists()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"engine-opt: error: {tmp_path / 'logs' / 'checkpoints'} is in use by another run")


def test_the_runs_options_are_its_hparams_and_each_member_its_own_branch_of_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from scalars import read_hparams, read_scalars

    assert run(tmp_path, "--task", "gan", "--epochs", "1", "--lr", "0.002", "--accumulate", "2") == 0
    values, metrics = read_hparams(tmp_path / "logs")
    assert metrics == ["train/gen_loss", "train/disc_loss"]
    assert values["task"] == "gan" and values["batch_size"] == 64 and values["epochs"] == 5 - 4
    assert values["wrapper.gen.optimizer.lr"] == values["wrapper.disc.optimizer.lr"] == 0.002
    assert values["wrapper.disc.accumulative_counts"] == 2 and values["wrapper.gen.optimizer.betas"] == "[0.5, 0.999]"
    assert not [path for path in (tmp_path / "logs").iterdir() if path.is_dir() and path.name != "checkpoints"]
    accumulator = EventAccumulator(str(tmp_path / "logs"))
    accumulator.Reload()
    assert "_hparams_/session_end_info" in accumulator.PluginTagToContent("hparams")  # ended well: written at the end
    tags = set(read_scalars(tmp_path / "logs"))
    assert {"optim/gen/lr/group_0", "optim/disc/lr/group_0", "optim/gen/updates_applied"} <= tags
    assert not [tag for tag in tags if ".lr" in tag or ".updates" in tag]
