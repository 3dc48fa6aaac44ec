"""The layering the project promises, checked from the source with `ast` (every import, lazy ones included).

- formats/ imports nothing above it (dataprep, trainer, cli) and never torch;
- dataprep/ never imports torch, trainer or cli;
- trainer/ never imports dataprep or cli;
- no library imports cli;
- no import cycle between the modules of any package (a lazy import inside a function still counts: it only
  hides the cycle from Python, not from a reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("formats", "dataprep", "trainer", "cli")
FORBIDDEN = {
    "formats": {"dataprep", "trainer", "cli", "torch"},
    "dataprep": {"trainer", "cli", "torch"},
    "trainer": {"dataprep", "cli"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path) -> str:
    return _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]


def _imports(path: Path, package: str) -> list[tuple[str, int]]:
    """Every module the file imports (absolute names; `package` anchors relative imports), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, node.lineno))
            # `from pkg import module` imports a module, not a name: follow it for the cycle check.
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return out


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def test_no_forbidden_edges() -> None:
    problems = []
    for module, path in _sources().items():
        top = module.split(".")[0]
        banned = FORBIDDEN.get(top, set()) | ({"cli"} if top != "cli" else set())
        for name, line in _imports(path, _package_of(path)):
            target = name.split(".")[0]
            if target in banned:
                problems.append(f"{path.relative_to(REPO)}:{line}: {top}/ imports {name}")
    assert not problems, "\n".join(problems)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package: str) -> None:
    sources = _sources()
    modules = {m for m in sources if m.split(".")[0] == package and m != package}
    graph = {m: {name for name, _ in _imports(sources[m], _package_of(sources[m])) if name in modules and name != m}
             for m in modules}
    cycle = _cycle(graph)
    assert cycle is None, f"import cycle in {package}/: {' -> '.join(cycle)}"


def test_the_checker_finds_a_cycle_and_a_forbidden_edge(tmp_path: Path) -> None:
    """The two checks above must be able to fail: a planted cycle and a planted edge are found."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    planted = tmp_path / "mod.py"
    planted.write_text("def f():\n    from trainer import loop\n    import torch.nn\n", encoding="utf-8")
    names = {name for name, _ in _imports(planted, "")}
    assert {"trainer", "trainer.loop", "torch.nn"} <= names

