"""The package's structure (README "Layout"): every module in one layer, imports that go one way, short functions.

Imports are read with ``ast`` from the source (module-level, function-local and ``TYPE_CHECKING``
imports alike), so a lazy import inside a function cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxauction"
MAX_FUNCTION_LINES = 80

CORE = {
    "_validation",
    "aggregation",
    "auction",
    "base",
    "mechanism",
    "payments",
    "preferences",
    "reply_mechanism",
    "rules",
    "sampling",
    "vocabulary",
}
"""The mechanism maths (add the mechanism-spec module here when it lands; a ``core/`` package counts whole)."""
SHARED = {"outputs", "prompts", "sharding", "text"}
"""Helpers of the engine and the application with no mechanism, model or command-line knowledge."""
APPLICATION = {"__main__", "batch", "cli", "compare", "config", "console", "reply", "simulation", "sweep"}
PACKAGES = {"core": "core", "models": "models", "engine": "engine", "design": "design"}
"""Subpackages and the layer all their modules belong to."""


def layer(module: str) -> str | None:
    """The layer of ``jaxauction.<module>`` (dotted, without the ``jaxauction.`` prefix), or None."""
    if module == "":
        return "package"  # jaxauction/__init__.py: the public ja.* names, above every layer
    top = module.split(".")[0]
    if top in PACKAGES:
        return PACKAGES[top]
    for name, modules in (("core", CORE), ("shared", SHARED), ("application", APPLICATION)):
        if top in modules:
            return name
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """The ``jaxauction`` modules ``source`` (the module ``jaxauction.<module>``) imports, dotted and
    without the ``jaxauction.`` prefix; ``""`` is the package itself (a name ``__init__`` defines or re-exports).

    ``from jaxauction.x import y`` counts as importing ``x.y`` when ``y`` is a module, else ``x``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "jaxauction"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["jaxauction", *package.split(".")] if package else ["jaxauction"]
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] != "jaxauction":
                continue
            for alias in node.names:
                full = f"{origin}.{alias.name}"
                found.add(full if _is_module(full) else origin)
    return {name.removeprefix("jaxauction").removeprefix(".") for name in found}


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(module_layer: str) -> dict[str, set[str]]:
    return {
        module: imported_modules(path.read_text(), module, path.name == "__init__.py")
        for module, path in package_modules().items()
        if layer(module) == module_layer
    }


def violations(module_layer: str, allowed) -> list[str]:
    return [
        f"jaxauction.{module} imports jaxauction.{target or '(the package)'}"
        for module, targets in sorted(imports_of(module_layer).items())
        for target in sorted(targets)
        if not allowed(target)
    ]


def test_the_import_reader_sees_every_kind_of_import():
    source = """
import numpy
import jaxauction.engine.plan
from jaxauction import payments, generate
from . import aggregation
from .models import kv_cache
from ..rules import linear

def lazy():
    from jaxauction.models import load
    import jaxauction.cli as cli
"""
    assert imported_modules(source, "engine.step") == {
        "engine.plan",
        "payments",
        "",  # generate: a name of the package's __init__
        "engine",  # from . import aggregation: no jaxauction/engine/aggregation.py
        "engine.models",
        "rules",
        "models",
        "cli",
    }
    assert imported_modules("from . import rules", "", is_package=True) == {"rules"}


def test_every_module_is_in_one_layer():
    """A new module must be placed in a layer (here and in the README's Layout), so the rules below cover it."""
    unplaced = [
        f"jaxauction/{path.relative_to(PACKAGE)}" for module, path in package_modules().items() if layer(module) is None
    ]
    assert not unplaced, (
        f"modules in no layer (add them to CORE, SHARED or APPLICATION in tests/test_layout.py): {unplaced}"
    )


def test_the_mechanism_core_imports_only_the_core():
    """The mechanism maths imports nothing of models, engine, design, the application or the package's
    ``__init__`` (which imports everything)."""
    assert not violations("core", lambda target: layer(target) == "core")


def test_shared_helpers_import_only_the_core_and_each_other():
    assert not violations("shared", lambda target: layer(target) in ("core", "shared"))


def test_models_import_nothing_of_engine_design_or_the_application():
    """Models may use the core's neutral helpers (``_validation.is_concrete``), never the layers above them."""
    assert not violations("models", lambda target: layer(target) in ("core", "shared", "models"))


def test_the_engine_imports_nothing_of_design_or_the_application():
    assert not violations("engine", lambda target: layer(target) in ("core", "shared", "models", "engine"))


def test_design_imports_nothing_of_the_application():
    """Rule design runs on the core, and on the engine for auctions drawn from an LLM."""
    assert not violations("design", lambda target: layer(target) in ("core", "shared", "models", "engine", "design"))


def test_the_engine_reaches_models_only_through_the_protocol():
    """What the engine may ask of a model is stated once, in ``jaxauction.models.base``; nothing else of
    ``models/`` is imported by the engine."""
    assert not violations("engine", lambda target: layer(target) != "models" or target == "models.base")


def long_functions() -> list[str]:
    found = []
    for module, path in package_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"jaxauction.{module}.{node.name} ({lines} lines)")
    return found


def test_the_length_check_counts_a_whole_function():
    """``end_lineno - lineno + 1`` counts a function's signature, docstring, body and nested functions."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    (node,) = ast.parse(f"def f():\n{body}\n").body
    assert node.end_lineno - node.lineno + 1 == MAX_FUNCTION_LINES


def test_no_function_is_over_80_lines():
    assert not long_functions()
