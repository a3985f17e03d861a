"""MMEngine's param_scheduler configs, without MMEngine: differential against MMEngine's own schedulers.

MMEngine (a test-only oracle) builds the same configs on a plain torch optimizer with the same param
groups; both are stepped alike and every group's lr, momentum, betas and weight decay must be equal
(bitwise) before every step. Tests that need MMEngine skip without it.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine_opt import OptimWrapper, OptimWrapperDict
from engine_opt.optim.schedulers import (
    INF,
    SCHEDULERS,
    CosineAnnealingLR,
    LinearLR,
    LinearMomentum,
    ParamScheduler,
    build_param_scheduler,
)

KEYS = ("lr", "momentum", "betas", "weight_decay")
FORMULAS = (
    "Step",
    "MultiStep",
    "Constant",
    "Exponential",
    "CosineAnnealing",
    "Linear",
    "Poly",
    "OneCycle",
    "CosineRestart",
)


def mmengine_build() -> Any:
    """MMEngine's registry build, which handles convert_to_iter_based as its runner does (skip without MMEngine)."""
    pytest.importorskip("mmengine")
    import mmengine.optim  # noqa: F401 (registers the schedulers)
    from mmengine.registry import PARAM_SCHEDULERS

    return PARAM_SCHEDULERS.build


def make_optimizer(kind: str, lrs: list[float]) -> torch.optim.Optimizer:
    """One parameter per group, each group with its own lr; the same structure every call."""
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=1e-4)
    return torch.optim.Adam(params, lr=0.5, weight_decay=1e-4)


def values(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{key: group[key] for key in KEYS if key in group} for group in optimizer.param_groups]


def assert_same_run(kind, lrs, cfg, steps, mm_cfgs=None, **lengths):
    """Build ``cfg`` with ours (on a wrapper) and MMEngine's (on a plain optimizer); step both ``steps`` times."""
    build = mmengine_build()
    ours_optimizer, theirs_optimizer = make_optimizer(kind, lrs), make_optimizer(kind, lrs)
    ours = build_param_scheduler(OptimWrapper(ours_optimizer), cfg, **lengths)
    epoch_length = lengths.get("epoch_length") or 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MMEngine warns that no optimizer.step() came before
        theirs = [
            build(dict(item), default_args=dict(optimizer=theirs_optimizer, epoch_length=epoch_length))
            for item in (mm_cfgs if mm_cfgs is not None else [cfg] if isinstance(cfg, dict) else cfg)
        ]
        for step in range(steps):
            assert values(ours_optimizer) == values(theirs_optimizer), f"before step {step}"
            for scheduler in ours:
                scheduler.step()
            for scheduler in theirs:
                scheduler.step()
    assert values(ours_optimizer) == values(theirs_optimizer), "at the end"
    assert [s.get_last_value() for s in ours] == [s.get_last_value() for s in theirs]
    assert [(s.last_step, s.global_step) for s in ours] == [(s.last_step, s._global_step) for s in theirs]
    return ours


