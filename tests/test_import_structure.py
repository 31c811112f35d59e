"""The package's imports form floors: no circle and no arrow back up.

Every import in ``megatron_mpo/`` counts, the lazy ones inside functions included (they
are still dependencies; laziness only moves when they are paid). Two graphs are checked:
files, and rooms (a top-level module, or a sub-package as a whole). A circle among files
means two modules share one concern; a circle among rooms is an arrow running back up a
floor (``training`` importing ``conversion`` while ``conversion`` imports ``training``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_mpo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in it (``from x import y`` names module
    ``x.y`` when that is a module, else ``x``)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("megatron_mpo") and target not in (name, "megatron_mpo"):
                out.add(target)
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}
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


@pytest.fixture(scope="module")
def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    known = set(modules)
    files = {name: _imports(path, name, known) for name, path in modules.items()}
    rooms: dict[str, set[str]] = {}
    for name, targets in files.items():
        if name.count(".") == 1 and modules[name].name == "__init__.py":
            continue  # a sub-package's __init__ re-exports its own modules: no arrow of the room
        for target in targets:
            if _room(target) != _room(name):
                rooms.setdefault(_room(name), set()).add(_room(target))
    return files, rooms


def test_the_graph_sees_lazy_and_relative_imports():
    known = set(_modules())
    train = _imports(PACKAGE / "train.py", "megatron_mpo.train", known)
    assert {"megatron_mpo.parallel", "megatron_mpo.training.checkpoint", "megatron_mpo.config"} <= train
    # console imports platform inside a function only.
    assert "megatron_mpo.platform" in _imports(PACKAGE / "console.py", "megatron_mpo.console", known)
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_between_files(graphs):
    files, _ = graphs
    assert _cycle(files) is None, " -> ".join(_cycle(files))


def test_no_arrow_back_up_between_rooms(graphs):
    _, rooms = graphs
    assert _cycle(rooms) is None, " -> ".join(_cycle(rooms))
