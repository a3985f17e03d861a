"""RunOptions: what a resumed ``engine-opt train`` must share with its checkpoint, and what it need not."""

from __future__ import annotations

import dataclasses

import pytest

from engine_opt.app.run_options import RunOptions


def options(**changes):
    base = RunOptions(
        task="classifier",
        batch_size=64,
        seed=0,
        processes=2,
        wrapper={"type": "OptimWrapper"},
        schedule="constant",
        epochs=2,
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("processes", [1, 3, 4])
def test_another_process_count_is_no_difference(processes):
    saved = options().state_dict()  # a run of 2 processes
    resumed = options(processes=processes)
    resumed.load_state_dict(saved)  # accepted; the options stay this run's
    assert resumed == options(processes=processes)

    def refusal(run):
        with pytest.raises(ValueError, match="this run differs from the checkpoint's") as info:
            run.check_state_dict(saved)
        return str(info.value)

    # a real difference lists the same differences as at the checkpoint's own process count: none for the count
    assert refusal(options(processes=processes, seed=1)) == refusal(options(seed=1))


def test_a_single_process_checkpoint_from_before_the_sampler_order_is_refused_by_name():
    saved = {key: value for key, value in options(processes=1).state_dict().items() if key != "data_order"}
    with pytest.raises(
        ValueError, match="the data order: the checkpoint's run of one process shuffled with its generator"
    ):
        options(processes=1).check_state_dict(saved)
    older_of_two = {key: value for key, value in options().state_dict().items() if key != "data_order"}
    options(processes=1).check_state_dict(older_of_two)  # two processes sampled with a DistributedSampler already


def test_each_config_difference_is_named_by_the_option_that_sets_it_and_by_nothing_else():
    from engine_opt.app.run_options import config_differences

    here = {"type": "OptimWrapper", "clip_grad": {"type": "norm", "max_norm": 1.0}, "optimizer": {"lr": 0.1}}
    saved = {"type": "OptimWrapper", "clip_grad": {"type": "value", "clip_value": 0.5}, "optimizer": {"lr": 0.2}}
    assert config_differences(here, saved) == [
        "the wrapper config's 'clip_grad.type': 'norm' here, 'value' in the checkpoint",  # not --wrapper's
        "--clip-norm (the wrapper config's 'clip_grad.max_norm'): 1.0 here, not set in the checkpoint",
        "the wrapper config's 'clip_grad.clip_value': not set here, 0.5 in the checkpoint",
        "--lr (the wrapper config's 'optimizer.lr'): 0.1 here, 0.2 in the checkpoint",
    ]
    gan = {"gen": {"dtype": "fp16"}, "disc": {"dtype": "fp16"}}
    gan_saved = {"gen": {"dtype": "bf16"}, "disc": {"dtype": "fp16"}}
    assert config_differences(gan, gan_saved, members=("gen", "disc")) == [
        "--dtype (the wrapper config's 'gen.dtype'): 'fp16' here, 'bf16' in the checkpoint"
    ]
    assert config_differences(gan, gan_saved, members=("gen", "disc"), source="gan.json") == [
        "--config gan.json's 'gen.dtype': 'fp16' here, 'bf16' in the checkpoint"  # no option set it
    ]