@st.composite
def scheduler_cfgs(draw, optimizer_kind: str, max_begin: int = 12, max_length: int = 25) -> dict[str, Any]:
    """One MMEngine scheduler config: any formula, as LR, momentum or generic form."""
    formula = draw(st.sampled_from(FORMULAS))
    forms = ["LR", "ParamScheduler"] if formula == "OneCycle" else ["LR", "Momentum", "ParamScheduler"]
    form = draw(st.sampled_from(forms))
    cfg: dict[str, Any] = {"type": formula + form}
    if form == "ParamScheduler":
        names = ["lr"] if formula == "OneCycle" else ["lr", "weight_decay"] + (["momentum"] * (optimizer_kind == "sgd"))
        cfg["param_name"] = draw(st.sampled_from(names))
    begin = draw(st.integers(0, max_begin))
    cfg["begin"] = begin
    if formula == "OneCycle" or draw(st.booleans()):
        cfg["end"] = begin + draw(st.integers(1, max_length))
    cfg["by_epoch"] = draw(st.booleans())
    gamma = st.floats(0.1, 0.99)
    ratio = st.floats(0.0, 0.5)
    if formula == "Step":
        cfg.update(step_size=draw(st.integers(1, 6)), gamma=draw(gamma))
    elif formula == "MultiStep":
        cfg.update(milestones=sorted(draw(st.lists(st.integers(0, 30), max_size=4))), gamma=draw(gamma))
    elif formula == "Constant":
        cfg["factor"] = draw(st.floats(0.05, 1.0))
    elif formula == "Exponential":
        cfg["gamma"] = draw(gamma)
    elif formula == "CosineAnnealing":
        if draw(st.booleans()):
            cfg["T_max"] = draw(st.integers(1, 20))
        eta = draw(st.sampled_from(["default", "eta_min", "eta_min_ratio"]))
        if eta != "default":
            cfg[eta] = draw(ratio)
    elif formula == "Linear":
        cfg.update(start_factor=draw(st.floats(0.01, 1.0)), end_factor=draw(st.floats(0.0, 1.0)))
    elif formula == "Poly":
        cfg.update(eta_min=draw(st.floats(0.0, 1e-3)), power=draw(st.floats(0.5, 3.0)))
    elif formula == "OneCycle":
        cfg.update(
            eta_max=draw(st.floats(0.01, 1.0)),
            pct_start=draw(st.floats(0.05, 0.95)),
            anneal_strategy=draw(st.sampled_from(["cos", "linear"])),
            three_phase=draw(st.booleans()),
            div_factor=draw(st.floats(2.0, 50.0)),
        )
        ends = [cfg["pct_start"] * (cfg["end"] - begin) - 1, cfg["end"] - begin - 1]
        ends[1:1] = [2 * cfg["pct_start"] * (cfg["end"] - begin) - 2] if cfg["three_phase"] else []
        assume(
            all(end != start for end, start in zip(ends, [0, *ends[:-1]], strict=True))
        )  # MMEngine divides by zero; refused here
    else:
        periods = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
        cfg.update(
            periods=periods,
            restart_weights=draw(st.lists(st.floats(0.1, 1.0), min_size=len(periods), max_size=len(periods))),
        )
        cfg[draw(st.sampled_from(["eta_min", "eta_min_ratio"]))] = draw(ratio)
    return cfg


lrs_strategy = st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(["sgd", "adam"]), lrs=lrs_strategy, steps=st.integers(0, 40))
def test_one_scheduler_matches_mmengine_at_every_step(data, kind, lrs, steps):
    assert_same_run(kind, lrs, data.draw(scheduler_cfgs(kind)), steps)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(["sgd", "adam"]), lrs=lrs_strategy, steps=st.integers(0, 50))
def test_chained_schedulers_match_mmengine(data, kind, lrs, steps):
    """A warmup then a decay, as configs write them, plus anything else on any parameter, in list order."""
    warmup = data.draw(st.integers(1, 8))
    cfg = [
        dict(type="LinearLR", start_factor=data.draw(st.floats(0.01, 1.0)), begin=0, end=warmup, by_epoch=False),
        dict(type="CosineAnnealingLR", begin=warmup, end=warmup + data.draw(st.integers(1, 30)), by_epoch=False),
    ]
    extra = data.draw(st.lists(scheduler_cfgs(kind), max_size=2))
    cfg += [item for item in extra if not item["type"].startswith("OneCycle")]  # OneCycle is not chainable
    assert_same_run(kind, lrs, cfg, steps)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    kind=st.sampled_from(["sgd", "adam"]),
    lrs=lrs_strategy,
    epoch_length=st.integers(1, 5),
    steps=st.integers(0, 60),
)
def test_convert_to_iter_based_matches_mmengine(data, kind, lrs, epoch_length, steps):
    cfgs = data.draw(st.lists(scheduler_cfgs(kind, max_begin=4, max_length=8), min_size=1, max_size=2))
    cfgs = [item for item in cfgs if not item["type"].startswith("OneCycle")][:1] or cfgs[:1]
    for item in cfgs:
        item.update(by_epoch=True, convert_to_iter_based=True)
    try:
        ours = assert_same_run(kind, lrs, cfgs, steps, epoch_length=epoch_length)
    except ValueError as error:  # converted, a OneCycle phase may have no steps: refused where MMEngine divides by 0
        assume("makes a phase of no steps" not in str(error))
        raise
    assert not any(scheduler.by_epoch for scheduler in ours)
    assert ours[0].begin == cfgs[0]["begin"] * epoch_length


