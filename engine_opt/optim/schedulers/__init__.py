"""MMEngine's parameter schedulers and its ``param_scheduler`` configs, without MMEngine.

``base`` holds ``ParamScheduler`` (counting, chaining, state), ``formulas``
MMEngine's nine formulas, ``registry`` their ``*LR``/``*Momentum`` forms and
the ``type`` names, ``mmengine_state`` the translation of MMEngine's saved
states, and ``build`` the config builder.

``build_param_scheduler(optim_wrapper, cfg)`` turns MMEngine's ``param_scheduler``
config section (one dict, a list of dicts, or for an ``OptimWrapperDict`` a
dict of those keyed by member name) into scheduler objects that reproduce
MMEngine's formulas exactly: chainable, active while ``begin <= step < end``,
the first value set when built, one ``step()`` per iteration (``by_epoch=False``)
or per epoch (``by_epoch=True``). ``convert_to_iter_based=True`` turns an
epoch-based config into an iteration-based one with ``epoch_length``.

Here an iteration is an *applied optimizer update*: with
``accumulative_counts=4``, MMEngine's schedule advances once per four
micro-steps, and ``epoch_length`` counts applied updates per epoch.
``SchedulerHandler`` (``engine_opt.handlers``) steps these schedulers in a
trainer; in a loop of your own, call ``step()`` after each update (or epoch).

The momentum schedulers set ``momentum``, or for Adam-like optimizers
``betas[0]`` (through a ``momentum`` entry they add to each group, as MMEngine).

Examples:
    >>> import torch
    >>> from engine_opt import OptimWrapper
    >>> model = torch.nn.Linear(2, 1)
    >>> wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    >>> schedulers = build_param_scheduler(wrapper, [
    ...     dict(type="LinearLR", start_factor=0.25, begin=0, end=3,
    ...          by_epoch=False),
    ...     dict(type="CosineAnnealingLR", T_max=4, begin=3, end=7,
    ...          by_epoch=False)])
    >>> lrs, (group,) = [], wrapper.param_groups
    >>> for _ in range(7):
    ...     lrs.append(round(group["lr"], 4))   # the value this update uses
    ...     for scheduler in schedulers:                       # after the update
    ...         scheduler.step()
    >>> lrs
    [0.025, 0.0625, 0.1, 0.1, 0.0854, 0.05, 0.0146]
"""

from .base import INF, ParamScheduler
from .build import build_param_scheduler
from .formulas import (
    ConstantParamScheduler,
    CosineAnnealingParamScheduler,
    CosineRestartParamScheduler,
    ExponentialParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    OneCycleParamScheduler,
    PolyParamScheduler,
    StepParamScheduler,
)
from .registry import (
    SCHEDULERS,
    ConstantLR,
    ConstantMomentum,
    CosineAnnealingLR,
    CosineAnnealingMomentum,
    CosineRestartLR,
    CosineRestartMomentum,
    ExponentialLR,
    ExponentialMomentum,
    LinearLR,
    LinearMomentum,
    MultiStepLR,
    MultiStepMomentum,
    OneCycleLR,
    PolyLR,
    PolyMomentum,
    StepLR,
    StepMomentum,
)

__all__ = [
    "INF",
    "SCHEDULERS",
    "ConstantLR",
    "ConstantMomentum",
    "ConstantParamScheduler",
    "CosineAnnealingLR",
    "CosineAnnealingMomentum",
    "CosineAnnealingParamScheduler",
    "CosineRestartLR",
    "CosineRestartMomentum",
    "CosineRestartParamScheduler",
    "ExponentialLR",
    "ExponentialMomentum",
    "ExponentialParamScheduler",
    "LinearLR",
    "LinearMomentum",
    "LinearParamScheduler",
    "MultiStepLR",
    "MultiStepMomentum",
    "MultiStepParamScheduler",
    "OneCycleLR",
    "OneCycleParamScheduler",
    "ParamScheduler",
    "PolyLR",
    "PolyMomentum",
    "PolyParamScheduler",
    "StepLR",
    "StepMomentum",
    "StepParamScheduler",
    "build_param_scheduler",
]
