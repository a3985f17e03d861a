"""The architecture: five layers, each importing only those below; one home per public name; the picture kept true.

The core imports no framework or logger; docs/architecture.md draws the layers in their order and has one
row per module; every distribution the package imports is declared.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "engine_opt"
# The layers, bottom to top, each with the top-level names of what it may import besides the standard library
# and torch: its own package and those below, and the frameworks.
LAYERS = {
    "optim": set(),
    "engine": {"ignite", "optim"},
    "checkpoint": {"ignite", "optim", "engine"},
    "handlers": {"ignite", "tensorboard", "optim", "engine", "checkpoint"},
    "app": {"ignite", "optim", "engine", "checkpoint", "handlers", "engine_opt"},  # engine_opt: its __version__
}
# Modules beside the layers, with what they may import.
BESIDE = {
    "testing.py": {"optim"},  # GradientTraffic: torch only, like the core
    "moved.py": set(),  # the standard library only: every layer may use it
}
FRAMEWORKS = {"ignite", "tensorboard"}
# What each package exported before checkpoints had a package of their own: every name still imports from there.
EXPORTED_BEFORE = {
    "engine_opt.engine": (
        "OptimEvents OptimState ResumableLoader Trainer create_trainer load_checkpoint member_filter optim_state"
    ),
    "engine_opt.handlers": (
        "NonFiniteGuard OptimParamsHandler ResumableLoader SchedulerHandler ShardedCheckpoint SpikeGuard "
        "UpdateTelemetryHandler attach_checkpoint attach_progress_bar attach_sharded_checkpoint latest_checkpoint "
        "load_checkpoint load_sharded_checkpoint optim_scalars progress_values resume_from_latest rng_state "
        "set_rng_state"
    ),
}


# Modules that moved, at their old path, with names users imported from them.
OLD_MODULES = {
    "engine_opt.optim.param_scheduler": "INF LinearLR ParamScheduler SCHEDULERS build_param_scheduler",
    "engine_opt.engine.checkpoint_files": "check_entry load_checkpoint read_checkpoint write_checkpoint",
    "engine_opt.engine.run_directory": "RunDirectory RunDirectoryBusy checkpoint_name",
    "engine_opt.engine.sharded_files": "ShardedLayout load_sharded_checkpoint save_sharded",
    "engine_opt.handlers.checkpoint": "DurableCheckpoint attach_checkpoint latest_checkpoint resume_from_latest",
    "engine_opt.handlers.sharded_checkpoint": "ShardedCheckpoint attach_sharded_checkpoint",
}


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


MODULES = sorted(path for path in PACKAGE.rglob("*.py") if layer_of(path) in LAYERS.keys() | BESIDE.keys())


@pytest.mark.parametrize("path", MODULES, ids=[str(path.relative_to(PACKAGE)) for path in MODULES])
def test_each_module_imports_only_its_own_layer_and_those_below(path):
    layer = layer_of(path)
    allowed = LAYERS.get(layer, BESIDE.get(layer, set()))
    others = (set(LAYERS) | FRAMEWORKS | {"engine_opt"}) - {layer}
    forbidden = (imported(path) & others) - allowed
    assert not forbidden, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(forbidden)}"


def test_each_layer_may_import_exactly_the_layers_below_it():
    order = list(LAYERS)
    for index, layer in enumerate(order):
        assert LAYERS[layer] - FRAMEWORKS - {"engine_opt"} == set(order[:index]), layer


@pytest.mark.slow  # a fresh interpreter
def test_the_core_loads_no_framework_in_a_fresh_interpreter():
    core = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (PACKAGE / "optim").rglob("*.py")
    )
    code = (
        "import sys, engine_opt, engine_opt.testing, engine_opt.moved\n"
        "from engine_opt import AmpOptimWrapper, OptimWrapper, OptimWrapperDict, build_optim_wrapper\n"
        f"for module in {core!r}:\n"
        "    __import__(module)\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'ignite', 'tensorboard'}))\n"
        "engine_opt.create_trainer\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'ignite', 'tensorboard'}))\n"
    )
    assert "engine_opt.optim.schedulers.formulas" in core
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "['ignite']"], result.stdout  # the Ignite layer loads on use


PACKAGES = ["engine_opt.optim", "engine_opt.engine", "engine_opt.checkpoint", "engine_opt.handlers"]


def test_the_package_exports_what_it_did():
    import engine_opt

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
    for module in [engine_opt, *map(importlib.import_module, PACKAGES)]:
        for name in module.__all__:
            assert getattr(module, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Trainr'"):
        engine_opt.Trainr  # noqa: B018


def test_each_public_name_is_exported_by_one_package():
    import engine_opt

    homes: dict[str, list[str]] = {}
    for package in PACKAGES:
        for name in importlib.import_module(package).__all__:
            homes.setdefault(name, []).append(package)
    assert {name: found for name, found in homes.items() if len(found) > 1} == {}
    for name in engine_opt.__all__:  # the top level re-exports a few, from their one home
        assert getattr(engine_opt, name) is getattr(importlib.import_module(homes[name][0]), name), name


@pytest.mark.parametrize("package", sorted(EXPORTED_BEFORE))
def test_every_name_a_package_exported_still_imports_from_there(package):
    module = importlib.import_module(package)
    for name in EXPORTED_BEFORE[package].split():
        if name in module.__all__:
            continue
        with pytest.warns(DeprecationWarning, match=rf"{package}\.{name} moved to engine_opt\.\w+\.{name}") as caught:
            exec(f"from {package} import {name} as found", namespace := {})
        home = str(caught[0].message).split(" moved to ")[1].split(":")[0].rsplit(".", 1)[0]
        assert namespace["found"] is getattr(importlib.import_module(home), name)
        assert name in importlib.import_module(home).__all__
        assert caught[0].filename == "<string>"  # the warning points at the importing line, not at engine_opt
    with pytest.raises(AttributeError, match="has no attribute 'attach_chekpoint'"):
        module.attach_chekpoint  # noqa: B018


@pytest.mark.parametrize("old", sorted(OLD_MODULES))
def test_a_module_that_moved_still_imports_from_its_old_path(old):
    module = importlib.import_module(old)
    for name in OLD_MODULES[old].split():
        with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to engine_opt\.[\w.]+\.{name}") as caught:
            exec(f"from {old} import {name} as found", namespace := {})
        home = str(caught[0].message).split(" moved to ")[1].split(":")[0].rsplit(".", 1)[0]
        assert home.startswith(("engine_opt.optim.schedulers", "engine_opt.checkpoint")), home
        assert namespace["found"] is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError, match=f"module '{old}' has no attribute 'nothing_here'"):
        module.nothing_here  # noqa: B018


def architecture_rows() -> list[str]:
    """The modules ``docs/architecture.md``'s table has a row for, as paths under engine_opt/."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## What each module holds", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([\w/]+\.py)` \|", table, flags=re.MULTILINE)