@pytest.mark.parametrize("by_epoch", [True, False])
def test_a_missing_end_is_the_runs_end_as_mmengines_runner_sets_it(by_epoch):
    cfg = [
        dict(type="LinearLR", start_factor=0.1, end=3, by_epoch=False),
        dict(type="CosineAnnealingLR", by_epoch=by_epoch),
    ]
    run_end = 6 if by_epoch else 6 * 4
    mm_cfgs = [cfg[0], {**cfg[1], "end": run_end}]
    ours = assert_same_run("sgd", [0.1, 0.3], cfg, 30, mm_cfgs=mm_cfgs, epoch_length=4, max_epochs=6)
    assert ours[1].end == run_end
    ours = build_param_scheduler(OptimWrapper(make_optimizer("sgd", [0.1])), cfg, max_iters=7, max_epochs=2)
    assert ours[1].end == (2 if by_epoch else 7)
    assert build_param_scheduler(OptimWrapper(make_optimizer("sgd", [0.1])), cfg)[1].end == INF


def test_momentum_schedulers_set_betas_for_adam_and_momentum_for_sgd():
    for kind in ("sgd", "adam"):
        optimizer = make_optimizer(kind, [0.1, 0.2])
        (scheduler,) = build_param_scheduler(optimizer, dict(type="LinearMomentum", start_factor=0.5, end=3))
        assert scheduler.use_betas == (kind == "adam")
        assert [group["momentum"] for group in optimizer.param_groups] == [0.45, 0.45]
        if kind == "adam":
            assert [group["betas"] for group in optimizer.param_groups] == [(0.45, 0.999)] * 2


