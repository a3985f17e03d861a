"""UpdateTelemetryHandler against a plain PyTorch loop that computes every norm by hand, step by step.

The oracle below imports nothing from engine_opt: per tensor ``torch.linalg.vector_norm``, then per group
(or layer prefix) the norm of those norms, in the group's order. On the CPU the handler's reduction order
is the same, so the values are compared bitwise (as float32 read back by TensorBoard, or as Python floats).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from ignite.engine import Events
from ignite.handlers.tensorboard_logger import TensorboardLogger

from engine_opt import AmpOptimWrapper, OptimWrapper, StepEvent, create_trainer
from engine_opt.handlers import UpdateTelemetryHandler, update_telemetry
from engine_opt.optim.foreach import fallback_norms, tensor_norms

from helpers import gan_step, make_amp_gan_wrappers
from oracle import loss_fn, make_batches, make_gan, make_model
from scalars import f32, read_scalars

MAX_NORM = 1.28  # fires on some measured updates of make_model/make_batches, not on all


def grouped_sgd(model):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.SGD(
        [{"params": weights, "name": "decay"}, {"params": biases, "lr": 0.2}], lr=0.1, momentum=0.9, weight_decay=0.01
    )


# --------------------------------------------------------------------------- the oracle


def norm_of(tensors):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def oracle_run(model, optimizer, batches, window, every, layers, max_norm=None, scaler=None):
    """A plain loop; for each measured update (by number): the values, by tag, computed by hand."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    labels = [group.get("name", f"group_{i}") for i, group in enumerate(optimizer.param_groups)]
    rows = [("", label, group["params"]) for label, group in zip(labels, optimizer.param_groups, strict=True)]
    for layer in layers:
        under = [p for p in params if names[id(p)] == layer or names[id(p)].startswith(layer + ".")]
        rows.append(("layer_", layer, under))
    measured, update, clipped = {}, 0, 0
    for i, (x, y) in enumerate(batches, 1):
        autocast = torch.autocast("cpu", dtype=torch.float16) if scaler else contextlib.nullcontext()
        with autocast:
            loss = loss_fn(model(x), y) / window
        (scaler.scale(loss) if scaler else loss).backward()
        if i % window:
            continue
        update += 1
        if scaler:
            scaler.unscale_(optimizer)
        grads = {id(p): p.grad.detach().clone() for p in params}
        before = {id(p): p.detach().clone() for p in params}
        total = None
        if max_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
        if update % every:
            continue
        values = {}
        for kind, label, group in rows:
            g = norm_of([grads[id(p)] for p in group]).item()
            u = norm_of([p.detach() - before[id(p)] for p in group]).item()
            w = norm_of([p.detach() for p in group]).item()
            values.update({f"{kind}grad_norm/{label}": g, f"{kind}update_norm/{label}": u})
            values.update({f"{kind}weight_norm/{label}": w, f"{kind}update_ratio/{label}": u / w})
        values["grad_norm_total"] = norm_of([grads[id(p)] for p in params]).item()
        if max_norm is not None:
            fired = max_norm / (total.item() + 1e-6) < 1.0
            clipped += fired
            values["clipped"] = float(fired)
            values["clip_rate"] = clipped / (update // every)
        if scaler:
            values["loss_scale"] = scaler.get_scale()
        measured[update] = values
    return measured


# --------------------------------------------------------------------------- the private helper


def test_torch_foreach_norm_is_there_and_agrees_with_the_public_fallback():
    """Fails when torch renames ``_foreach_norm``, changes its signature or what it computes."""
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(7, 3, generator=generator),
        torch.randn(5, generator=generator, dtype=torch.float64),
        torch.randn(2, 2, 2, generator=generator).transpose(0, 2),  # not contiguous
        torch.zeros(4),
        torch.randn((), generator=generator),
    ]
    assert hasattr(torch, "_foreach_norm")
    for ord in (2.0, float("inf"), 1.0):
        private = list(torch._foreach_norm(tensors, ord))
        public = fallback_norms(tensors, ord)
        assert len(private) == len(public) == len(tensors)
        for a, b in zip(private, public, strict=True):
            assert a.dtype == b.dtype and a.shape == () and torch.equal(a, b), ord
        assert all(torch.equal(a, b) for a, b in zip(tensor_norms(tensors, ord), public, strict=True))


def test_without_the_private_kernel_the_fallback_gives_the_same_values(monkeypatch):
    tensors = [torch.randn(9), torch.randn(3, 3)]
    expected = tensor_norms(tensors)
    monkeypatch.delattr(torch, "_foreach_norm")
    assert all(torch.equal(a, b) for a, b in zip(tensor_norms(tensors), expected, strict=True))
    assert tensor_norms([]) == []


