"""``routes``: the config that sends each parameter to an optimizer by rule (Muon for 2-D hidden weights).

``build_optim_wrapper(model, dict(optimizer=..., routes=...))`` builds one
``RoutedOptimizer``: each route's optimizer over the parameters it takes
(the first route whose rule holds takes a parameter), and the config's own
``optimizer`` over the rest (the member ``'default'``)::

    dict(optimizer=dict(type='AdamW', lr=3e-4, weight_decay=0.1),      # embeddings, heads, biases, norms
         routes=dict(muon=dict(ndim=2, module_types=['Linear'], exclude_names=['head'],
                               optimizer=dict(type='Muon', lr=0.02))))

``paramwise_cfg`` applies within every route, each from its own optimizer's
lr and weight decay; its groups are named ``route/group``.

Examples:
    >>> from torch.nn import Linear, ModuleDict
    >>> model = ModuleDict(dict(body=Linear(2, 2), head=Linear(2, 1)))
    >>> muon = dict(ndim=2, exclude_names=["head"], optimizer=dict(type="Muon"))
    >>> routes = Routes.parse(model, {"muon": muon}, dict(type="AdamW"))
    >>> {route.name: len(route.params) for route in routes}
    {'muon': 1, 'default': 3}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import checks
from .paramwise import MODEL_ORDER

DEFAULT_ROUTE = "default"
"""The name of the member that takes what no route takes: the config's own ``optimizer``."""


@dataclass(frozen=True)
class RouteRule:
    """Which parameters a route takes: every given test must hold (a test left out holds for all).

    Args:
        ndim: The parameter's number of dimensions, or several (``2``; ``[2, 4]``).
        names: Name patterns, one of which the parameter's name must hold as
            whole dotted parts: ``'head'`` matches ``'head.weight'`` and
            ``'lm.head.bias'``, not ``'overhead.weight'``; ``'2.weight'``
            matches ``'layers.2.weight'``, not ``'12.weight'``.
        exclude_names: Name patterns, likewise, none of which its name may hold (``['embed', 'head']``).
        module_types: Class names of the module holding it (``['Linear']``; a subclass counts).

    Examples:
        >>> from torch.nn import Linear, ModuleDict
        >>> config = dict(ndim=2, module_types=["Linear"], exclude_names=["head"])
        >>> rule = RouteRule.parse("routes['muon']", config)
        >>> model = ModuleDict(dict(body=Linear(2, 2), head=Linear(2, 1)))
        >>> owned = owned_parameters(model)
        >>> tuple(name for name, module, p in owned if rule.takes(name, module, p))
        ('body.weight',)
    """

    ndim: tuple[int, ...] | None = None
    names: tuple[str, ...] | None = None
    exclude_names: tuple[str, ...] = ()
    module_types: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, where: str, cfg: Mapping[str, Any]) -> RouteRule:
        """The rule of the route config ``cfg`` (its keys besides ``optimizer``); refused by name where malformed."""
        ndim = cfg.get("ndim")
        if ndim is not None:
            ndim = (ndim,) if checks.is_int(ndim) else tuple(ndim) if isinstance(ndim, (list, tuple)) else ndim
            if not isinstance(ndim, tuple) or not ndim or not all(checks.is_int(n) and n >= 0 for n in ndim):
                raise ValueError(f"{where}['ndim'] must be an int >= 0 or a list of them, got {cfg.get('ndim')!r}")
        return cls(
            ndim=ndim,
            names=None if cfg.get("names") is None else _strings(f"{where}['names']", cfg["names"]),
            exclude_names=_strings(f"{where}['exclude_names']", cfg.get("exclude_names", ())),
            module_types=None
            if cfg.get("module_types") is None
            else _types(f"{where}['module_types']", cfg["module_types"]),
        )

    def takes(self, name: str, module: nn.Module, param: torch.Tensor) -> bool:
        """Whether the parameter ``name`` of ``module`` goes this route."""
        if self.ndim is not None and param.ndim not in self.ndim:
            return False
        dotted = f".{name}."
        if self.names is not None and not any(f".{pattern}." in dotted for pattern in self.names):
            return False
        if any(f".{pattern}." in dotted for pattern in self.exclude_names):
            return False
        return self.module_types is None or any(klass.__name__ in self.module_types for klass in type(module).__mro__)


ROUTE_KEYS = ("ndim", "names", "exclude_names", "module_types", "optimizer")


def _strings(where: str, value: Any) -> tuple[str, ...]:
    values = (value,) if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(item, str) and item for item in values):
        raise ValueError(f"{where} must be a name pattern or a list of them (non-empty strings), got {value!r}")
    for item in values:
        if "" in item.split("."):
            raise ValueError(
                f"{where}: {item!r} is no name pattern: patterns are whole dotted parts of a name ('head', "
                "'layers.2.weight'), without a leading, trailing or doubled '.'"
            )
    return tuple(values)


