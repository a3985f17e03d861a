"""SpikeGuard: spiking windows are dropped as if their batches were never seen; k in a row roll back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine_opt import AmpOptimWrapper, OptimEvents, OptimWrapper, OptimWrapperDict, create_trainer
from engine_opt.checkpoint import attach_checkpoint, load_checkpoint
from engine_opt.engine import ResumableLoader
from engine_opt.handlers import SchedulerHandler, SpikeGuard, SpikesPersist

from helpers import gan_step, make_amp_gan_wrappers
from oracle import (
    OPTIMIZERS,
    Plan,
    assert_same_model,
    assert_same_tensors,
    loss_fn,
    make_batches,
    make_gan,
    make_model,
    plain_loop,
)

N = 40


def spiked(batches, indices):
    """The batches with the targets of those at ``indices`` scaled by 1e3."""
    return [(x, y * 1e3) if index in indices else (x, y) for index, (x, y) in enumerate(batches)]


def without(batches, indices):
    return [batch for index, batch in enumerate(batches) if index not in indices]


def guarded_run(batches, optimizer_name="sgd_momentum", accumulate=1, **guard_kwargs):
    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS[optimizer_name](model.parameters()), accumulative_counts=accumulate)
    trainer = create_trainer(model, wrapper, loss_fn)
    guard_kwargs.setdefault("warmup", 5)
    if guard_kwargs.get("mode") == "rollback":
        guard_kwargs.setdefault("restore", {"model": model})
    guard = SpikeGuard(**guard_kwargs)
    guard.attach(trainer)
    trainer.run(batches)
    return model, wrapper, guard


def test_a_spike_is_a_skipped_update_that_schedules_do_not_advance_on():
    batches, spike = make_batches(N), 20
    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()))
    trainer = create_trainer(model, wrapper, loss_fn)
    SchedulerHandler(torch.optim.lr_scheduler.ExponentialLR(wrapper.optimizer, gamma=0.9)).attach(trainer)
    outcomes = []
    trainer.add_event_handler(OptimEvents.OPTIM_STEP_SKIPPED, lambda engine: outcomes.append(engine.state.iteration))
    SpikeGuard("skip", warmup=5).attach(trainer)
    trainer.run(spiked(batches, {spike}))
    expected = make_model()
    optimizer = OPTIMIZERS["sgd_momentum"](expected.parameters())
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    for x, y in without(batches, {spike}):  # the N-th applied update uses the N-th learning rate
        loss_fn(expected(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    assert_same_model(model, expected)
    assert (wrapper.skipped_steps, wrapper.applied_steps) == (1, N - 1)
    assert outcomes == [spike + 1]


def plain(batches, optimizer_name="sgd_momentum", accumulate=1):
    model = make_model()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    plain_loop(model, optimizer, batches, Plan(accumulate=accumulate))
    return model, optimizer


@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize(
    ("accumulate", "spikes", "dropped"), [(1, {12, 27}, {12, 27}), (2, {13, 26}, {12, 13, 26, 27})]
)
def test_skip_cancels_exactly_the_spiking_windows(optimizer_name, accumulate, spikes, dropped):
    batches = make_batches(N)
    model, wrapper, guard = guarded_run(spiked(batches, spikes), optimizer_name, accumulate, mode="skip")
    expected, expected_optimizer = plain(without(batches, dropped), optimizer_name, accumulate)
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict()["state"], expected_optimizer.state_dict()["state"])
    assert guard.spikes() == {None: len(spikes)}
    assert guard.rollbacks == 0
    assert guard.statistics()[None]["count"] == N // accumulate - len(spikes)


@pytest.mark.parametrize("watch", ["loss", "grad_norm"])
def test_each_watched_value_alone_catches_the_spike(watch):
    batches = make_batches(N)
    model, _, guard = guarded_run(spiked(batches, {20}), mode="skip", watch=watch)
    expected, _ = plain(without(batches, {20}))
    assert_same_model(model, expected)
    assert guard.spikes() == {None: 1}


def test_without_spikes_the_guard_changes_nothing():
    batches = make_batches(N)
    model, _, guard = guarded_run(batches, "adamw", mode="skip", warmup=2)
    expected, _ = plain(batches, "adamw")
    assert_same_model(model, expected)
    assert guard.spikes() == {None: 0}


def test_no_host_reads_in_the_per_update_path(monkeypatch):
    """Every way of reading a tensor on the host raises from the second iteration on."""
    batches = make_batches(N)
    model = make_model()
    # SGD: torch's single-tensor Adam reads its own step counter with item() (a CPU tensor, no device wait)
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()), accumulative_counts=2)
    trainer = create_trainer(model, wrapper, loss_fn)
    SpikeGuard("skip", warmup=3).attach(trainer)
    reads = []

    def refuse(self, *args, **kwargs):
        reads.append(trainer.state.iteration)
        raise AssertionError(f"a host read at iteration {trainer.state.iteration}")

    def forbid(_):
        for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, refuse)

    trainer.add_event_handler(Events.ITERATION_STARTED(once=2), forbid)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=N), lambda _: monkeypatch.undo())
    trainer.run(spiked(batches, {21}))
    assert reads == []
    expected, _ = plain(without(batches, {20, 21}), accumulate=2)
    assert_same_model(model, expected)


@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adamw"])
def test_k_spikes_in_a_row_roll_back_to_the_snapshot_and_skip_the_batches_since(optimizer_name):
    batches = make_batches(N)
    # snapshots after updates 5, 10, 15, 20; spikes at batches 21, 22, 23 (updates 22-24): back to update 20,
    # so batches 20-23 are never seen
    model, wrapper, guard = guarded_run(
        spiked(batches, {21, 22, 23}), optimizer_name, mode="rollback", k=3, check_every=1, snapshot_every=5
    )
    expected, expected_optimizer = plain(without(batches, {20, 21, 22, 23}), optimizer_name)
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict()["state"], expected_optimizer.state_dict()["state"])
    assert guard.rollbacks == 1
    assert guard.spikes() == {None: 3}
    assert wrapper.inner_count == N


def test_fewer_than_k_spikes_in_a_row_do_not_roll_back():
    batches = make_batches(N)
    model, _, guard = guarded_run(spiked(batches, {21, 22, 30}), mode="rollback", k=3, check_every=1, snapshot_every=5)
    expected, _ = plain(without(batches, {21, 22, 30}))
    assert_same_model(model, expected)
    assert (guard.rollbacks, guard.spikes()) == (0, {None: 3})


def test_rollback_checked_every_n_updates_still_sees_a_streak_that_ended():
    batches = make_batches(N)
    # the streak (updates 22-23, k=2) ends before the check after update 25; back to the snapshot after update 20
    model, _, guard = guarded_run(spiked(batches, {21, 22}), mode="rollback", k=2, check_every=5, snapshot_every=10)
    expected, _ = plain(without(batches, {20, 21, 22, 23, 24}))
    assert_same_model(model, expected)
    assert guard.rollbacks == 1


def test_counts_and_statistics_survive_a_rollback_to_the_start():
    batches = make_batches(N)
    # only the snapshot of the start (snapshot_every=100): spikes at batches 21-23 roll back to the initial
    # weights; the spikes at 26 and 27 right after are cancelled, with no new warm-up
    spikes = {21, 22, 23, 26, 27}
    model, wrapper, guard = guarded_run(
        spiked(batches, spikes), mode="rollback", k=3, check_every=1, snapshot_every=100
    )
    expected, expected_optimizer = plain(without(batches, set(range(24)) | spikes))
    assert_same_model(model, expected)
    assert_same_tensors(wrapper.optimizer.state_dict()["state"], expected_optimizer.state_dict()["state"])
    assert (guard.rollbacks, guard.spikes()) == (1, {None: 5})
    # every window stepped stays counted: 35 applied (21 of them undone by the rollback), 5 cancelled
    assert (wrapper.step_count, wrapper.applied_steps, wrapper.skipped_steps) == (N, N - 5, 5)
    assert guard.statistics()[None]["count"] == N - 5


@pytest.mark.parametrize("max_rollbacks", [0, 1])
def test_the_maximum_of_rollbacks_stops_the_run_at_its_last_good_state(max_rollbacks):
    batches = make_batches(N)
    spiking = spiked(batches, {11, 12, 21, 22})
    message = rf"after {max_rollbacks} rollback\(s\) \(max_rollbacks={max_rollbacks}\).*last good state"
    model = make_model()
    wrapper = OptimWrapper(OPTIMIZERS["sgd_momentum"](model.parameters()))
    trainer = create_trainer(model, wrapper, loss_fn)
    guard = SpikeGuard(
        "rollback",
        warmup=5,
        k=2,
        check_every=1,
        snapshot_every=5,
        max_rollbacks=max_rollbacks,
        restore={"model": model},
    )
    guard.attach(trainer)
    with pytest.raises(SpikesPersist, match=message):
        trainer.run(spiking)
    # the last snapshot before the trip: after update 10 (rollbacks=0, trip at batch 12) or 20 (after one
    # rollback to 10, which skipped batches 10-12)
    kept = set(range(10, N)) if max_rollbacks == 0 else set(range(10, 13)) | set(range(20, N))
    expected, _ = plain(without(batches, kept))
    assert_same_model(model, expected)
    assert isinstance(SpikesPersist("x"), RuntimeError)


@pytest.mark.slow  # the command, stopped by its guard
def test_the_command_stopped_by_its_spike_guard_saves_the_last_good_state_and_says_so(tmp_path, monkeypatch, capsys):
    from engine_opt.app import train as app_train
    from engine_opt.app.cli import build_parser, main

    make_task, calls = app_train.make_task, []

    def spiking_task(*args, **kwargs):
        task = make_task(*args, **kwargs)
        plain_loss = task.loss_fn

        def loss(prediction, target):  # four runs of spikes: three rollbacks, then the stop
            calls.append(None)
            scale = 1e3 if any(start <= len(calls) < start + 5 for start in (30, 50, 70, 90)) else 1.0
            return plain_loss(prediction, target) * scale

        task.loss_fn = loss
        return task

    monkeypatch.setattr(app_train, "make_task", spiking_task)
    options = ["train", "--no-progress", "--log-dir", str(tmp_path), "--spike-guard", "rollback", "--epochs", "3"]
    with pytest.raises(SystemExit) as stopped:
        main(options)
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "training stopped: SpikeGuard: 3 loss/gradient spikes in a row again at iteration 100" in err
    assert err.endswith(f"its last good state is saved in {tmp_path / 'checkpoints' / 'checkpoint_100.pt'}")
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint_100.pt", weights_only=True)
    start = app_train.build(build_parser().parse_args(options)).task.model.state_dict()
    assert_same_tensors(saved["model"], start)  # back at the snapshot of the start, the only one taken
    assert saved["spike_guard"]["rollbacks"] == 3 and saved["trainer"]["iteration"] == 100
    assert saved["optim_wrapper"]["counters"]["skipped_steps"] == 20
    monkeypatch.setattr(app_train, "make_task", make_task)  # the data is mended: the stopped run resumes
    assert main([*options, "--resume"]) == 0


@pytest.mark.parametrize(
    ("mode", "accumulate", "resume_at"),
    [("skip", 2, 11), ("rollback", 1, 23), ("rollback", 1, 11)],
)
def test_a_resumed_run_makes_the_decisions_of_the_uninterrupted_one(tmp_path, mode, accumulate, resume_at):
    batches = spiked(make_batches(N), {21, 22, 23, 33})

    def build():
        model = make_model()
        wrapper = OptimWrapper(OPTIMIZERS["adamw"](model.parameters()), accumulative_counts=accumulate)
        trainer = create_trainer(model, wrapper, loss_fn)
        guard = SpikeGuard(mode, warmup=5, k=3, check_every=1, snapshot_every=5, restore={"model": model})
        guard.attach(trainer)
        data = ResumableLoader(batches)
        return {"model": model, "optim_wrapper": wrapper, "trainer": trainer, "data": data, "spike_guard": guard}

    whole = build()
    attach_checkpoint(whole["trainer"], whole, tmp_path, every=resume_at, n_saved=None)
    whole["trainer"].run(whole["data"])

    resumed = build()
    load_checkpoint(resumed, tmp_path / f"checkpoint_{resume_at}.pt")
    resumed["trainer"].run(resumed["data"])
    assert_same_model(resumed["model"], whole["model"])
    assert_same_tensors(resumed["optim_wrapper"].state_dict(), whole["optim_wrapper"].state_dict())
    assert_same_tensors(resumed["spike_guard"].state_dict(), whole["spike_guard"].state_dict())
    assert resumed["spike_guard"].rollbacks == whole["spike_guard"].rollbacks == (1 if mode == "rollback" else 0)


def test_one_member_of_a_dict_is_guarded():
    batches = make_batches(N)
    bad = spiked(batches, {25})
    models = torch.nn.ModuleDict({"a": make_model(), "b": make_model()})
    wrappers = OptimWrapperDict(
        a=OptimWrapper(OPTIMIZERS["adamw"](models["a"].parameters())),
        b=OptimWrapper(OPTIMIZERS["sgd_momentum"](models["b"].parameters())),
    )

    def train_step(engine, batch):
        x, y = batch
        for name in ("a", "b"):
            with wrappers[name].optim_context(models[name]):
                loss = loss_fn(models[name](x), y)
            wrappers[name].update_params(loss)

    trainer = create_trainer(models, wrappers, train_step=train_step)
    guard = SpikeGuard("skip", warmup=5, members="a")
    guard.attach(trainer)
    trainer.run(bad)
    expected_a, _ = plain(without(batches, {25}), "adamw")
    expected_b, _ = plain(bad, "sgd_momentum")
    assert_same_model(models["a"], expected_a)
    assert_same_model(models["b"], expected_b)
    assert guard.spikes() == {"a": 1}


def test_float16_is_judged_on_unscaled_values_and_scaler_skips_are_not_spikes():
    batches = make_batches(N)
    x, y = batches[20]
    batches[20] = (x, y * 1e3)  # overflows float16 at this scale: the scaler skips it, it is no spike
    x, y = batches[30]
    batches[30] = (x, y * 10.0)  # a spike that float16 holds
    model = make_model()
    wrapper = AmpOptimWrapper(
        optimizer=OPTIMIZERS["adamw"](model.parameters()),
        dtype="fp16",
        loss_scale=dict(init_scale=2.0**10, growth_interval=10**6),
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    guard = SpikeGuard("skip", warmup=10)
    guard.attach(trainer)
    folded_losses = []

    def record(engine):
        if not wrapper.step_was_skipped:
            folded_losses.append(float(engine.state.output))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run(batches)
    stats = guard.statistics()[None]
    assert wrapper.skipped_steps == 2  # the scaler's and the spike
    assert guard.spikes() == {None: 1}
    assert stats["count"] == N - 2 == len(folded_losses)
    # below 100 windows the moving mean is the plain mean: of the unscaled losses folded in
    assert stats["loss_mean"] == pytest.approx(sum(folded_losses) / len(folded_losses), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"z": 0}, ValueError, r"z must be a finite number > 0, got 0"),
        ({"z": -1.5}, ValueError, r"z must be a finite number > 0, got -1.5"),
        ({"z": "3"}, TypeError, r"z must be a finite number > 0, got '3' of type str"),
        ({"k": 0}, ValueError, r"k must be a positive int, got 0"),
        ({"k": 1.5}, TypeError, r"k must be a positive int, got 1.5 of type float"),
        ({"warmup": -1}, ValueError, r"warmup must be an int >= 0, got -1"),
        ({"warmup": 2.0}, TypeError, r"warmup must be an int >= 0, got 2.0 of type float"),
        ({"mode": "undo"}, ValueError, r"mode must be one of \['skip', 'rollback'\], got 'undo'"),
        ({"decay": 1.0}, ValueError, r"decay must be a number in \[0, 1\), got 1.0"),
        ({"watch": "norm"}, ValueError, r"watch must be one or both of \['loss', 'grad_norm'\], got 'norm'"),
        ({"max_rollbacks": -1}, ValueError, r"max_rollbacks must be an int >= 0, got -1"),
        (
            {"check_every": 3, "snapshot_every": 10},
            ValueError,
            r"snapshot_every must be a multiple of check_every \(3\)",
        ),
        ({"mode": "rollback"}, ValueError, r"restore must name the objects a rollback restores"),
        ({"restore": {"model": 3}}, TypeError, r"restore\['model'\] must have state_dict\(\) and load_state_dict\(\)"),
        ({"members": []}, ValueError, r"members must name at least one member, or be None for all; got none"),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs, error, message):
    with pytest.raises(error, match=message):
        SpikeGuard(**kwargs)


def test_a_guard_attached_twice_is_refused_rather_than_counting_each_loss_twice():
    model = make_model()
    trainer = create_trainer(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01)), loss_fn)
    guard = SpikeGuard("skip", warmup=N)
    guard.attach(trainer)
    with pytest.raises(ValueError, match=r"engine: this SpikeGuard is attached already \(to Trainer at 0x"):
        guard.attach(trainer)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(float(engine.state.output)))
    trainer.run(make_batches(N))
    stats = guard.statistics()[None]
    assert stats["count"] == N
    assert stats["loss_mean"] == pytest.approx(sum(losses) / N, rel=1e-6)


def test_a_wrapper_in_restore_is_refused():
    wrapper = OptimWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"restore\['w'\] must not be the trainer, a wrapper or the data"):
        SpikeGuard("rollback", restore={"w": wrapper})


def test_unknown_members_are_refused_at_attach():
    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan)
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: gan_step(gan, wrappers, x))
    with pytest.raises(ValueError, match=r"members \['critic'\] are not members"):
        SpikeGuard(members="critic").attach(trainer)


def test_a_bad_state_dict_is_refused_and_nothing_changes():
    guard = SpikeGuard()
    good = guard.state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['windows'\] must be an int >= 0, got -3"):
        guard.load_state_dict({**good, "windows": -3})
    with pytest.raises(ValueError, match=r"state_dict\['members'\]\[0\] must be"):
        guard.load_state_dict({**good, "members": [[None, torch.zeros(3)]]})
    with pytest.raises(ValueError, match=r"lacks \['snapshot'\]"):
        guard.load_state_dict({key: value for key, value in good.items() if key != "snapshot"})
    assert_same_tensors(guard.state_dict(), good)


@pytest.mark.slow  # the command, three times
def test_the_command_with_spike_guard_checkpoints_the_guard_and_resumes_exactly(tmp_path, capsys):
    from engine_opt.app.cli import build_parser, main
    from engine_opt.app.train import build

    def run(where, *args):
        return main(["train", "--no-progress", "--log-dir", str(where / "logs"), "--spike-guard", "rollback", *args])

    args = build_parser().parse_args(["train", "--log-dir", str(tmp_path / "built"), "--spike-guard", "skip"])
    assert isinstance(build(args).to_save()["spike_guard"], SpikeGuard)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(straight, "--epochs", "2") == 0
    assert "trained classifier to epoch 2 (128 iterations)" in capsys.readouterr().out
    assert run(split, "--epochs", "1") == 0
    assert run(split, "--epochs", "2", "--resume") == 0
    expected = torch.load(straight / "logs" / "checkpoints" / "checkpoint_128.pt", weights_only=True)
    actual = torch.load(split / "logs" / "checkpoints" / "checkpoint_128.pt", weights_only=True)
    assert_same_tensors(actual["model"], expected["model"])
    assert_same_tensors(actual["spike_guard"], expected["spike_guard"])
    assert expected["spike_guard"]["windows"] == 128 and expected["spike_guard"]["snapshot"] is not None
    with pytest.raises(SystemExit):
        main(["train", "--spike-guard", "undo"])
    assert "--spike-guard: invalid choice: 'undo' (choose from" in capsys.readouterr().err


def test_summed_losses_are_judged_per_item():
    """With num_items the window's loss is a sum: a long, ordinary batch is no spike."""
    torch.manual_seed(0)
    true_w = torch.randn(8, 1)

    def batch(n):
        x = torch.randn(n, 8)
        return x, x @ true_w + 0.1 * torch.randn(n, 1)

    model = torch.nn.Linear(8, 1)
    with torch.no_grad():
        model.weight.copy_(true_w.T)
        model.bias.zero_()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    loss_sum = lambda y_pred, y: F.mse_loss(y_pred, y, reduction="sum")  # noqa: E731
    trainer = create_trainer(model, wrapper, loss_sum, num_items=lambda x, y: len(y))
    guard = SpikeGuard("skip", z=6.0, warmup=20, watch="loss")
    guard.attach(trainer)
    trainer.run([batch(8) for _ in range(60)] + [batch(256)])
    assert guard.spikes() == {None: 0}


