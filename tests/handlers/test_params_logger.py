"""OptimParamsHandler: tags and values read back from TensorBoard's event files."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from ignite.handlers.tensorboard_logger import TensorboardLogger

from engine_opt import AmpOptimWrapper, OptimEvents, OptimWrapper, build_optim_wrapper, create_trainer
from engine_opt.handlers import OptimParamsHandler, SchedulerHandler, optim_scalars

from helpers import gan_step, make_amp_gan_wrappers
from oracle import loss_fn, make_batches, make_gan, make_model
from recording_logger import RecordingLogger
from scalars import f32, read_scalars


def test_logs_the_values_each_update_used(tmp_path):
    model = make_model()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizer = torch.optim.SGD(
        [{"params": decay}, {"params": no_decay, "lr": 0.4, "momentum": 0.5}], lr=0.2, momentum=0.9
    )
    wrapper = AmpOptimWrapper(
        optimizer=optimizer,
        dtype="fp16",
        loss_scale={"init_scale": 256.0, "growth_interval": 1},
        accumulative_counts=2,
        clip_grad={"max_norm": 1e6},
    )
    trainer = create_trainer(model, wrapper, loss_fn)
    SchedulerHandler(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)).attach(trainer)  # first
    norms = []
    trainer.add_event_handler(OptimEvents.OPTIM_STEP_COMPLETED, lambda engine: norms.append(wrapper.grad_norm.item()))
    tb_logger = TensorboardLogger(log_dir=str(tmp_path))
    tb_logger.attach(
        trainer,
        log_handler=OptimParamsHandler(wrapper, tag="train"),
        event_name=OptimEvents.OPTIM_STEP_COMPLETED(every=2),
    )
    trainer.run(make_batches(8))
    tb_logger.close()

    scalars = read_scalars(tmp_path)
    assert set(scalars) == {
        "train/base_lr",
        "train/lr/group_0",
        "train/lr/group_1",
        "train/momentum/group_0",
        "train/momentum/group_1",
        "train/weight_decay/group_0",
        "train/weight_decay/group_1",
        "train/loss_scale",
        "train/updates_applied",
        "train/updates_skipped",
        "train/grad_norm",
    }
    # Updates 2 and 4 (at iterations 4 and 8, the x-axis) used lr * 0.5**1 and lr * 0.5**3: the scheduler
    # moves after the logger.
    assert scalars["train/lr/group_0"] == [(4, f32(0.2 * 0.5)), (8, f32(0.2 * 0.5**3))]
    assert scalars["train/lr/group_1"] == [(4, f32(0.4 * 0.5)), (8, f32(0.4 * 0.5**3))]
    assert scalars["train/base_lr"] == [(4, f32(0.2 * 0.5)), (8, f32(0.2 * 0.5**3))]  # as get_lr() gives it
    assert scalars["train/momentum/group_1"] == [(4, 0.5), (8, 0.5)]
    assert scalars["train/weight_decay/group_0"] == [(4, 0.0), (8, 0.0)]
    assert scalars["train/updates_applied"] == [(4, 2.0), (8, 4.0)]
    assert scalars["train/updates_skipped"] == [(4, 0.0), (8, 0.0)]
    assert scalars["train/loss_scale"] == [(4, 256.0 * 2**2), (8, 256.0 * 2**4)]
    assert scalars["train/grad_norm"] == [(4, f32(norms[1])), (8, f32(norms[3]))]


def test_a_dict_logs_every_member_with_its_prefix(tmp_path):
    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale=64.0)
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: gan_step(gan, wrappers, x))
    tb_logger = TensorboardLogger(log_dir=str(tmp_path))
    tb_logger.attach(trainer, log_handler=OptimParamsHandler(wrappers), event_name=OptimEvents.OPTIM_STEP_COMPLETED)
    trainer.run([x for x, _ in make_batches(2)])
    tb_logger.close()

    scalars = read_scalars(tmp_path)
    assert set(scalars) == {
        "gen/lr/group_0",
        "disc/lr/group_0",
        "gen/momentum/group_0",
        "disc/momentum/group_0",
        "gen/weight_decay/group_0",
        "disc/weight_decay/group_0",
        "gen/loss_scale",
        "gen/updates_applied",
        "gen/updates_skipped",
        "disc/updates_applied",
        "disc/updates_skipped",
    }
    assert scalars["gen/momentum/group_0"][0] == (1, 0.8999999761581421)  # Adam's betas[0]
    # At each member's own update, that member only, on the iteration axis: gen's at iterations 1 and 2,
    # disc's (accumulating 2) at 2; no value twice at one step.
    assert scalars["gen/updates_applied"] == [(1, 1.0), (2, 2.0)]
    assert scalars["disc/updates_applied"] == [(2, 1.0)]
    gen_lr = f32(wrappers["gen"].param_groups[0]["lr"])
    assert scalars["gen/lr/group_0"] == [(1, gen_lr), (2, gen_lr)]
    assert [step for step, _ in scalars["disc/lr/group_0"]] == [2]


def test_optim_scalars_reads_counts_and_groups():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    assert optim_scalars(wrapper) == {
        "lr/group_0": 0.1,
        "momentum/group_0": 0.0,
        "weight_decay/group_0": 0.0,
        "updates_applied": 0.0,
        "updates_skipped": 0.0,
    }


def test_bad_arguments(tmp_path):
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optim_wrapper must be an OptimWrapper or an OptimWrapperDict, got SGD"):
        OptimParamsHandler(wrapper.optimizer)
    with pytest.raises(TypeError, match="tag must be a str or None, got 3"):
        OptimParamsHandler(wrapper, tag=3)
    handler = OptimParamsHandler(wrapper)
    trainer = create_trainer(model, wrapper, loss_fn)
    with pytest.raises(TypeError, match="works with an Ignite logger, got 'logger'"):
        handler(trainer, "logger", OptimEvents.OPTIM_STEP_COMPLETED)


def test_the_updates_axis_plots_each_member_against_its_own_updates(tmp_path):
    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale=64.0)
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: gan_step(gan, wrappers, x))
    tb_logger = TensorboardLogger(log_dir=str(tmp_path))
    handler = OptimParamsHandler(wrappers, x_axis="updates")
    tb_logger.attach(trainer, log_handler=handler, event_name=Events.ITERATION_COMPLETED)
    trainer.run([x for x, _ in make_batches(4)])
    tb_logger.close()
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["gen/lr/group_0"]] == [1, 2, 3, 4]  # an update each iteration
    assert [step for step, _ in scalars["disc/lr/group_0"]] == [0, 1, 1, 2]  # one each 2 (accumulation)
    with pytest.raises(ValueError, match=r"x_axis must be one of \['iteration', 'updates'\], got 'epochs'"):
        OptimParamsHandler(wrappers, x_axis="epochs")


def test_named_param_groups_name_their_tags():
    model = make_model()
    named = torch.optim.SGD(
        [{"params": list(model[0].parameters()), "name": "encoder"}, {"params": list(model[3].parameters())}],
        lr=0.1,
        weight_decay=0.01,
    )
    assert sorted(optim_scalars(OptimWrapper(named))) == [
        "base_lr",
        "lr/encoder",
        "lr/group_1",
        "momentum/encoder",
        "momentum/group_1",
        "updates_applied",
        "updates_skipped",
        "weight_decay/encoder",
        "weight_decay/group_1",
    ]


@pytest.mark.slow  # MLflow starts processes (git, uname) as it logs a run
def test_another_ignite_logger_gets_the_same_values_read_back_by_its_own_reader(tmp_path, monkeypatch):
    """MLflow to a local file store, read back with MLflow's client: the values TensorBoard gets."""
    mlflow = pytest.importorskip("mlflow")
    from ignite.handlers.mlflow_logger import MLflowLogger
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store, no server
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("engine_opt")
    model = make_model()
    cfg = dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=0.01), accumulative_counts=2)
    cfg["paramwise_cfg"] = dict(bias_decay_mult=0.0, norm_decay_mult=0.0)  # groups named default, bias-norm
    wrapper = build_optim_wrapper(model, cfg)
    scheduler = torch.optim.lr_scheduler.StepLR(wrapper.optimizer, step_size=1, gamma=0.5)
    trainer = create_trainer(model, wrapper, loss_fn)
    SchedulerHandler(scheduler).attach(trainer)
    mlflow_logger = MLflowLogger()
    mlflow_logger.attach(trainer, OptimParamsHandler(wrapper), OptimEvents.OPTIM_STEP_COMPLETED)
    tb_logger = TensorboardLogger(log_dir=str(tmp_path / "tb"))
    tb_logger.attach(trainer, OptimParamsHandler(wrapper), OptimEvents.OPTIM_STEP_COMPLETED)
    try:
        trainer.run(make_batches(6))
        run_id = mlflow.active_run().info.run_id
    finally:
        mlflow_logger.close()
        tb_logger.close()
    client = MlflowClient(tracking_uri=uri)
    tensorboard = read_scalars(tmp_path / "tb")
    logged = sorted(client.get_run(run_id).data.metrics)
    assert logged == sorted(f"optim {tag}" for tag in tensorboard)
    for tag, values in tensorboard.items():
        history = [(metric.step, f32(metric.value)) for metric in client.get_metric_history(run_id, f"optim {tag}")]
        assert history == values, tag
    assert [value for _, value in tensorboard["lr/default"]] == [f32(0.1), f32(0.05), f32(0.025)]
    assert [value for _, value in tensorboard["weight_decay/bias-norm"]] == [0.0, 0.0, 0.0]