# --------------------------------------------------------------------------- against the oracle


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "fp16"])
def test_every_value_equals_the_hand_computed_one_on_measured_updates_only(amp):
    batches = make_batches(12)
    model, reference = make_model(), make_model()
    optimizer = grouped_sgd(model)
    kwargs = dict(accumulative_counts=2, clip_grad={"max_norm": MAX_NORM})
    if amp:
        scale = {"init_scale": 256.0, "growth_interval": 2}
        wrapper = AmpOptimWrapper(optimizer=optimizer, dtype="fp16", loss_scale=scale, **kwargs)
        scaler = torch.amp.GradScaler("cpu", **scale)
    else:
        wrapper, scaler = OptimWrapper(optimizer, **kwargs), None
    telemetry = UpdateTelemetryHandler(wrapper, every=2, model=model, layers=["0", "3"])
    seen = {}
    for i, (x, y) in enumerate(batches, 1):
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)
        values = telemetry.read()
        if values:
            seen[i] = values
    expected = oracle_run(reference, grouped_sgd(reference), batches, 2, 2, ["0", "3"], MAX_NORM, scaler)
    assert sorted(seen) == [4, 8, 12]  # updates 2, 4, 6: the last micro-step of their windows
    assert sorted(expected) == [2, 4, 6]
    for (iteration, values), update in zip(sorted(seen.items()), sorted(expected), strict=True):
        assert values == expected[update], iteration  # bitwise, and the same tags
    assert [v["clip_rate"] for _, v in sorted(seen.items())] == [1.0, 1.0, 1.0]
    telemetry.close()


def test_nothing_is_computed_or_hooked_on_updates_that_are_not_measured(monkeypatch):
    calls = []
    real = update_telemetry.tensor_norms
    monkeypatch.setattr(update_telemetry, "tensor_norms", lambda *a: calls.append(1) or real(*a))
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    telemetry = UpdateTelemetryHandler(wrapper, every=3)
    hooked = []
    for i, (x, y) in enumerate(make_batches(7), 1):
        wrapper.update_params(loss_fn(model(x), y))
        hooked.append(any(wrapper._hooks.table(event) for event in StepEvent))
        if i in (3, 6):
            assert telemetry.read() != {}
        else:
            assert telemetry.read() == {}
        hooked.append(any(wrapper._hooks.table(event) for event in StepEvent))
    # After each update, then after each read: hooked from the read before a measured update until it.
    assert hooked == [False, False, False, True, False, False, False, False, False, True, False, False, False, False]
    assert len(calls) == 2 * 3  # grads, then weights and updates: on updates 3 and 6 alone
    telemetry.close()
    assert not any(wrapper._hooks.table(event) for event in StepEvent)


def test_a_skipped_float16_update_logs_nothing_and_the_next_measured_one_does():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = AmpOptimWrapper(optimizer=optimizer, dtype="fp16", loss_scale=256.0)
    telemetry = UpdateTelemetryHandler(wrapper, every=1)
    batches = make_batches(3)
    batches[1] = (torch.full_like(batches[1][0], float("inf")), batches[1][1])
    logged = []
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)
        logged.append(sorted(telemetry.read()))
    assert logged[0] and logged[2] and logged[1] == []
    assert wrapper.skipped_steps == 1
    telemetry.close()


# --------------------------------------------------------------------------- through the trainer and loggers


def test_through_the_trainer_tensorboard_gets_the_oracles_values_at_the_iterations_of_measured_updates(tmp_path):
    batches = make_batches(8)
    model, reference = make_model(), make_model()
    wrapper = OptimWrapper(grouped_sgd(model), accumulative_counts=2, clip_grad={"max_norm": MAX_NORM})
    trainer = create_trainer(model, wrapper, loss_fn)
    tb_logger = TensorboardLogger(log_dir=str(tmp_path))
    telemetry = UpdateTelemetryHandler(wrapper, every=2, model=model, depth=1)
    tb_logger.attach(trainer, log_handler=telemetry, event_name=Events.ITERATION_COMPLETED)
    trainer.run(batches)
    tb_logger.close()
    expected = oracle_run(reference, grouped_sgd(reference), batches, 2, 2, ["0", "1", "3"], MAX_NORM)
    scalars = read_scalars(tmp_path)
    assert set(scalars) == {f"telemetry/{tag}" for tag in expected[2]}
    for tag, history in scalars.items():
        key = tag.removeprefix("telemetry/")
        assert history == [(4, f32(expected[2][key])), (8, f32(expected[4][key]))], tag
    assert "telemetry/update_ratio/decay" in scalars and "telemetry/layer_weight_norm/1" in scalars


