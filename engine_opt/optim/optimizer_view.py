"""``OptimizerView``: a ``torch.optim.Optimizer`` that stands for the optimizer it wraps.

The base of ``OptimWrapper``. ``Optimizer.__init__`` is not run: the view
holds no parameters of its own, and ``param_groups``, ``defaults`` and
``state`` are live views of the wrapped optimizer's. So torch's and
MMEngine's LR schedulers, Ignite's ``LRScheduler``/``ParamScheduler``s and
``FastaiLRFinder`` take the wrapper itself, and torch's
``register_step_pre_hook`` and the other ``Optimizer`` hooks register on the
wrapped optimizer: the view shares its hook tables (the one use of torch's
private table names, each with a fallback: a table of the view's own).

Examples:
    >>> import torch
    >>> model = torch.nn.Linear(1, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> view = OptimizerView(optimizer)
    >>> same_groups = view.param_groups is optimizer.param_groups
    >>> same_groups, view.get_lr(), view.get_momentum()
    (True, {'lr': [0.1]}, {'momentum': [0.9]})
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .modes import set_mode

# torch.optim.Optimizer's hook tables: the view shares the wrapped optimizer's, so a hook registered on either
# runs around (or with) the wrapped optimizer's own step, state_dict and load_state_dict.
_OPTIMIZER_HOOK_TABLES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _initial_value(value: Any) -> Any:
    """``value`` as it is now: a tensor learning rate is copied (schedulers fill it in place)."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class OptimizerView(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose groups, defaults, state and hooks are those of ``optimizer``.

    Args:
        optimizer: The optimizer it stands for.

    Attributes:
        optimizer: The wrapped optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        # torch.optim.Optimizer.__init__ is deliberately not run: the view holds no parameters of its own.
        self.optimizer = optimizer
        # each group's lr before any schedule, for get_lr()'s base_lr where no scheduler recorded 'initial_lr'
        self._initial_lrs = [_initial_value(group.get("lr")) for group in optimizer.param_groups]
        self._share_hook_tables()

    def _share_hook_tables(self) -> None:
        for table in _OPTIMIZER_HOOK_TABLES:
            own = self.__dict__.get(table, OrderedDict())
            setattr(self, table, getattr(self.optimizer, table) if hasattr(self.optimizer, table) else own)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's own, live list of parameter groups (what a scheduler on the wrapper sets)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The optimizer's default hyperparameters."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def state(self) -> Any:
        """The optimizer's own, live per-parameter state (``torch.optim.Optimizer.state``)."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Run ``optimizer.add_param_group(param_group)`` (the wrapped optimizer's own, e.g. ZeRO's)."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        """Run ``optimizer.zero_grad(*args, **kwargs)``: ``set_to_none`` by keyword, or by position as in torch."""
        self.optimizer.zero_grad(*args, **kwargs)

    def _params(self) -> list[torch.Tensor]:
        """Every parameter of the optimizer, in group order."""
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def train(self) -> None:
        """Put a schedule-free optimizer in train mode (``optimizer.train()``); nothing for one without modes."""
        set_mode(self.optimizer, train=True)

    def eval(self) -> None:
        """Put a schedule-free optimizer in eval mode (``optimizer.eval()``): the parameters where the model
        is meant to be evaluated and saved; nothing for one without modes."""
        set_mode(self.optimizer, train=False)

    def get_lr(self) -> dict[str, list[Any]]:
        """Learning rate of each param group: ``{'lr': [...]}``.

        With several groups, ``'base_lr'`` comes first, as in MMEngine: the lr
        of a group that started at the optimizer's default lr and followed the
        schedule. MMEngine keeps such a group in its ``param_groups``; here it
        is derived from the real groups: the lr of the first group that
        started at the default lr (the same under any schedule), else the
        default times the first group's lr over its initial lr (the same for
        schedules that scale every group alike). Without a schedule it is
        the default lr.

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(1, 1)
            >>> groups = [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.2}]
            >>> optimizer = torch.optim.SGD(groups, lr=0.1)
            >>> view = OptimizerView(optimizer)
            >>> scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
            >>> optimizer.step()
            >>> scheduler.step()
            >>> view.get_lr()
            {'base_lr': [0.05], 'lr': [0.05, 0.1]}
        """
        groups = self.optimizer.param_groups
        result: dict[str, list[Any]] = {}
        if len(groups) > 1 and "lr" in self.optimizer.defaults:
            result["base_lr"] = [self._base_lr(groups)]
        result["lr"] = [group["lr"] for group in groups]
        return result

    def _base_lr(self, groups: list[dict[str, Any]]) -> Any:
        """The default lr, moved as the schedule moved the groups from their initial lrs."""
        default = self.optimizer.defaults["lr"]
        scaled: tuple[Any, Any] | None = None  # (lr, initial lr) of the first group that can give a ratio
        for index, group in enumerate(groups):
            known = self._initial_lrs[index] if index < len(self._initial_lrs) else None
            initial = group.get("initial_lr", known)
            if initial is None or "lr" not in group:
                continue
            if bool(initial == default):
                return group["lr"]
            if scaled is None and bool(initial != 0):
                scaled = (group["lr"], initial)
        if scaled is None or bool(scaled[0] == scaled[1]):
            return default
        return default * scaled[0] / scaled[1]

    def get_momentum(self) -> dict[str, list[Any]]:
        """Momentum of each param group: ``momentum``, else ``betas[0]``, else 0."""
        momentum = []
        for group in self.optimizer.param_groups:
            if "momentum" in group:
                momentum.append(group["momentum"])
            elif "betas" in group:
                momentum.append(group["betas"][0])
            else:
                momentum.append(0)
        return {"momentum": momentum}

    def __getstate__(self) -> dict[str, Any]:
        """The whole state for ``copy``/``pickle`` (``Optimizer.__getstate__`` keeps only three keys).

        A ``step`` that an LR scheduler patched onto this instance is left
        out, as ``Optimizer.__getstate__`` leaves it out: it calls the
        original through a weak reference, and would step the original
        from a copy.
        """
        return {key: value for key, value in self.__dict__.items() if key != "step"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the copy, sharing its optimizer's hook tables (the copied optimizer has fresh ones, as torch's)."""
        self.__dict__.update(state)
        self._share_hook_tables()