def test_groups_never_share_a_label():
    params = [torch.zeros(1, requires_grad=True) for _ in range(4)]
    optimizer = torch.optim.SGD(
        [
            {"params": [params[0]], "name": "group_1", "lr": 0.5},  # another group's fallback label
            {"params": [params[1]], "lr": 0.1},
            {"params": [params[2]], "name": "head", "lr": 0.2},
            {"params": [params[3]], "name": "group_3", "lr": 0.3},  # its own fallback: kept
        ],
        lr=0.1,
    )
    scalars = optim_scalars(OptimWrapper(optimizer))
    assert {key: value for key, value in scalars.items() if key.startswith("lr/")} == {
        "lr/group_0": 0.5,
        "lr/group_1": 0.1,
        "lr/head": 0.2,
        "lr/group_3": 0.3,
    }


class NoHyperparameters(torch.optim.Optimizer):
    """An optimizer whose groups keep no lr, momentum or weight decay."""

    def __init__(self, params):
        super().__init__(params, defaults={"scale": 0.1})

    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.data.add_(param.grad, alpha=-group["scale"])


def test_values_an_optimizer_does_not_keep_are_left_out():
    model = make_model()
    assert sorted(optim_scalars(OptimWrapper(NoHyperparameters(model.parameters())))) == [
        "updates_applied",
        "updates_skipped",
    ]
    adagrad = optim_scalars(OptimWrapper(torch.optim.Adagrad(model.parameters(), lr=0.1)))
    assert sorted(adagrad) == ["lr/group_0", "updates_applied", "updates_skipped", "weight_decay/group_0"]