def test_a_rollback_leaves_another_members_open_window_whole():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(dict(gen=torch.nn.Linear(4, 1), disc=torch.nn.Linear(4, 1)))
    wrappers = OptimWrapperDict(
        gen=OptimWrapper(torch.optim.SGD(model["gen"].parameters(), lr=0.01)),
        disc=OptimWrapper(torch.optim.SGD(model["disc"].parameters(), lr=0.01), accumulative_counts=2),
    )

    def step(engine, batch):
        x, y = batch
        gen_loss = F.mse_loss(model["gen"](x), y)
        wrappers["gen"].update_params(gen_loss)
        wrappers["disc"].update_params(F.mse_loss(model["disc"](x), y, reduction="sum"), num_items=len(y))
        return gen_loss.detach()

    trainer = create_trainer(model, wrappers, train_step=step)
    guard = SpikeGuard(
        "rollback", warmup=5, k=2, check_every=3, snapshot_every=3, members="gen", restore={"model": model}
    )
    guard.attach(trainer)
    generator, weights, data = torch.Generator().manual_seed(0), torch.randn(4, 1), []
    for index in range(40):
        x = torch.randn(8, 4, generator=generator)
        data.append((x, x @ weights * (1e3 if index in (20, 21, 22) else 1.0)))
    trainer.run(data)  # a snapshot taken mid-window of disc (with its item count) restores without an error
    assert guard.rollbacks == 1 and wrappers["disc"].step_count == 20  # its counts go on