def test_an_optim_wrapper_dict_gets_schedules_per_member():
    build = mmengine_build()
    gen, disc = make_optimizer("adam", [0.01]), make_optimizer("sgd", [0.1, 0.05])
    wrappers = OptimWrapperDict(gen=OptimWrapper(gen), disc=OptimWrapper(disc))
    cfg = {
        "gen": dict(type="LinearLR", start_factor=0.5, end=4, by_epoch=False),
        "disc": [dict(type="ExponentialLR", gamma=0.5), dict(type="StepMomentum", step_size=2, gamma=0.5)],
    }
    schedulers = build_param_scheduler(wrappers, cfg)
    assert list(schedulers) == ["gen", "disc"]
    assert [type(s).__name__ for s in schedulers["disc"]] == ["ExponentialLR", "StepMomentum"]
    assert all(s.optimizer is wrappers[name] for name, items in schedulers.items() for s in items)
    plain_gen, plain_disc = make_optimizer("adam", [0.01]), make_optimizer("sgd", [0.1, 0.05])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = [build(dict(cfg["gen"]), default_args=dict(optimizer=plain_gen))] + [
            build(dict(item), default_args=dict(optimizer=plain_disc)) for item in cfg["disc"]
        ]
        for _ in range(6):
            for scheduler in [*schedulers["gen"], *schedulers["disc"], *theirs]:
                scheduler.step()
    assert (values(gen), values(disc)) == (values(plain_gen), values(plain_disc))

    shared = build_param_scheduler(wrappers, dict(type="ConstantLR", factor=0.5, end=2))
    assert [s.optimizer for items in shared.values() for s in items] == [wrappers["gen"], wrappers["disc"]]
    assert build_param_scheduler(wrappers, {"gen": dict(type="ConstantLR")})["disc"] == []


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(["sgd", "adam"]), lrs=lrs_strategy, steps=st.integers(1, 40))
def test_resume_from_a_state_dict_continues_bitwise(data, kind, lrs, steps):
    cfg = [
        dict(type="LinearLR", start_factor=0.1, begin=0, end=5, by_epoch=False),
        *[
            item
            for item in data.draw(st.lists(scheduler_cfgs(kind), min_size=1, max_size=3))
            if "OneCycle" not in item["type"]
        ],
    ]
    stop = data.draw(st.integers(0, steps))
    optimizer = make_optimizer(kind, lrs)
    whole_wrapper = OptimWrapper(optimizer)
    whole = build_param_scheduler(whole_wrapper, cfg)
    expected = []
    for step in range(steps):
        if step == stop:
            saved = copy.deepcopy((whole_wrapper.state_dict(), [s.state_dict() for s in whole]))
        expected.append(values(optimizer))
        for scheduler in whole:
            scheduler.step()
    expected.append(values(optimizer))
    if stop == steps:
        saved = copy.deepcopy((whole_wrapper.state_dict(), [s.state_dict() for s in whole]))

    resumed_optimizer = make_optimizer(kind, lrs)
    wrapper = OptimWrapper(resumed_optimizer)
    resumed = build_param_scheduler(wrapper, cfg)  # built first, as a resumed run does: its first step is overwritten
    wrapper.load_state_dict(saved[0])
    for scheduler, state in zip(resumed, saved[1], strict=True):
        scheduler.load_state_dict(state)
    got = []
    for _ in range(stop, steps):
        got.append(values(resumed_optimizer))
        for scheduler in resumed:
            scheduler.step()
    got.append(values(resumed_optimizer))
    assert got == expected[stop:]
    assert [s.state_dict() for s in resumed] == [s.state_dict() for s in whole]


def test_a_state_dict_from_another_scheduler_is_refused_and_nothing_changes():
    optimizer = make_optimizer("sgd", [0.1, 0.2])
    linear, cosine = build_param_scheduler(
        optimizer, [dict(type="LinearLR", end=3, by_epoch=False), dict(type="CosineAnnealingLR", T_max=5)]
    )
    before = cosine.state_dict()
    with pytest.raises(ValueError, match=r"another scheduler's: type: saved 'LinearLR', here 'CosineAnnealingLR'"):
        cosine.load_state_dict(linear.state_dict())
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['_global_step'\]"):
        cosine.load_state_dict({**before, "_global_step": 3})
    with pytest.raises(ValueError, match=r"base_values must be a list of 2 number\(s\)"):
        cosine.load_state_dict({**before, "base_values": [0.1]})
    with pytest.raises(TypeError, match="global_step must be an int >= -1, got '3' of type str"):
        cosine.load_state_dict({**before, "global_step": "3"})
    assert cosine.state_dict() == before


def test_the_callers_config_is_never_changed():
    cfg = {
        "gen": [
            dict(type="LinearLR", start_factor=0.5, begin=0, end=2, by_epoch=True, convert_to_iter_based=True),
            dict(type="MultiStepLR", milestones=[1, 2]),
        ]
    }
    before = copy.deepcopy(cfg)
    wrappers = OptimWrapperDict(gen=OptimWrapper(make_optimizer("sgd", [0.1])))
    build_param_scheduler(wrappers, cfg, epoch_length=3, max_epochs=4)
    assert cfg == before


def test_the_schedulers_work_without_the_builder_and_on_a_plain_optimizer():
    optimizer = make_optimizer("adam", [1.0])
    warmup = LinearLR(optimizer, start_factor=0.5, end=3, by_epoch=False)
    momentum = LinearMomentum(optimizer, start_factor=0.5, end=3, by_epoch=False)
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"]) == (0.5, (0.45, 0.999))
    for scheduler in (warmup, momentum):
        scheduler.step()
        scheduler.step()
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"]) == (1.0, (0.9, 0.999))
    assert warmup.get_last_value() == [1.0] and repr(warmup) == "LinearLR('lr', begin=0, end=3, by iter)"
    cosine = CosineAnnealingLR.build_iter_from_epoch(optimizer, begin=1, end=3, epoch_length=10)
    assert (cosine.begin, cosine.end, cosine.T_max, cosine.by_epoch) == (10, 30, 20, False)


