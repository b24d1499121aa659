"""The package's shape: imports run one way (config is a leaf, no cycle anywhere, lazy imports included), and the
names a config can take are those of the registries that build them."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path
from typing import get_args, get_type_hints

from lmsprint.config import NOUNS, SECTIONS, ModelConfig, OptimConfig, ScheduleConfig
from lmsprint.model import PRESETS, GPTConfig
from lmsprint.optim import OPTIMIZERS
from lmsprint.optim.base import Fp32StateOptimizer
from lmsprint.schedules import DECAYS, SHAPES

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, modules: set[str], me: str) -> set[str]:
    """The lmsprint modules module ``me`` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if n in modules else node.module for n in names]
        for name in names:
            if name.startswith("lmsprint.") and name in modules:
                out.add(name)
                # importing a.b.c first runs package a.b (unless it is one of this module's own packages, already
                # running; the root package's imports are lazy)
                parts = name.split(".")
                out.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts)))
                           if p in modules and not me.startswith(p + "."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(paths)
    return {name: _imported(ast.parse(path.read_text()), modules, name) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40 and "lmsprint.training.trainer" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_config_is_a_leaf() -> None:
    """The config package imports nothing of lmsprint but itself and the error classes."""
    graph = import_graph()
    config = [m for m in graph if m == "lmsprint.config" or m.startswith("lmsprint.config.")]
    assert len(config) >= 2
    for module in config:
        outside = {m for m in graph[module] if not m.startswith("lmsprint.config")} - {"lmsprint.errors"}
        assert not outside, f"{module} imports {sorted(outside)}"


def test_names_are_the_registries() -> None:
    """Each name field's Literal lists exactly what its registry builds (add a name to both, or the test says so)."""
    assert get_args(get_type_hints(OptimConfig)["name"]) == tuple(OPTIMIZERS)
    assert set(get_args(get_type_hints(ScheduleConfig)["name"])) == set(SHAPES)
    assert set(get_args(get_type_hints(ScheduleConfig)["decay_shape"])) == set(DECAYS)
    assert get_args(get_type_hints(ModelConfig)["preset"]) == tuple(PRESETS)
    for key in NOUNS:
        section, name = key.split(".")
        assert get_args(get_type_hints(SECTIONS[section])[name]), key


def test_every_registered_optimizer_builds_from_the_config() -> None:
    for name, cls in OPTIMIZERS.items():
        assert issubclass(cls, Fp32StateOptimizer), name
        assert "from_config" in cls.__dict__, f"{cls.__name__} does not define from_config"
        assert "auto" in cls.impls, name


def test_the_model_config_names_the_model_shape() -> None:
    """GPTConfig is built from ModelConfig field by field: every architecture field exists in both."""
    model_fields = {f.name for f in fields(ModelConfig)}
    gpt_fields = {f.name for f in fields(GPTConfig)}
    assert gpt_fields - model_fields == {"vocab_size", "block_size"}  # from the data
    assert model_fields - gpt_fields == {"preset"}  # resolved into n_layer, n_head, n_embd
