"""The learning-rate and momentum forms of the formulas, and the registry of ``type`` names.

``StepLR`` is ``StepParamScheduler`` on ``lr``; ``StepMomentum`` on
``momentum`` (``betas[0]`` for Adam-like optimizers): MMEngine's names.
"""

from __future__ import annotations

from .base import ParamScheduler
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


class StepLR(StepParamScheduler):
    """``StepParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class MultiStepLR(MultiStepParamScheduler):
    """``MultiStepParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class ConstantLR(ConstantParamScheduler):
    """``ConstantParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class ExponentialLR(ExponentialParamScheduler):
    """``ExponentialParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class CosineAnnealingLR(CosineAnnealingParamScheduler):
    """``CosineAnnealingParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class LinearLR(LinearParamScheduler):
    """``LinearParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class PolyLR(PolyParamScheduler):
    """``PolyParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class OneCycleLR(OneCycleParamScheduler):
    """``OneCycleParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class CosineRestartLR(CosineRestartParamScheduler):
    """``CosineRestartParamScheduler`` on ``lr``."""

    fixed_param_name = "lr"


class StepMomentum(StepParamScheduler):
    """``StepParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class MultiStepMomentum(MultiStepParamScheduler):
    """``MultiStepParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class ConstantMomentum(ConstantParamScheduler):
    """``ConstantParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class ExponentialMomentum(ExponentialParamScheduler):
    """``ExponentialParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class CosineAnnealingMomentum(CosineAnnealingParamScheduler):
    """``CosineAnnealingParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class LinearMomentum(LinearParamScheduler):
    """``LinearParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class PolyMomentum(PolyParamScheduler):
    """``PolyParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


class CosineRestartMomentum(CosineRestartParamScheduler):
    """``CosineRestartParamScheduler`` on ``momentum`` (``betas[0]`` for Adam-like optimizers)."""

    fixed_param_name = "momentum"
    schedules_momentum = True


SCHEDULERS: dict[str, type[ParamScheduler]] = {
    cls.__name__: cls
    for cls in (
        StepParamScheduler, MultiStepParamScheduler, ConstantParamScheduler, ExponentialParamScheduler,
        CosineAnnealingParamScheduler, LinearParamScheduler, PolyParamScheduler, OneCycleParamScheduler,
        CosineRestartParamScheduler,
        StepLR, MultiStepLR, ConstantLR, ExponentialLR, CosineAnnealingLR, LinearLR, PolyLR, OneCycleLR,
        CosineRestartLR,
        StepMomentum, MultiStepMomentum, ConstantMomentum, ExponentialMomentum, CosineAnnealingMomentum,
        LinearMomentum, PolyMomentum, CosineRestartMomentum,
    )
}  # fmt: skip
"""The ``type`` names ``build_param_scheduler`` accepts (MMEngine's registry names)."""