def test_every_registered_name_is_mmengines():
    pytest.importorskip("mmengine")
    import mmengine.optim  # noqa: F401
    from mmengine.registry import PARAM_SCHEDULERS

    assert all(PARAM_SCHEDULERS.get(name) is not None for name in SCHEDULERS)
    assert all(issubclass(cls, ParamScheduler) for cls in SCHEDULERS.values())


# ------------------------------------------------------------------ bad input: each a clear error, nothing changed

BAD_CONFIGS = [
    (
        dict(type="CosineAnealingLR"),
        ValueError,
        r"param_scheduler\['type'\] must be one of \[.*'CosineAnnealingLR'.*\] or a ParamScheduler subclass, "
        r"got 'CosineAnealingLR' of type str",
    ),
    (dict(end=5), ValueError, r"param_scheduler needs a 'type'.*got keys \['end'\]"),
    (
        [dict(type="LinearLR", end=5, by_epoch=False), dict(type="StepLR", step_size=2, gama=0.5)],
        ValueError,
        r"param_scheduler\[1\] \(StepLR\) got unknown key\(s\) \['gama'\]; accepted: \[.*'gamma'.*\]",
    ),
    (dict(type="LinearLR", param_name="momentum"), ValueError, r"\(LinearLR\) got unknown key\(s\) \['param_name'\]"),
    (
        dict(type="LinearLR", begin=5, end=5),
        ValueError,
        r"param_scheduler: LinearLR end must be larger than begin, got begin=5, end=5",
    ),
    (dict(type="LinearLR", begin=-1, end=5), ValueError, r"LinearLR begin must be an int >= 0, got -1"),
    (dict(type="LinearLR", end=2.5), TypeError, r"LinearLR end must be an int >= 1, got 2.5 of type float"),
    (dict(type="LinearLR", start_factor=0), ValueError, r"LinearLR start_factor must be in \(0, 1\], got 0"),
    (dict(type="ConstantLR", factor=1.5), ValueError, r"ConstantLR factor must be in \(0, 1\], got 1.5"),
    (dict(type="StepLR", step_size=0), ValueError, r"StepLR step_size must be an int >= 1, got 0"),
    (dict(type="StepLR"), TypeError, r"param_scheduler: .*missing 1 required keyword-only argument: 'step_size'"),
    (
        dict(type="MultiStepLR", milestones=3),
        TypeError,
        r"MultiStepLR milestones must be a list of ints, got 3 of type int",
    ),
    (
        dict(type="ExponentialLR", gamma="0.9"),
        TypeError,
        r"ExponentialLR gamma must be a number, got '0.9' of type str",
    ),
    (dict(type="CosineAnnealingLR", eta_min=0.0, eta_min_ratio=0.1), ValueError, r"eta_min or eta_min_ratio, not both"),
    (dict(type="CosineRestartLR", periods=[2]), ValueError, r"CosineRestartLR takes one of eta_min and eta_min_ratio"),
    (
        dict(type="OneCycleLR", eta_max=[0.1, 0.2], end=5),
        ValueError,
        r"OneCycleLR eta_max must be a number or 1 numbers \(one per param group\), got 2",
    ),
    (
        dict(type="OneCycleLR", eta_max=0.1, anneal_strategy="cosine"),
        ValueError,
        r"anneal_strategy must be 'cos' or 'linear', got 'cosine' of type str",
    ),
    (
        dict(type="OneCycleLR", eta_max=0.1, pct_start=0.25, end=4),
        ValueError,
        r"pct_start=0.25 with total_steps=4 makes a phase of no steps",
    ),
    (
        dict(type="OneCycleParamScheduler", param_name="momentum", eta_max=0.1),
        ValueError,
        r"learning rate only: param_name must be 'lr', got 'momentum'",
    ),
    (
        dict(type="LinearParamScheduler"),
        TypeError,
        r"LinearParamScheduler needs param_name, a param group key such as 'lr', got None",
    ),
    (
        dict(type="LinearParamScheduler", param_name="betas"),
        ValueError,
        r"param_groups\[0\] has no 'betas' to schedule; it holds \[.*'lr'.*\]",
    ),
    (
        dict(type="LinearLR", by_epoch=1),
        TypeError,
        r"param_scheduler\['by_epoch'\] must be True or False, got 1 of type int",
    ),
    (
        dict(type="LinearLR", convert_to_iter_based=True),
        ValueError,
        r"convert_to_iter_based=True needs epoch_length \(applied updates per epoch\), got None",
    ),
    (
        dict(type="LinearLR", by_epoch=False, convert_to_iter_based=True),
        ValueError,
        r"so by_epoch must be True, got by_epoch=False",
    ),
    (dict(type="ReduceOnPlateauLR"), ValueError, r"'ReduceOnPlateauLR' needs a validation metric"),
    ("LinearLR", TypeError, r"param_scheduler must be a dict or a list of dicts, got 'LinearLR' of type str"),
    ([dict(type="LinearLR"), "StepLR"], TypeError, r"param_scheduler\[1\] must be a dict, got 'StepLR' of type str"),
]