def test_another_logger_gets_one_output_handler_and_subclasses_find_their_bases(tmp_path):
    """Through the logger's own OutputHandler, made once (Visdom's keeps its windows there), for subclasses too."""

    class MyRecordingLogger(RecordingLogger):  # defined here, where no OutputHandler is
        pass

    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale=64.0)
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: gan_step(gan, wrappers, x))
    logger = MyRecordingLogger()
    logger.attach(trainer, OptimParamsHandler(wrappers, tag="train"), OptimEvents.OPTIM_STEP_COMPLETED)
    tb_logger = TensorboardLogger(log_dir=str(tmp_path))
    tb_logger.attach(trainer, OptimParamsHandler(wrappers, tag="train"), OptimEvents.OPTIM_STEP_COMPLETED)
    trainer.run([x for x, _ in make_batches(4)])
    tb_logger.close()

    assert len(logger.output_handlers) == 1
    recorded: dict[str, list[tuple[int, float]]] = {}
    for step, values in logger.records:
        for key, value in values.items():
            recorded.setdefault(key, []).append((step, f32(value)))  # the OutputHandler's 'tag/key'

    assert recorded == read_scalars(tmp_path)


def test_a_logger_without_an_output_handler_is_refused(tmp_path):
    from ignite.handlers.base_logger import BaseLogger

    class Bare(BaseLogger):
        def _create_output_handler(self, *args, **kwargs):
            raise NotImplementedError

        def _create_opt_params_handler(self, *args, **kwargs):
            raise NotImplementedError

    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = create_trainer(model, wrapper, loss_fn)
    with pytest.raises(TypeError, match="Bare comes with no Ignite OutputHandler"):
        OptimParamsHandler(wrapper)(trainer, Bare(), Events.ITERATION_COMPLETED)


def test_groups_made_from_paramwise_cfg_are_logged_under_their_names():
    model = make_model()  # Linear, LayerNorm, ReLU, Linear
    wrapper = build_optim_wrapper(
        model,
        dict(
            optimizer=dict(type="AdamW", lr=0.01, weight_decay=0.1),
            paramwise_cfg=dict(bias_decay_mult=0.0, norm_decay_mult=0.0, custom_keys={"3.": dict(lr_mult=0.5)}),
        ),
    )
    lr_tags = {key for key in optim_scalars(wrapper) if key.startswith("lr/")}
    assert lr_tags == {"lr/default", "lr/bias-norm", "lr/custom-3"}
