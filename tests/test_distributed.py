"""engine_opt.optim.distributed, and the wrappers and trainer in real 2-process runs (gloo, CPU).

tests/support/dist_worker.py runs the ranks; every scenario's result is compared
with the plain single-process loop of tests/support/oracle.py over the same global
batches, and the two ranks with each other.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_worker import (
    ACCUMULATE,
    CLIP_NORM,
    CLIP_VALUE,
    ITERATIONS,
    MUON_ADAMW_LR,
    MUON_LR,
    POISONED_ITERATION,
    SAM_RHO,
    SPIKE_ITERATIONS,
    SPIKED_ITERATION,
    global_batches,
    spike_batches,
    telemetry_reads,
)

from engine_opt.optim.distributed import all_ranks_agree, check_same_length, gather_objects
from engine_opt.testing import GradientTraffic

from oracle import (
    OPTIMIZERS,
    Plan,
    assert_same_tensors,
    loss_fn,
    make_model,
    plain_item_windows,
    plain_loop,
    sam_perturb,
)

ROOT = Path(__file__).resolve().parents[1]


def environment():
    """PYTHONPATH for the package, and a free port for the ranks to meet on (each launch its own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": pythonpath, "MASTER_PORT": str(port)}


def run_python(args, cwd=None):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=environment(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every scenario of tests/support/dist_worker.py once, in 2 processes; the results of rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("ranks")
    result = run_python([str(ROOT / "tests" / "support" / "dist_worker.py"), str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def single_process(batches, plan):
    """The plain loop over the global batches, in this process: what data parallelism must reproduce."""
    model = make_model()
    plain_loop(model, OPTIMIZERS["sgd_momentum"](model.parameters()), batches, plan)
    return [param.detach() for param in model.parameters()]


def assert_ranks_match_one_process(ranks, key, expected):
    assert_same_tensors(ranks[1][key]["params"], ranks[0][key]["params"])  # the ranks agree bitwise
    for actual, wanted in zip(ranks[0][key]["params"], expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6)  # rounding: sum of halves vs whole


@pytest.mark.slow
def test_ddp_reduces_gradients_once_per_window(ranks):
    windows = ITERATIONS // ACCUMULATE
    for rank in ranks:
        assert rank["ddp"]["calls"] == windows == 2
        assert rank["ddp_control"]["calls"] == ITERATIONS  # the counter does count every reduction
        assert rank["ddp"]["steps"] == windows
        assert rank["ddp"]["bytes"] == sum(p.numel() * 4 for p in make_model().parameters()) * windows
    expected = single_process(global_batches(), Plan(accumulate=ACCUMULATE, clip_norm=1.0))
    assert_ranks_match_one_process(ranks, "ddp", expected)


def sam_on_ranks(batches, local_perturbation):
    """SAM in this process as two ranks run it: each half of a batch perturbs the weights by its own first-pass
    gradient (or, for the control, by the whole batch's), the second passes' gradients are averaged."""
    model = make_model()
    optimizer = OPTIMIZERS["sgd_momentum"](model.parameters())
    for x, y in batches:
        halves = [(x[:3], y[:3]), (x[3:], y[3:])]
        second = []
        for hx, hy in halves:
            optimizer.zero_grad()
            first_x, first_y = (hx, hy) if local_perturbation else (x, y)
            loss_fn(model(first_x), first_y).backward()
            old = sam_perturb(list(model.parameters()), SAM_RHO, adaptive=False)
            optimizer.zero_grad()
            loss_fn(model(hx), hy).backward()
            second.append([param.grad.clone() for param in model.parameters()])
            for param, weight in old.items():
                param.data = weight
        for param, mine, theirs in zip(model.parameters(), *second, strict=True):
            param.grad = (mine + theirs) / 2
        optimizer.step()
        optimizer.zero_grad()
    return [param.detach() for param in model.parameters()]


@pytest.mark.slow
def test_ddp_sam_perturbs_by_each_ranks_gradient_and_reduces_only_the_second_pass(ranks):
    for rank in ranks:
        assert rank["ddp_sam"]["calls"] == ITERATIONS  # one reduction per update: the first pass stays local
        assert rank["ddp_sam"]["steps"] == ITERATIONS
    expected = sam_on_ranks(global_batches(), local_perturbation=True)
    assert_ranks_match_one_process(ranks, "ddp_sam", expected)
    control = sam_on_ranks(global_batches(), local_perturbation=False)  # the oracle tells the two apart
    assert any(not torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(expected, control, strict=True))


def muon_by_hand(batches):
    """Muon over the 2-D weights and AdamW over the rest, stepped by hand in one process, clipped as one."""
    model = make_model()
    matrices = [param for param in model.parameters() if param.ndim == 2]
    rest = [param for param in model.parameters() if param.ndim != 2]
    muon, adamw = torch.optim.Muon(matrices, lr=MUON_LR), torch.optim.AdamW(rest, lr=MUON_ADAMW_LR)
    for x, y in batches:
        loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for optimizer in (muon, adamw):
            optimizer.step()
            optimizer.zero_grad()
    return [param.detach() for param in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_muon_on_two_ranks_orthogonalises_whole_matrices_as_one_process(ranks, kind):
    key = f"{kind}_muon"
    rows = [param.shape for param in make_model().parameters() if param.ndim == 2]  # (8, 4) and (2, 8)
    for rank in ranks:
        assert rank[key]["type"] == "ShardedMuon"
        assert rank[key]["calls"] == ITERATIONS * len(rows) * (2 if kind == "fsdp2" else 1)
    if kind == "fsdp2":  # gathered in float32 and scattered in bfloat16, padded to 2 equal shards of ceil(n/2) rows
        padded = sum(2 * -(-n // 2) * m for n, m in rows)
        assert ranks[0][key]["bytes"] == ITERATIONS * padded * (4 + 2)
    else:  # broadcast in bfloat16
        assert ranks[0][key]["bytes"] == ITERATIONS * sum(n * m for n, m in rows) * 2
    expected = muon_by_hand(global_batches())
    assert_same_tensors(ranks[1][key]["params"], ranks[0][key]["params"])
    for actual, wanted in zip(ranks[0][key]["params"], expected, strict=True):
        # the averaged gradient rounds differently from one process's, and Newton-Schulz runs in bfloat16
        torch.testing.assert_close(actual, wanted, rtol=1e-3, atol=1e-4)
    untrained = list(make_model().parameters())
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(expected, untrained, strict=True))  # it did train


@pytest.mark.slow
def test_fsdp2_reduces_gradients_once_per_window(ranks):
    for rank in ranks:
        assert rank["fsdp2"]["calls"] == ITERATIONS // ACCUMULATE == 2
        assert rank["fsdp2_control"]["calls"] == ITERATIONS
    expected = single_process(global_batches(), Plan(accumulate=ACCUMULATE))
    assert_ranks_match_one_process(ranks, "fsdp2", expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "reductions"),
    [
        ("hsdp", ITERATIONS // ACCUMULATE),  # all-reduced across replicas once per window
        ("fsdp2_each_micro_step", ITERATIONS),  # reduce-scattered every micro-step: sharded, less memory
        ("hsdp_each_micro_step", ITERATIONS // ACCUMULATE),  # all-reduce still once per window (shard group of 1)
        ("ddp_each_micro_step", ITERATIONS),
    ],
)
def test_every_sharding_reduces_as_configured_and_trains_as_one_process(ranks, key, reductions):
    for rank in ranks:
        assert rank[key]["calls"] == reductions
    assert [rank["hsdp_control"]["calls"] for rank in ranks] == [ITERATIONS, ITERATIONS]
    assert_ranks_match_one_process(ranks, key, single_process(global_batches(), Plan(accumulate=ACCUMULATE)))


@pytest.mark.slow
@pytest.mark.parametrize("key", ["fsdp2_telemetry", "hsdp_telemetry", "mixed_telemetry"])
def test_telemetry_of_a_sharded_model_measures_whole_tensors_as_one_process(ranks, key):
    expected = telemetry_reads(make_model(), global_batches()[:3], clip=key != "mixed_telemetry")
    assert len(expected) == 4 and expected[0] == {} and "layer_update_norm/3" in expected[-1]
    for rank in ranks:
        reads = rank[key]["reads"]
        assert [sorted(read) for read in reads] == [sorted(read) for read in expected]
        for read, wanted in zip(reads, expected, strict=True):
            for tag, value in wanted.items():
                assert read[tag] == pytest.approx(value, rel=1e-5), tag


def single_process_norms(batches, accumulate, max_norm):
    """The plain loop with norm clipping, written out: each window's total gradient norm before clipping."""
    model, norms = make_model(), []
    optimizer = OPTIMIZERS["sgd_momentum"](model.parameters())
    for index, (x, y) in enumerate(batches):
        (loss_fn(model(x), y) / accumulate).backward()
        if (index + 1) % accumulate == 0:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            optimizer.step()
            optimizer.zero_grad()
    return norms


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "plan"),
    [
        ("fsdp2_clip_norm", Plan(accumulate=ACCUMULATE, clip_norm=CLIP_NORM)),
        ("fsdp2_clip_value", Plan(accumulate=ACCUMULATE, clip_value=CLIP_VALUE)),
    ],
)
def test_fsdp2_clips_by_the_global_norm_over_all_shards_as_one_process_does(ranks, key, plan):
    assert_ranks_match_one_process(ranks, key, single_process(global_batches(), plan))
    if plan.clip_norm is None:
        return
    expected = single_process_norms(global_batches(), ACCUMULATE, CLIP_NORM)
    assert min(expected) > CLIP_NORM  # every window is clipped
    for rank in ranks:  # grad_norm: the global norm, a plain tensor on every rank (not a DTensor)
        assert rank[key]["norm_types"] == ["Tensor"]
        torch.testing.assert_close(torch.stack(rank[key]["norms"]), torch.stack(expected), rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["ddp_num_items", "fsdp2_num_items"])
def test_num_items_across_ranks_equals_one_step_on_each_global_windows_items(ranks, key):
    """Ranks counting different items: each window's update is the mean over all the ranks' items."""
    batches = global_batches()
    windows = [batches[start : start + ACCUMULATE] for start in range(0, ITERATIONS, ACCUMULATE)]
    plan = Plan(clip_norm=1.0) if key == "ddp_num_items" else Plan()
    model = make_model()
    plain_item_windows(model, OPTIMIZERS["sgd_momentum"](model.parameters()), windows, plan)
    for rank in ranks:
        assert rank[key]["calls"] == ITERATIONS // ACCUMULATE  # gradients reduced once per window
    if key == "ddp_num_items":
        for rank in ranks:  # the count's all-reduce: one per window
            assert rank[key]["all_reduces"].count("torch.int64 ()") == ITERATIONS // ACCUMULATE, rank[key][
                "all_reduces"
            ]
    assert_ranks_match_one_process(ranks, key, [param.detach() for param in model.parameters()])


@pytest.mark.slow
def test_ranks_with_different_data_lengths_are_refused_on_every_rank_instead_of_hanging(ranks):
    for rank in ranks:
        assert "different lengths per epoch ([5, 6], by rank" in rank["uneven"]["error"]
    assert_same_tensors(ranks[1]["uneven"]["params"], ranks[0]["uneven"]["params"])
    assert_same_tensors(ranks[0]["uneven"]["params"], [p.detach() for p in make_model().parameters()])


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_skips_the_update_on_all_ranks(ranks):
    for rank in ranks:
        assert rank["guard"]["skipped"] == {None: 1}
        assert rank["guard"]["applied"] == ITERATIONS - 1
    batches = global_batches()
    del batches[POISONED_ITERATION - 1]  # as if the skipped window had never been seen
    assert_ranks_match_one_process(ranks, "guard", single_process(batches, Plan()))


@pytest.mark.slow
def test_a_spike_in_one_ranks_share_is_cancelled_on_every_rank(ranks):
    for rank in ranks:
        assert rank["spike"]["spikes"] == {None: 1}
        assert rank["spike"]["applied"] == SPIKE_ITERATIONS - 1
    batches = spike_batches()
    del batches[SPIKED_ITERATION - 1]  # as if the cancelled window had never been seen
    assert_ranks_match_one_process(ranks, "spike", single_process(batches, Plan()))


@pytest.mark.slow
def test_zero_redundancy_optimizer_state_is_consolidated_saved_once_and_loaded_by_every_rank(ranks):
    zero = [rank["zero"] for rank in ranks]
    n_params = len(list(make_model().parameters()))
    assert [z["local_states"] for z in zero] != [n_params, n_params]  # each rank holds only its shard
    assert sum(z["local_states"] for z in zero) == n_params
    for z in zero:
        assert z["path"] == "checkpoint_5.pt" and z["iteration"] == 5
        assert z["saved_states"] == n_params  # the file holds every parameter's state
        assert_same_tensors(z["loaded"], z["expected"])
    assert_same_tensors(zero[1]["params"], zero[0]["params"])


@pytest.mark.slow
def test_an_fsdp2_model_is_refused_by_the_single_file_checkpoint_with_the_sharded_one_named(ranks):
    for rank in ranks:
        assert "to_save['model'] has parameters sharded across ranks" in rank["fsdp2_file"]
        assert "use attach_sharded_checkpoint" in rank["fsdp2_file"]


def test_the_helpers_do_nothing_in_one_process():
    check_same_length(None)
    flag = torch.tensor(False)
    assert all_ranks_agree(flag) is flag
    assert gather_objects({"a": 1}) == [{"a": 1}]
    traffic = GradientTraffic(make_model())
    assert (traffic.calls, traffic.bytes) == (0, 0)


def engine_opt_train(*args, cwd):
    result = run_python(["-m", "engine_opt", "train", "--no-progress", "--nproc-per-node", "2", *args], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("options", [["--accumulate", "3"], ["--task", "gan", "--dtype", "fp16", "--accumulate", "3"]])
def test_a_two_process_run_resumed_mid_epoch_and_mid_window_ends_as_if_it_never_stopped(tmp_path, options):
    common = [*options, "--checkpoint-every", "25", "--log-dir"]
    straight = engine_opt_train("--epochs", "2", *common, "straight", cwd=tmp_path)
    assert "on 2 processes" in straight.stdout
    engine_opt_train("--epochs", "1", *common, "stopped", cwd=tmp_path)
    checkpoints = tmp_path / "stopped" / "checkpoints"
    (checkpoints / "checkpoint_64.pt").unlink()  # as if killed after iteration 50: mid-epoch, mid-window
    resumed = engine_opt_train("--epochs", "2", *common, "stopped", "--resume", cwd=tmp_path)
    assert "checkpoint_50.pt" in resumed.stdout
    expected = torch.load(tmp_path / "straight" / "checkpoints" / "checkpoint_128.pt", weights_only=True)
    actual = torch.load(checkpoints / "checkpoint_128.pt", weights_only=True)
    for key in ("model", "optim_wrapper"):
        assert_same_tensors(actual[key], expected[key], key)
    for key in ("position", "passes"):
        assert actual["data"][key] == expected["data"][key]
    assert len(expected["data"]["ranks"]) == 2
    for rank in (0, 1):  # each rank's own random stream (dropout, noise) continued where it was
        for generator in ("torch", "python"):
            assert_same_tensors(
                actual["data"]["ranks"][rank]["rng"][generator], expected["data"]["ranks"][rank]["rng"][generator]
            )
    assert not torch.equal(expected["data"]["ranks"][0]["rng"]["torch"], expected["data"]["ranks"][1]["rng"]["torch"])


@pytest.mark.slow
def test_the_command_runs_under_torchrun(tmp_path):
    env = environment()
    args = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", env["MASTER_PORT"]]
    result = subprocess.run(
        [sys.executable, *args, "-m", "engine_opt", "train", "--epochs", "1", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained classifier to epoch 1 (64 iterations)" in result.stdout and "on 2 processes" in result.stdout
    assert result.stdout.count("engine-opt: trained") == 1  # rank 0 alone prints the summary


def torchrun_node(cwd, node_rank, port, *options):
    """One node of a 2-node ``torchrun`` launch on this machine: 2 ranks, meeting the other node at 127.0.0.1:port."""
    cwd.mkdir()
    launch = ["-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank), "--nproc-per-node", "2"]
    rendezvous = ["--master-addr", "127.0.0.1", "--master-port", port]
    argv = [sys.executable, *launch, *rendezvous, "-m", "engine_opt", "train", "--no-progress", *options]
    return subprocess.Popen(argv, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_nodes_of_two_ranks_under_torchrun_train_as_four_processes_on_one_node(tmp_path):
    options = ["--epochs", "1", "--accumulate", "2", "--checkpoint-every", "32"]
    port = environment()["MASTER_PORT"]
    nodes = [torchrun_node(tmp_path / f"node{rank}", rank, port, *options) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert "trained classifier to epoch 1 (64 iterations)" in outputs[0][0] and "on 4 processes" in outputs[0][0]
    assert outputs[1][0] == ""  # global rank 0, on node 0, alone reports and writes
    assert not (tmp_path / "node1" / "runs").exists()
    one_node = run_python(["-m", "engine_opt", "train", "--no-progress", "--nproc-per-node", "4", *options], tmp_path)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    checkpoints = Path("runs") / "classifier" / "checkpoints" / "checkpoint_64.pt"
    two_nodes = torch.load(tmp_path / "node0" / checkpoints, weights_only=True)
    expected = torch.load(tmp_path / checkpoints, weights_only=True)
    for key in ("model", "optim_wrapper", "trainer"):  # the same 4 ranks on the same global batches
        assert_same_tensors(two_nodes[key], expected[key], key)
    assert (two_nodes["data"]["position"], two_nodes["data"]["passes"]) == (64, 1)
    assert len(two_nodes["data"]["ranks"]) == len(expected["data"]["ranks"]) == 4
    for saved, wanted in zip(two_nodes["data"]["ranks"], expected["data"]["ranks"], strict=True):
        for stream in ("torch", "python"):  # NumPy's, which the tasks do not use, starts unseeded
            assert_same_tensors(saved["rng"][stream], wanted["rng"][stream], stream)


@contextlib.contextmanager
def two_process_run(cwd, epochs=100_000, started=None):
    """``engine-opt train`` in 2 processes, in a session of its own (a terminal's Ctrl-C reaches its whole group).

    Yields the launcher once ``started(launcher)`` holds (by default: once it has saved a checkpoint); kills the
    whole group if it still runs when the test ends.
    """
    argv = [sys.executable, "-m", "engine_opt", "train", "--no-progress", "--nproc-per-node", "2"]
    process = subprocess.Popen(
        [*argv, "--epochs", str(epochs), "--checkpoint-every", "50"],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    checkpoints = cwd / "runs" / "classifier" / "checkpoints"
    started = started or (lambda launcher: any(checkpoints.glob("checkpoint_*.pt")))
    try:
        deadline = time.monotonic() + 300
        while not started(process):
            assert process.poll() is None and time.monotonic() < deadline, "the run never got there"
            time.sleep(0.01)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
        process.stderr.close()


def running(pid):
    """Whether a process runs (an ended one not yet reaped is a zombie: state Z)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rank_processes(launcher_pid):
    """The PIDs of the processes the launcher spawned for the ranks (not its resource tracker)."""
    ranks = []
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher_pid and b"spawn_main" in command:
            ranks.append(int(entry.name))
    return sorted(ranks)


def assert_stopped_with_a_checkpoint(launcher, cwd, name="SIGINT"):
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.Signals[name], err[-2000:]
    line = [line for line in err.splitlines() if line.startswith("engine-opt:")]
    assert len(line) == 1 and f"stopped by {name} at iteration" in line[0] and "Traceback" not in err, err[-2000:]
    assert " INFO: " not in err  # no launcher dumps without --verbose
    assert "Terminating process" not in err  # the ranks ended together: none was killed for ending first
    stopped_at = int(line[0].split(" at iteration ")[1].split(";")[0])
    saved = torch.load(cwd / "runs/classifier/checkpoints" / f"checkpoint_{stopped_at}.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == stopped_at
    return stopped_at


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_the_same_iteration_with_a_checkpoint(tmp_path):
    with two_process_run(tmp_path) as launcher:
        os.killpg(launcher.pid, signal.SIGINT)
        assert assert_stopped_with_a_checkpoint(launcher, tmp_path) >= 50


@pytest.mark.slow
def test_sigterm_to_the_launcher_alone_stops_every_rank_with_a_checkpoint(tmp_path):
    with two_process_run(tmp_path) as launcher:
        os.kill(launcher.pid, signal.SIGTERM)  # as kill PID or a supervisor does: the ranks do not receive it
        assert assert_stopped_with_a_checkpoint(launcher, tmp_path, "SIGTERM") >= 50


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_ranks_save_does_not_kill_them(tmp_path):
    with two_process_run(tmp_path) as launcher:
        os.killpg(launcher.pid, signal.SIGINT)
        time.sleep(0.5)  # the ranks stopped at the iteration's end: they save and end
        os.killpg(launcher.pid, signal.SIGINT)
        assert assert_stopped_with_a_checkpoint(launcher, tmp_path) >= 50


@pytest.mark.slow
def test_ranks_whose_launcher_is_killed_while_they_start_stop_with_a_checkpoint_rather_than_train_on(tmp_path):
    """Killed in training, torch's parent-death SIGINT stops them; while they start they ignore it, so they
    stop at their first iteration on seeing their launcher gone."""
    with two_process_run(tmp_path, epochs=3, started=lambda launcher: len(rank_processes(launcher.pid)) == 2) as run:
        ranks = rank_processes(run.pid)
        time.sleep(0.5)  # the ranks import
        os.kill(run.pid, signal.SIGKILL)
        _, err = run.communicate(timeout=120)  # the ranks hold its output pipes until they end
    assert not [rank for rank in ranks if running(rank)]
    line = [line for line in err.splitlines() if line.startswith("engine-opt:")]
    assert len(line) == 1 and "stopped by SIGTERM at iteration 1;" in line[0], err[-2000:]
    assert (tmp_path / "runs/classifier/checkpoints/checkpoint_1.pt").exists()


@pytest.mark.slow
def test_ctrl_c_while_the_ranks_start_is_not_lost_it_stops_them_at_the_first_iteration(tmp_path):
    with two_process_run(tmp_path, epochs=3, started=lambda launcher: len(rank_processes(launcher.pid)) == 2) as run:
        time.sleep(0.5)  # the ranks import for seconds yet; the launcher notes SIGINT for them within milliseconds
        os.killpg(run.pid, signal.SIGINT)  # the ranks ignore it while they start; the launcher notes it for them
        assert assert_stopped_with_a_checkpoint(run, tmp_path) == 1


@pytest.mark.slow
def test_a_killed_rank_ends_the_launcher_with_one_line_naming_it_and_the_signal(tmp_path):
    with two_process_run(tmp_path) as launcher:
        ranks = rank_processes(launcher.pid)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGKILL, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert re.match(r"engine-opt: rank [01] was killed by SIGKILL; the run stopped there", last), last


RESHARD_WORKER = ROOT / "tests" / "support" / "reshard_worker.py"


def reshard_run(kind, processes, directory, out, stop=None):
    args = [str(RESHARD_WORKER), kind, str(processes), str(directory), str(out)]
    result = run_python([*args, *([] if stop is None else [str(stop)])])
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def reshard_oracle(kind):
    """The plain loop over the DistributedSampler's global batches, written out: one process, no sampler."""
    from reshard_worker import ACCUMULATE, EPOCHS, GLOBAL_BATCH, LR, SAMPLES, SEED, dataset

    x, y, _ = dataset().tensors
    model = make_model()
    if kind == "fsdp2_muon":
        matrices = [param for param in model.parameters() if param.ndim == 2]
        muon = torch.optim.Muon(matrices, lr=LR)
        adamw = torch.optim.AdamW([param for param in model.parameters() if param.ndim != 2], lr=LR)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR) if kind != "fsdp2_muon" else None
    iteration = 0
    for epoch in range(EPOCHS):
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(SEED + epoch))
        for start in range(0, SAMPLES, GLOBAL_BATCH):
            batch = order[start : start + GLOBAL_BATCH]
            (loss_fn(model(x[batch]), y[batch]) / ACCUMULATE).backward()
            iteration += 1
            if iteration % ACCUMULATE == 0:
                for each in (optimizer,) if optimizer is not None else (muon, adamw):
                    each.step()
                    each.zero_grad()
    return list(model.parameters())


def samples_per_epoch(first, resumed, resumed_at):
    """How often each sample was trained on in each epoch, by the first run up to its checkpoint, then the resumed."""
    from reshard_worker import GLOBAL_BATCH, SAMPLES

    per_epoch = SAMPLES // GLOBAL_BATCH
    counts = torch.zeros(2, SAMPLES, dtype=torch.int64)
    batches = [pair for rank in first["seen"] for pair in rank if pair[0] <= resumed_at]
    batches += [pair for rank in resumed["seen"] for pair in rank]
    for iteration, ids in batches:
        counts[(iteration - 1) // per_epoch, ids] += 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "first", "then"),
    [
        ("fsdp2", 2, 2),  # sharded checkpoints through DCP: on as many processes, bitwise
        ("fsdp2", 2, 1),  # resharded
        ("fsdp2", 2, 3),
        ("fsdp2", 1, 2),
        ("fsdp2_muon", 2, 2),  # Muon's matrices gathered whole: resumed bitwise, and on another count
        ("fsdp2_muon", 2, 1),
        ("ddp", 2, 3),  # one file; mid-window: each new rank takes the mean of the saved ranks' gradient sums
        ("ddp", 2, 1),
        ("ddp", 1, 2),
        ("zero", 2, 3),  # the consolidated optimizer state, partitioned anew
    ],
)
def test_a_run_resumed_on_another_number_of_processes_trains_as_one_process_and_sees_each_sample_once(
    tmp_path, kind, first, then
):
    stopped = reshard_run(kind, first, tmp_path / "checkpoints", tmp_path / "first.pt", stop=5)
    resumed = reshard_run(kind, then, tmp_path / "checkpoints", tmp_path / "resumed.pt")
    # DDP saves mid-window (iteration 5); a sharded checkpoint waits for the window's end, so the newest is of 4
    sharded = kind.startswith("fsdp2")
    resumed_at = 4 if sharded else 5
    assert stopped["resumed"] is None and resumed["resumed"] == ("checkpoint_4" if sharded else "checkpoint_5.pt")
    assert len(resumed["seen"]) == then
    assert samples_per_epoch(stopped, resumed, resumed_at).eq(1).all()
    for actual, expected in zip(resumed["params"], reshard_oracle(kind), strict=True):
        # rounding only: the per-rank means of 2, 3 or 6 samples averaged across ranks vs one mean of 6 (and for
        # Muon, which orthogonalises in bfloat16, the rounding it meets there)
        tolerance = {"rtol": 1e-3, "atol": 1e-4} if kind == "fsdp2_muon" else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(actual, expected, **tolerance)
    if first == then:
        straight = reshard_run(kind, first, tmp_path / "straight", tmp_path / "straight.pt")
        assert_same_tensors(resumed["params"], straight["params"])


@pytest.mark.slow
def test_the_command_resumes_on_another_number_of_processes_mid_window(tmp_path):
    common = ["--accumulate", "3", "--checkpoint-every", "25", "--log-dir", "run"]
    engine_opt_train("--epochs", "1", *common, cwd=tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "checkpoint_64.pt").unlink()  # as if killed after iteration 50: mid-epoch, mid-window
    one = run_python(["-m", "engine_opt", "train", "--no-progress", "--epochs", "2", *common, "--resume"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "checkpoint_50.pt" in one.stdout and "on 2 processes" not in one.stdout
    resumed = torch.load(checkpoints / "checkpoint_128.pt", weights_only=True)
    assert (resumed["data"]["position"], resumed["data"]["passes"]) == (64, 2) and "ranks" not in resumed["data"]
    four = engine_opt_train("--epochs", "3", *common, "--resume", "--nproc-per-node", "4", cwd=tmp_path)
    assert "on 4 processes" in four.stdout
    assert len(torch.load(checkpoints / "checkpoint_192.pt", weights_only=True)["data"]["ranks"]) == 4
