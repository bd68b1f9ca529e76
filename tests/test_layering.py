"""The core's shape, read from its import graph: layers that import only downward, no cycles, no
imports inside functions, and only public (``__all__``) names between modules and from plugins."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "peftkit"
PLUGINS = sorted((ROOT / "plugins").glob("*.py")) + [ROOT / "examples" / "peftkit-ia3" / "peftkit_ia3.py"]

# Bottom to top. A module may import only from layers below its own (data flows one way:
# selection -> plan -> build -> attach -> run; file <-> plan). docs/architecture.md describes each.
LAYERS: list[set[str]] = [
    {"errors", "transaction", "hookspecs", "sharding"},  # no peftkit imports
    {"nf4"},  # NF4 layers that dequantize a chunk at a time
    {"quantized"},  # quantized tensors seen as float ones
    {"container", "targets", "fisher", "fastpaths", "rows", "combination", "composition"},  # bytes on disk; selection; Fisher information; fast paths; mixed batches; task arithmetic
    {"method"},  # what a plugin implements: Method, Plan, Adapter, deltas
    {"plugins", "heads", "attach"},  # the registry; output heads; the runtime's hooks
    {"plan"},  # selection -> plan
    {"build"},  # plan -> modules
    {"files"},  # file <-> plan
    {"model"},  # AdaptedModel: attach, run, merge
    {"formats", "recipes", "distributed", "domain", "quantization"},  # file formats; recipes; FSDP2; domain adaptation; QLoRA
    {"io"},  # save, load, hotswap
    {"__init__"},  # the public API
    {"demo", "testing", "hf", "classify", "lightning"},  # users of the public API: demo, kit, trainers, `peftkit train`
    {"cli"},  # the command line
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _peftkit_module(node: ast.ImportFrom | ast.Import, in_core: bool) -> list[tuple[str, list[str]]]:
    """(peftkit module imported, names imported from it) for one import statement."""
    if isinstance(node, ast.Import):
        return [("__init__" if a.name == "peftkit" else a.name.split(".")[1], [])
                for a in node.names if a.name == "peftkit" or a.name.startswith("peftkit.")]
    names = [a.name for a in node.names]
    if node.level == 1 and in_core:
        return [(node.module.split(".")[0], names)] if node.module else [(n, []) for n in names]
    if node.level == 0 and node.module and (node.module == "peftkit" or node.module.startswith("peftkit.")):
        return [(node.module.split(".")[1] if "." in node.module else "__init__", names)]
    return []


def _imports(path: Path, in_core: bool) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(top-level peftkit imports, imports of peftkit found inside functions or classes) of one file."""
    tree = ast.parse(path.read_text())
    top: list[tuple[str, list[str]]] = []
    nested: list[str] = []

    def visit(body: list[ast.stmt], inside: bool) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found = _peftkit_module(node, in_core)
                (nested.extend(f"line {node.lineno}: {m}" for m, _ in found) if inside else top.extend(found))
            for child_body in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, child_body, None)
                if isinstance(children, list) and children and isinstance(children[0], (ast.stmt, ast.excepthandler)):
                    deeper = inside or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    visit([c for c in children if isinstance(c, ast.stmt)]
                          + [s for h in children if isinstance(h, ast.excepthandler) for s in h.body], deeper)

    visit(tree.body, False)
    return top, nested


def _graph() -> dict[str, set[str]]:
    return {p.stem: {m for m, _ in _imports(p, True)[0]} for p in CORE.glob("*.py")}


def test_every_core_module_has_a_layer() -> None:
    modules = {p.stem for p in CORE.glob("*.py")}
    assert modules == set(LAYER), f"add to LAYERS: {sorted(modules - set(LAYER))}; gone: {sorted(set(LAYER) - modules)}"


@pytest.mark.parametrize("module", sorted(p.stem for p in CORE.glob("*.py")))
def test_imports_only_from_layers_below(module: str) -> None:
    upward = sorted(m for m in _graph()[module] if LAYER[m] >= LAYER[module])
    assert not upward, f"peftkit.{module} (layer {LAYER[module]}) imports {upward} from its own layer or above"


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != 1, f"import cycle: {' -> '.join([*path, m, n])}"
            if n not in state:
                walk(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [])


@pytest.mark.parametrize("path", [*sorted(CORE.glob("*.py")), *PLUGINS], ids=lambda p: p.name)
def test_no_function_level_imports_of_peftkit(path: Path) -> None:
    nested = _imports(path, path.parent == CORE)[1]
    assert not nested, f"{path.name} imports peftkit modules inside functions: {nested}"


@pytest.mark.parametrize("path", [*sorted(CORE.glob("*.py")), *PLUGINS], ids=lambda p: p.name)
def test_only_public_names_cross_modules(path: Path) -> None:
    """Core modules and plugins import from peftkit only names its modules list in ``__all__``:
    the built-in plugins use nothing a third-party plugin could not."""
    bad = []
    for module, names in _imports(path, path.parent == CORE)[0]:
        mod = importlib.import_module("peftkit" if module == "__init__" else f"peftkit.{module}")
        public = set(getattr(mod, "__all__", ()))
        submodules = {n for n in names if hasattr(mod, n) and type(getattr(mod, n)) is type(importlib)}
        bad += [f"{module}.{n}" for n in names if n not in public and n not in submodules]
    assert not bad, f"{path.name} imports names that are not in their module's __all__: {bad}"


def test_the_checks_see_nested_and_upward_imports(tmp_path: Path) -> None:
    """The checks' own test: imports inside functions, methods and try blocks are found, and a
    top-level one is not mistaken for one (so the tests above can fail)."""
    probe = tmp_path / "probe.py"
    probe.write_text("from .errors import ConfigError\n"
                     "def f():\n    from . import model\n    return model\n"
                     "class C:\n    def g(self):\n        try:\n            import peftkit.io\n"
                     "        except ImportError:\n            pass\n")
    top, nested = _imports(probe, True)
    assert top == [("errors", ["ConfigError"])]
    assert nested == ["line 3: model", "line 8: io"]


def test_no_type_ignores_in_the_core() -> None:
    """The core type-checks (strict mypy, ``make lint``) without silencing any line."""
    found = [f"{p.name}:{i}" for p in sorted(CORE.glob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if "type:ignore" in line.replace(" ", "")]
    assert not found, f"`# type: ignore` in peftkit: {', '.join(found)}; type the code instead"