@pytest.mark.parametrize(("cfg", "error", "message"), BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_bad_configs_are_refused_by_name_and_leave_the_groups_as_they_were(cfg, error, message):
    optimizer = make_optimizer("sgd", [0.1])
    settings_of = lambda group: {key: value for key, value in group.items() if key != "params"}  # noqa: E731
    before = settings_of(optimizer.param_groups[0])
    cfg_before = copy.deepcopy(cfg)
    chain = [dict(type="LinearLR", start_factor=0.5, end=3, by_epoch=False), dict(type="LinearMomentum", end=3)]
    with pytest.raises(error, match=message):
        build_param_scheduler(OptimWrapper(optimizer), cfg)
    with pytest.raises(error):  # after schedulers that did build: they are undone too
        build_param_scheduler(OptimWrapper(optimizer), [*chain, *(cfg if isinstance(cfg, list) else [cfg])])
    assert settings_of(optimizer.param_groups[0]) == before
    assert cfg == cfg_before


def test_bad_arguments_of_the_builder():
    wrapper = OptimWrapper(make_optimizer("sgd", [0.1]))
    wrappers = OptimWrapperDict(gen=wrapper)
    with pytest.raises(
        ValueError, match=r"names member\(s\) \['disc'\], which the OptimWrapperDict lacks; its members: \['gen'\]"
    ):
        build_param_scheduler(wrappers, {"gen": dict(type="LinearLR"), "disc": dict(type="LinearLR")})
    with pytest.raises(ValueError, match=r"param_scheduler\['gen'\]\[0\] \(LinearLR\) got unknown key\(s\) \['ends'\]"):
        build_param_scheduler(wrappers, {"gen": [dict(type="LinearLR", ends=3)]})
    with pytest.raises(ValueError, match="a dict keyed by member names is for an OptimWrapperDict"):
        build_param_scheduler(wrapper, {"gen": dict(type="LinearLR")})
    with pytest.raises(
        TypeError, match=r"optim_wrapper must be an OptimWrapper, an OptimWrapperDict or a torch\.optim\.Optimizer, got"
    ):
        build_param_scheduler(torch.nn.Linear(1, 1), dict(type="LinearLR"))
    with pytest.raises(ValueError, match="epoch_length must be a positive int, got 0"):
        build_param_scheduler(wrapper, dict(type="LinearLR"), epoch_length=0)
    with pytest.raises(ValueError, match=r"iteration-based \(by_epoch=False\) without an 'end': .* needs epoch_length"):
        build_param_scheduler(wrapper, dict(type="LinearLR", by_epoch=False), max_epochs=3)
    with pytest.raises(
        ValueError, match="LinearMomentum needs an optimizer with momentum or betas; Adagrad has neither"
    ):
        build_param_scheduler(torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(1))]), dict(type="LinearMomentum"))
    tensor_lr = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(0.1))
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['lr'\] must be a Python number to schedule"):
        build_param_scheduler(tensor_lr, dict(type="LinearLR"))
    other = LinearLR(make_optimizer("sgd", [0.1]))
    with pytest.raises(ValueError, match=r"param_scheduler\[0\] is a scheduler built on another optimizer"):
        build_param_scheduler(wrapper, [other])


