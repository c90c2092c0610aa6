"""The shape of the house: no import cycles, trainers reach tasks only through the task
interface, and maths stays in the pure modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "reward_models")


def module_imports() -> dict[str, set[str]]:
    """Project module -> project modules it imports (at module level or inside functions)."""
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[name].update(t for t in targets if t in files and t != name)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(module_imports())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_trainers_reach_tasks_only_through_the_interface():
    edges = module_imports()
    interface = {"align.tasks", "align.tasks.base"}
    offenders = [m for m in edges if m.startswith("align.trainers")
                 and any(e.startswith("align.tasks.") and e not in interface for e in edges[m])]
    assert not offenders


def test_pure_modules_import_nothing_from_the_project():
    pure = {"align.losses", "align.preference_losses", "align.advantages"}
    edges = module_imports()
    for module in pure:
        assert edges[module] <= pure, (module, edges[module] - pure)


def test_reward_package_stays_small():
    modules = [p for p in (ROOT / "reward_models").glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 9, sorted(p.name for p in modules)
