"""The architecture: three layers, each importing only those below; the core imports no framework or logger."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "engine_opt"
# Each layer with the top-level names of what it may import, besides the standard library and torch.
LAYERS = {
    "optim": set(),
    "engine": {"ignite", "optim"},
    "handlers": {"ignite", "tensorboard", "optim", "engine"},
    "app": {"ignite", "optim", "engine", "handlers", "engine_opt"},  # engine_opt: its __version__
    "testing.py": {"optim"},  # GradientTraffic: torch only, like the core
}
FRAMEWORKS = {"ignite", "tensorboard"}


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0]


def imported(path: Path) -> set[str]:
    """What ``path`` imports: third-party top-level names, and the package's own layers (by name)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top, *rest = node.module.split(".")
            names.add(rest[0] if top == "engine_opt" and rest else top)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            here = path.parent.relative_to(PACKAGE).parts
            base = here[: len(here) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            names.add(target[0] if target else "engine_opt")
    return names


MODULES = sorted(path for path in PACKAGE.rglob("*.py") if layer_of(path) in LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=[str(path.relative_to(PACKAGE)) for path in MODULES])
def test_each_module_imports_only_its_own_layer_and_those_below(path):
    layer = layer_of(path)
    others = ({"optim", "engine", "handlers", "app"} | FRAMEWORKS | {"engine_opt"}) - {layer}
    forbidden = (imported(path) & others) - LAYERS[layer]
    assert not forbidden, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(forbidden)}"


@pytest.mark.slow  # a fresh interpreter
def test_the_core_loads_no_framework_in_a_fresh_interpreter():
    code = (
        "import sys, engine_opt, engine_opt.optim, engine_opt.testing\n"
        "from engine_opt import AmpOptimWrapper, OptimWrapper, OptimWrapperDict, build_optim_wrapper\n"
        "for module in ('amp', 'build', 'checks', 'clipping', 'distributed', 'finite', 'grad_scaler', 'hooks',\n"
        "               'schedulers', 'state_checks', 'wrapper', 'wrapper_dict'):\n"
        "    __import__(f'engine_opt.optim.{module}')\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'ignite', 'tensorboard'}))\n"
        "engine_opt.create_trainer\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'ignite', 'tensorboard'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "['ignite']"], result.stdout  # the Ignite layer loads on use


def test_the_package_exports_what_it_did():
    import engine_opt
    import engine_opt.handlers

    assert sorted(engine_opt.__all__) == [
        "AmpOptimWrapper",
        "OptimEvents",
        "OptimWrapper",
        "OptimWrapperDict",
        "StepEvent",
        "build_optim_wrapper",
        "build_param_scheduler",
        "create_trainer",
        "member_filter",
    ]
    for module in (engine_opt, engine_opt.handlers):
        for name in module.__all__:
            assert getattr(module, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Trainr'"):
        engine_opt.Trainr  # noqa: B018


def test_no_private_ignite_name_outside_its_fence():
    uses = [
        (path.relative_to(PACKAGE), number)
        for path in PACKAGE.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "._event_handlers" in line or "_fire_event" in line
    ]
    assert {str(path) for path, _ in uses} <= {"engine/ignite_internals.py"}, uses