def test_a_dict_logs_each_member_with_its_prefix_and_the_scale(tmp_path):
    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale=64.0)
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: gan_step(gan, wrappers, x))
    tb_logger = TensorboardLogger(log_dir=str(tmp_path))
    telemetry = UpdateTelemetryHandler(wrappers, every=1, model=gan, layers=["gen", "disc"], tag=None)
    tb_logger.attach(trainer, log_handler=telemetry, event_name=Events.ITERATION_COMPLETED)
    trainer.run([x for x, _ in make_batches(4)])
    tb_logger.close()
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["gen/update_norm/group_0"]] == [1, 2, 3, 4]
    assert [step for step, _ in scalars["disc/update_norm/group_0"]] == [2, 4]  # accumulates 2
    assert "gen/layer_grad_norm/gen" in scalars and "disc/layer_grad_norm/disc" in scalars
    assert "gen/layer_grad_norm/disc" not in scalars  # a member measures its own parameters only
    assert [value for _, value in scalars["gen/loss_scale"]] == [64.0] * 4  # growth_interval 2000
    assert "disc/loss_scale" not in scalars and "gen/clipped" not in scalars


@pytest.mark.slow  # MLflow starts processes (git, uname) as it logs a run
def test_another_ignite_logger_gets_the_same_values(tmp_path, monkeypatch):
    """MLflow to a local file store, read back with MLflow's client: the values TensorBoard gets."""
    mlflow = pytest.importorskip("mlflow")
    from ignite.handlers.mlflow_logger import MLflowLogger
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("engine_opt")
    model = make_model()
    wrapper = OptimWrapper(grouped_sgd(model), clip_grad={"max_norm": MAX_NORM})
    trainer = create_trainer(model, wrapper, loss_fn)
    mlflow_logger, tb_logger = MLflowLogger(), TensorboardLogger(log_dir=str(tmp_path / "tb"))
    # One handler per logger: reading the values hands them to the logger that read them.
    mlflow_logger.attach(trainer, UpdateTelemetryHandler(wrapper, every=2), Events.ITERATION_COMPLETED)
    tb_logger.attach(trainer, UpdateTelemetryHandler(wrapper, every=2), Events.ITERATION_COMPLETED)
    try:
        trainer.run(make_batches(4))
        run_id = mlflow.active_run().info.run_id
    finally:
        mlflow_logger.close()
        tb_logger.close()
    client = MlflowClient(tracking_uri=uri)
    tensorboard = read_scalars(tmp_path / "tb")
    assert sorted(client.get_run(run_id).data.metrics) == sorted(
        t.replace("telemetry/", "telemetry ") for t in tensorboard
    )
    assert "telemetry/grad_norm/decay" in tensorboard and "telemetry/clip_rate" in tensorboard
    for tag, values in tensorboard.items():
        name = tag.replace("telemetry/", "telemetry ")
        assert [(m.step, f32(m.value)) for m in client.get_metric_history(run_id, name)] == values, tag
    assert [step for step, _ in tensorboard["telemetry/update_norm/decay"]] == [2, 4]
    assert [value for _, value in tensorboard["telemetry/clipped"]] == [1.0, 0.0]  # norms 2.39, then 0.94
    assert [value for _, value in tensorboard["telemetry/clip_rate"]] == [1.0, 0.5]


# --------------------------------------------------------------------------- bad input


def test_bad_arguments_name_the_argument_the_value_and_what_is_accepted():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"every must be a positive int, got 0"):
        UpdateTelemetryHandler(wrapper, every=0)
    with pytest.raises(TypeError, match=r"every must be a positive int, got '2' of type str"):
        UpdateTelemetryHandler(wrapper, every="2")
    with pytest.raises(TypeError, match=r"optim_wrapper must be an OptimWrapper or an OptimWrapperDict, got .*SGD"):
        UpdateTelemetryHandler(wrapper.optimizer)
    with pytest.raises(ValueError, match=r"layers: \['decoder'\] name no parameter .* such as \['0', '1', '3'\]"):
        UpdateTelemetryHandler(wrapper, model=model, layers=["0", "decoder"])
    with pytest.raises(TypeError, match=r"layers must be a list of module prefixes \(non-empty str\), got '0'"):
        UpdateTelemetryHandler(wrapper, model=model, layers="0")
    with pytest.raises(ValueError, match=r"layers=\['0'\] and depth=None need model="):
        UpdateTelemetryHandler(wrapper, layers=["0"])
    with pytest.raises(ValueError, match=r"give layers or depth, not both"):
        UpdateTelemetryHandler(wrapper, model=model, layers=["0"], depth=1)
    with pytest.raises(ValueError, match=r"depth must be a positive int, got 0"):
        UpdateTelemetryHandler(wrapper, model=model, depth=0)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module or None, got 'm' of type str"):
        UpdateTelemetryHandler(wrapper, model="m", depth=1)
    with pytest.raises(TypeError, match=r"tag must be a str or None, got 3 of type int"):
        UpdateTelemetryHandler(wrapper, tag=3)
    assert not any(wrapper._hooks.table(event) for event in StepEvent)  # nothing left hooked by a refusal


