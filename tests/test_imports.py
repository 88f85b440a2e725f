"""Import hygiene: the package graph of posttrain (subpackages and top-level modules, imports inside functions
included) has no cycle, nothing below the training loop imports it, and importing the rewards does not load it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "posttrain"


def _unit(module: str) -> str:
    """The graph node of a module: ``posttrain`` itself, or ``posttrain.<subpackage or top-level module>``."""
    parts = module.split(".")
    if len(parts) == 1:
        return module
    return ".".join(parts[:2]) if (ROOT / parts[1]).is_dir() or (ROOT / f"{parts[1]}.py").is_file() else parts[0]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> list[str]:
    """Every posttrain module ``path`` imports, at any depth (functions too); ``from a import b`` names a.b."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [f"{base}.{alias.name}" for alias in node.names]
    return [name for name in found if name == "posttrain" or name.startswith("posttrain.")]


def import_graph() -> dict[str, dict[str, list[str]]]:
    """{node: {imported node: [files making that import]}} over all of posttrain, self-edges left out."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        source = _unit(_module_name(path))
        edges = graph.setdefault(source, {})
        for name in _imported(path):
            target = _unit(name)
            if target != source:
                edges.setdefault(target, []).append(str(path.relative_to(ROOT.parent)))
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search, nodes in sorted order)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_on_small_graphs():
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {}}) is None
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {"b2": []}, "b2": {"b": []}}) == ["b", "b2", "b"]


def test_graph_sees_imports_inside_functions():
    graph = import_graph()
    # posttrain/eval/harness.py imports posttrain.search only inside functions.
    assert "posttrain.search" in graph["posttrain.eval"]
    assert {"posttrain.train", "posttrain.eval", "posttrain.rewards", "posttrain.tasks"} <= set(graph)


def test_package_graph_has_no_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        edges = [f"  {a} -> {b}: {', '.join(sorted(set(graph[a][b])))}" for a, b in zip(cycle, cycle[1:])]
        print("import cycle:", " -> ".join(cycle), *edges, sep="\n")
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


# Layers: nothing on the left may import anything on the right.
FORBIDDEN = [
    ({"posttrain.rewards", "posttrain.search", "posttrain.rollout", "posttrain.tasks", "posttrain.eval"}, "train"),
    ({"posttrain.search"}, "eval"),
    ({"posttrain.tasks"}, "rewards"),
]


@pytest.mark.parametrize("sources, target", FORBIDDEN, ids=[t for _, t in FORBIDDEN])
def test_lower_layers_do_not_import_higher_ones(sources, target):
    graph = import_graph()
    bad = {s: graph[s][f"posttrain.{target}"] for s in sorted(sources) if f"posttrain.{target}" in graph.get(s, {})}
    assert bad == {}


def _modules_loaded_by(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, check=True)
    return out.stdout.split()


# Loads posttrain's subpackages without running posttrain/__init__.py (the facade that imports every stage).
_BARE_ROOT = (
    "import sys, types; root = types.ModuleType('posttrain'); root.__path__ = ['posttrain']; "
    "sys.modules['posttrain'] = root; "
)


def test_rewards_subpackage_does_not_load_the_training_loop():
    code = _BARE_ROOT + "import posttrain.rewards, posttrain.rewards.verify; print(*sorted(sys.modules))"
    loaded = _modules_loaded_by(code)
    assert "posttrain.rewards.verify" in loaded
    assert [m for m in loaded if m.startswith("posttrain.train")] == []


def test_importing_rewards_does_not_load_the_training_loop():
    loaded = _modules_loaded_by("import sys, posttrain.rewards; print(*sorted(sys.modules))")
    assert "posttrain.rewards" in loaded
    assert [m for m in loaded if m.startswith("posttrain.train")] == []