def _types(where: str, value: Any) -> tuple[str, ...]:
    values = value if isinstance(value, (list, tuple)) else (value,)
    names = [item.__name__ if isinstance(item, type) and issubclass(item, nn.Module) else item for item in values]
    if not names or not all(isinstance(item, str) and item for item in names):
        raise ValueError(f"{where} must be module class names ('Linear') or classes, got {value!r}")
    return tuple(names)


def owned_parameters(model: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """Every parameter of ``model`` once, with its full name and the module that holds it, in model order."""
    seen: set[int] = set()
    owned = []
    for prefix, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                owned.append((f"{prefix}.{local_name}" if prefix else local_name, module, param))
    return owned


@dataclass
class Route:
    """One member of the routing: its name, its optimizer's config, the parameters it takes (by ``id``)."""

    name: str
    optimizer_cfg: Any
    params: set[int] = field(default_factory=set)
    trainable: bool = False  # any of them requires grad

    def where(self, key: str) -> str:
        """How the config names this route's ``key``: ``routes['muon']['optimizer']``, or ``optimizer``."""
        return key if self.name == DEFAULT_ROUTE else f"routes[{self.name!r}][{key!r}]"

    def takes(self, param: torch.Tensor) -> bool:
        return id(param) in self.params

    def share(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """This route's part of ``paramwise_cfg``'s groups (over the whole model), each named ``route/group``."""
        shared = []
        for group in groups:
            kept = [
                (param, order)
                for param, order in zip(group["params"], group[MODEL_ORDER], strict=True)
                if self.takes(param)
            ]
            if kept:
                params, orders = zip(*kept, strict=True)
                shared.append(
                    {**group, "params": list(params), MODEL_ORDER: list(orders), "name": f"{self.name}/{group['name']}"}
                )
        return shared

    def check_options(self, groups: list[dict[str, Any]], accepted: list[str] | None) -> None:
        """Refuse an option ``custom_keys`` gives this route's parameters that its optimizer lacks."""
        if accepted is None:  # the optimizer takes any keyword
            return
        for group in groups:
            unknown = sorted(set(group) - {"params", "name", MODEL_ORDER} - set(accepted))
            if unknown:
                raise ValueError(
                    f"paramwise_cfg['custom_keys'] gives {unknown} to parameters of the route {self.name!r} (group "
                    f"{group['name']!r}), whose optimizer ({self.where('optimizer')}) takes {sorted(accepted)}"
                )

    def build(
        self, optimizer_cls: type[torch.optim.Optimizer], params: list[Any], cfg: Mapping[str, Any]
    ) -> torch.optim.Optimizer:
        """``optimizer_cls(params, **cfg)``; what the optimizer refuses (Muon: a 1-D parameter) names the route."""
        try:
            return optimizer_cls(params, **cfg)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{self.where('optimizer')} {optimizer_cls.__name__}: {error}") from error


class Routes:
    """The routes of a ``routes`` config, in order, and ``'default'`` last; each parameter in exactly one."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    @classmethod
    def parse(cls, model: nn.Module, routes_cfg: Any, optimizer_cfg: Any) -> Routes:
        """Check ``routes_cfg`` and route every parameter of ``model``; a route that takes none is refused."""
        routes_cfg = checks.mapping("routes", routes_cfg)
        if not routes_cfg:
            raise ValueError(
                "routes must name at least one route, e.g. dict(muon=dict(ndim=2, optimizer=dict(type='Muon')))"
            )
        rules = []
        for name, cfg in routes_cfg.items():
            if not isinstance(name, str) or not name or name == DEFAULT_ROUTE or "/" in name:
                raise ValueError(
                    f"routes: a route's name must be a non-empty string without '/', not {DEFAULT_ROUTE!r} (what no "
                    f"route takes goes to the config's own optimizer), got {name!r}"
                )
            cfg = checks.mapping(f"routes[{name!r}]", cfg)
            checks.known_keys(f"routes[{name!r}]", cfg, ROUTE_KEYS)
            if "optimizer" not in cfg:
                raise ValueError(f"routes[{name!r}] needs an 'optimizer' config, e.g. dict(type='Muon', lr=0.02)")
            rules.append((Route(name, cfg["optimizer"]), RouteRule.parse(f"routes[{name!r}]", cfg)))
        rest = Route(DEFAULT_ROUTE, optimizer_cfg)
        for param_name, module, param in owned_parameters(model):
            route = next((route for route, rule in rules if rule.takes(param_name, module, param)), rest)
            route.params.add(id(param))
            route.trainable = route.trainable or param.requires_grad
        for route, _ in rules:
            if not route.params:
                raise ValueError(f"routes[{route.name!r}] takes no parameter of {type(model).__name__}: check its rule")
        return cls([route for route, _ in rules] + [rest])


__all__ = ["DEFAULT_ROUTE", "ROUTE_KEYS", "Route", "RouteRule", "Routes", "owned_parameters"]
