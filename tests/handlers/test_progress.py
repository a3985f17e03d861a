"""attach_progress_bar / progress_values: what the bar shows."""

from __future__ import annotations

import io

import pytest
import torch

from engine_opt import AmpOptimWrapper, OptimWrapper, create_trainer
from engine_opt.handlers import attach_progress_bar, progress_values

from helpers import make_amp_gan_wrappers
from oracle import loss_fn, make_batches, make_gan, make_model


def test_values_for_single_and_dict_wrappers():
    model = make_model()
    wrapper = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.5), dtype="fp16", loss_scale=8.0)
    show = progress_values(wrapper)
    assert show(torch.tensor(0.25)) == {"loss": 0.25, "lr": 0.5, "scale": 8.0}
    assert show(1.5) == {"loss": 1.5, "lr": 0.5, "scale": 8.0}
    gan = make_gan()
    show = progress_values(make_amp_gan_wrappers(gan, loss_scale=4.0))
    assert show({"gen_loss": torch.tensor(2.0), "disc_loss": 3, "note": "x"}) == {
        "gen_loss": 2.0,
        "disc_loss": 3.0,
        "gen.lr": 0.01,
        "gen.scale": 4.0,
        "disc.lr": 0.05,
    }


def test_the_bar_shows_loss_and_lr():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.5))
    trainer = create_trainer(model, wrapper, loss_fn)
    stream = io.StringIO()
    attach_progress_bar(trainer, wrapper, every=2, file=stream, persist=True)
    trainer.run(make_batches(4))
    assert "loss=" in stream.getvalue() and "lr=0.5" in stream.getvalue()


def test_every_must_be_positive():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.5))
    with pytest.raises(ValueError, match="every must be"):
        attach_progress_bar(create_trainer(model, wrapper, loss_fn), wrapper, every=0)


def test_odd_outputs_show_what_is_a_number_and_keep_their_names():
    np = pytest.importorskip("numpy")
    model = make_model()
    wrapper = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.5), dtype="fp16", loss_scale=2048.0)
    show = progress_values(wrapper)
    assert show({"loss": np.float32(0.25), "acc": np.int64(3), "lr": 7.0}) == {
        "loss": 0.25,
        "acc": 3.0,
        "lr": 7.0,  # the output's own lr is not replaced by the wrapper's
        "scale": 2048.0,
    }
    for not_a_number in (True, torch.tensor(1 + 2j), torch.tensor(True), torch.ones(2), "0.5", None):
        assert show(not_a_number) == {"lr": 0.5, "scale": 2048.0}, not_a_number
        assert show({"loss": not_a_number}) == {"lr": 0.5, "scale": 2048.0}, not_a_number


def test_only_loss_scales_are_shown_as_powers_of_two():
    gan = make_gan()
    wrappers = make_amp_gan_wrappers(gan, loss_scale=1024.0)
    trainer = create_trainer(gan, wrappers, train_step=lambda engine, x: {"gen_loss": torch.tensor(1024.0)})
    stream = io.StringIO()
    attach_progress_bar(trainer, wrappers, file=stream, persist=True, show_lr=False)
    trainer.run([x for x, _ in make_batches(1)])
    assert "gen_loss=1.02e+03" in stream.getvalue() and "gen.scale=2^10" in stream.getvalue(), stream.getvalue()