def test_the_architecture_table_has_one_row_per_module_and_none_for_a_module_gone():
    rows = architecture_rows()
    modules = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    assert len(rows) == len(set(rows)), "a module has two rows"
    assert sorted(modules - set(rows)) == [], "modules without a row in docs/architecture.md"
    assert sorted(set(rows) - modules) == [], "rows of docs/architecture.md that name no module"


def test_the_architecture_diagram_draws_the_layers_in_their_import_order():
    text = (ROOT / "docs" / "architecture.md").read_text()
    drawn = re.findall(r"^engine_opt/(\w+)/ ", text.split("## What each module holds", 1)[0], flags=re.MULTILINE)
    assert drawn == list(reversed(LAYERS))  # the top of the picture is the top layer


def test_every_distribution_the_package_imports_is_declared():
    declared = {
        re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()
        for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    distributions = importlib.metadata.packages_distributions()
    optional = {"numpy"}  # imported only to restore a generator state saved where NumPy was loaded
    own = {"engine_opt", *LAYERS, *(path.stem for path in PACKAGE.glob("*.py"))}
    third_party = {
        name
        for path in PACKAGE.rglob("*.py")
        for name in imported(path)
        if name not in sys.stdlib_module_names and name not in own
    }
    third_party |= {name for path in PACKAGE.rglob("*.py") for name in _lazy_imports(path)}
    undeclared = {
        name: distributions.get(name)
        for name in third_party - optional
        if not set(map(str.lower, distributions.get(name, [name]))) & declared
    }
    assert undeclared == {}, f"imported but not in pyproject.toml's dependencies: {undeclared}"


def _lazy_imports(path: Path) -> set[str]:
    """Top-level names imported inside functions (``import numpy`` where it is needed)."""
    return {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import)
        for alias in node.names
    } - set(sys.stdlib_module_names)


@pytest.mark.parametrize("path", sorted((ROOT / "tests" / "optim").rglob("*.py")), ids=lambda path: path.name)
def test_the_cores_tests_import_no_framework_and_no_layer_above_it(path):
    names = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom)) and (isinstance(node, ast.Import) or node.module)
        for alias in (node.names if isinstance(node, ast.Import) else [None])
    }
    above = [f"engine_opt.{layer}" for layer in list(LAYERS)[1:]]
    wrong = sorted(name for name in names if name.split(".")[0] in FRAMEWORKS or name.startswith(tuple(above)))
    assert wrong == [], f"{path.name} tests the core through {wrong}: such a test belongs with that layer's"


def test_no_private_ignite_name_outside_its_fence():
    uses = [
        (path.relative_to(PACKAGE), number)
        for path in PACKAGE.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "._event_handlers" in line or "_fire_event" in line
    ]
    assert {str(path) for path, _ in uses} <= {"engine/ignite_internals.py"}, uses


def test_the_package_imports_its_names_and_subpackages_on_first_use():
    """``import engine_opt`` loads nothing heavy; each name and subpackage comes with its first use."""
    code = (
        "import sys, engine_opt\n"
        "before = sorted({'torch', 'ignite'} & set(sys.modules))\n"
        "subpackages = [engine_opt.optim.__name__, engine_opt.engine.__name__, engine_opt.checkpoint.__name__,\n"
        "               engine_opt.handlers.__name__, engine_opt.app.__name__]\n"
        "print(before, subpackages, engine_opt.OptimWrapper.__module__, engine_opt.create_trainer.__module__)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.split("]")[0] == "[", result.stderr
    assert "'engine_opt.optim', 'engine_opt.engine', 'engine_opt.checkpoint'" in result.stdout
    assert result.stdout.rstrip().endswith("engine_opt.optim.wrapper engine_opt.engine.trainer")