@pytest.mark.parametrize("stop", [0, 3, 7])
def test_mmengines_scheduler_states_resume_here(stop):
    """A checkpoint of MMEngine's schedulers (their attributes) continues here as MMEngine continues it."""
    build = mmengine_build()
    cfg = [
        dict(type="LinearLR", start_factor=0.1, begin=0, end=4, by_epoch=False),
        dict(type="CosineAnnealingLR", T_max=6, begin=4, end=10, by_epoch=False),
        dict(type="CosineAnnealingMomentum", T_max=10, eta_min=0.5, end=10, by_epoch=False),
    ]
    theirs_optimizer = make_optimizer("sgd", [0.1, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MMEngine warns that no optimizer.step() came before
        theirs = [build(dict(item), default_args=dict(optimizer=theirs_optimizer)) for item in cfg]
        for _ in range(stop):
            for scheduler in theirs:
                scheduler.step()
        saved_optimizer = copy.deepcopy(theirs_optimizer.state_dict())
        saved = [copy.deepcopy(scheduler.state_dict()) for scheduler in theirs]
        wrapper = OptimWrapper(make_optimizer("sgd", [0.1, 0.3]))
        ours = build_param_scheduler(wrapper, cfg)
        wrapper.load_state_dict(saved_optimizer)
        for scheduler, state in zip(ours, saved, strict=True):
            scheduler.load_state_dict(state)
        for step in range(stop, 12):
            assert values(wrapper.optimizer) == values(theirs_optimizer), f"before step {step}"
            for scheduler in (*ours, *theirs):
                scheduler.step()
    with pytest.raises(ValueError, match="another scheduler's: param_name: saved 'lr', here 'momentum'"):
        ours[2].load_state_dict(saved[0])


def test_one_cycle_eta_max_per_parameter_as_mmengine_takes_it():
    """MMEngine's groups are one per parameter (and its base group): an eta_max list for them fits these groups."""
    mmengine_optim = pytest.importorskip("mmengine.optim")
    from engine_opt import build_optim_wrapper

    cfg = dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9), paramwise_cfg=dict(bias_lr_mult=2.0))
    model = torch.nn.Linear(2, 2)
    theirs, ours = mmengine_optim.build_optim_wrapper(model, copy.deepcopy(cfg)), build_optim_wrapper(model, cfg)
    schedule = dict(type="OneCycleLR", eta_max=[0.5, 1.0, 0.5], total_steps=6, by_epoch=False)  # weight, bias, base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MMEngine warns that no optimizer.step() came before
        (their_scheduler,) = [mmengine_build()(dict(schedule), default_args=dict(optimizer=theirs))]
        (our_scheduler,) = build_param_scheduler(ours, schedule)
        for _ in range(6):
            assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.optimizer.param_groups]
            their_scheduler.step()
            our_scheduler.step()
    one_group = build_optim_wrapper(model, dict(cfg, paramwise_cfg=dict(bias_lr_mult=1.0)))  # weight and bias
    with pytest.raises(ValueError, match=r"eta_max gives parameters 0 and 1 .*share a param group here \('default'\)"):
        build_param_scheduler(one_group, schedule)