# --------------------------------------------------------------------------- the command


@pytest.mark.slow  # the command
def test_the_command_logs_the_telemetry_to_the_runs_tensorboard_directory(tmp_path):
    from engine_opt.app.cli import main

    assert (
        main(["train", "--no-progress", "--log-dir", str(tmp_path / "logs"), "--epochs", "1", "--telemetry", "20"]) == 0
    )
    scalars = read_scalars(tmp_path / "logs")
    assert [step for step, _ in scalars["telemetry/update_norm/group_0"]] == [20, 40, 60]  # 64 updates
    assert {"telemetry/layer_grad_norm/0", "telemetry/layer_update_ratio/3", "telemetry/grad_norm_total"} <= set(
        scalars
    )
    assert "optim/lr/group_0" in scalars  # OptimParamsHandler's, beside it


def test_the_command_logs_no_telemetry_without_the_option_and_refuses_a_bad_every(tmp_path, capsys):
    from engine_opt.app.cli import build_parser

    assert build_parser().parse_args(["train"]).telemetry is None
    assert build_parser().parse_args(["train", "--telemetry"]).telemetry == 10
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--telemetry", "0"])
    assert "--telemetry" in capsys.readouterr().err


def test_reads_less_often_than_updates_still_measure_every_measured_update():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    telemetry = UpdateTelemetryHandler(wrapper, every=3)
    logged = []
    for i, (x, y) in enumerate(make_batches(8), 1):
        wrapper.update_params(loss_fn(model(x), y))
        if i % 2 == 0:  # one check for two updates: the hook waits from the check before a measured update
            logged.append((i, bool(telemetry.read())))
    assert logged == [(2, False), (4, True), (6, True), (8, False)]  # updates 3 and 6
    telemetry.close()
    assert not any(wrapper._hooks.table(event) for event in StepEvent)


def test_every_set_after_construction_is_the_period_from_then_on():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    telemetry = UpdateTelemetryHandler(wrapper, every=4)
    telemetry.every = 1
    measured = []
    for i, (x, y) in enumerate(make_batches(5), 1):
        wrapper.update_params(loss_fn(model(x), y))
        if telemetry.read():
            measured.append(i)
    assert telemetry.every == 1
    assert measured == [2, 3, 4, 5]  # update 1 was not hooked: the read that set its hook came with the first update
    with pytest.raises(ValueError, match=r"every must be a positive int, got 0"):
        telemetry.every = 0
    telemetry.close()


def test_clipping_by_value_fired_when_a_gradient_was_beyond_the_value():
    model, reference = make_model(), make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), clip_grad={"type": "value", "clip_value": 0.5})
    telemetry = UpdateTelemetryHandler(wrapper, every=1)
    flags, expected = [], []
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in make_batches(4):
        wrapper.update_params(loss_fn(model(x), y))
        flags.append(telemetry.read()["clipped"])
        loss_fn(reference(x), y).backward()
        expected.append(float(max(p.grad.abs().max().item() for p in reference.parameters()) > 0.5))
        torch.nn.utils.clip_grad_value_(reference.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
    assert flags == expected and 1.0 in flags
    telemetry.close()


def test_a_measured_step_that_raises_leaves_nothing_stale_for_the_next_one():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    telemetry = UpdateTelemetryHandler(wrapper, every=1)

    def fail(wrapper, event, loss):
        raise RuntimeError("boom")

    batches = make_batches(3)
    wrapper.update_params(loss_fn(model(*batches[0][:1]), batches[0][1]))
    assert telemetry.read()
    handle = wrapper.register_step_hook(fail, [StepEvent.BEFORE_OPTIM_STEP])
    with pytest.raises(RuntimeError, match="boom"):
        wrapper.update_params(loss_fn(model(batches[1][0]), batches[1][1]))
    handle.remove()
    assert telemetry.read() == {}
    before = [p.detach().clone() for p in model.parameters()]
    wrapper.update_params(loss_fn(model(batches[2][0]), batches[2][1]))
    values = telemetry.read()
    change = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.detach() - b) for p, b in zip(model.parameters(), before, strict=True)])
    )
    assert values["update_norm/group_0"] == change.item()  # its own update: the failed step's snapshot is gone
    telemetry.close()
    assert not any(wrapper._hooks.table(event) for event in StepEvent)
