"""The house rules of the library, checked on its source: short modules, no import cycle
between files, folders that import downward only, nothing from launch/ or bench/, and an
``import dlion`` that leaves the process as it was."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "dlion"
# A module is one purpose, read in one sitting: at most 400 lines. What a reader must hold in
# mind at once is a definition, so that is capped hard instead of squeezing files under 300.
MAX_LINES = 400
MAX_DEFINITION_LINES = 60
# Floors, bottom first: a folder (or top-level module) imports only from its own floor and
# the ones below. dlion/__init__ is the public face above them all.
FLOORS: list[set[str]] = [
    {"version", "wire", "ledger", "checks"},
    {"kernels"},
    {"transport"},
    {"compress"},
    {"aggregate"},
    {"server"},
    {"worker"},
    {"train", "integrations"},
    {"run", "report"},
    {"cli", "__main__"},
]


# Rooms inside worker/, bottom first: the shared skeleton, then the Lion engine and the
# baselines side by side (neither imports the other), then the catalogue that builds them all.
WORKER_ROOMS: list[set[str]] = [{"core"}, {"lion", "baselines"}, {"local"}, {"catalogue", "__init__"}]


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(LIB.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The dlion modules ``name`` imports: ``from pkg import sub`` counts as importing sub."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            subs = {f"{module}.{a.name}" for a in node.names} & set(mods)
            found |= subs or {module}
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_module_of_the_library_is_longer_than_the_guide() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in LIB.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_no_function_of_the_library_is_longer_than_a_screen() -> None:
    long = {}
    for path in LIB.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_DEFINITION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = n
    assert long == {}


def test_the_library_never_imports_launch_or_bench() -> None:
    upward = {
        m: sorted(d for d in deps if d.split(".")[0] in ("launch", "bench")) for m, deps in _graph().items()
    }
    assert {m: d for m, d in upward.items() if d} == {}


def test_no_import_cycle_between_files() -> None:
    graph = {m: {d for d in deps if d in _modules() and d != m} for m, deps in _graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_folders_import_downward_only() -> None:
    floor = {name: level for level, names in enumerate(FLOORS) for name in names}
    folders = {_folder(m) for m in _modules()} - {"__init__"}
    assert folders <= set(floor), f"give {sorted(folders - set(floor))} a floor in FLOORS"
    upward = []
    for module, deps in _graph().items():
        here = _folder(module)
        if here == "__init__":
            continue
        for dep in deps:
            if dep.startswith("dlion.") and floor[_folder(dep)] > floor[here]:
                upward.append(f"{module} imports {dep}")
    assert upward == []


def test_worker_rooms_import_downward_only() -> None:
    room = {name: level for level, names in enumerate(WORKER_ROOMS) for name in names}

    def room_of(module: str) -> str:
        parts = module.split(".")
        return parts[2] if len(parts) > 2 else "__init__"

    worker = {m: deps for m, deps in _graph().items() if m.startswith("dlion.worker")}
    assert {room_of(m) for m in worker} <= set(room), "give every worker/ room a level in WORKER_ROOMS"
    crossing = [
        f"{m} imports {d}"
        for m, deps in worker.items()
        for d in deps
        if d.startswith("dlion.worker.") and room_of(d) != room_of(m) and room[room_of(d)] >= room[room_of(m)]
    ]
    assert crossing == []


@pytest.mark.parametrize("module", ["dlion", "dlion.cli"])
def test_importing_dlion_leaves_the_process_as_it_was(module: str) -> None:
    """No environment change and no numba.cuda (nor a NumPy patch for it) on import."""
    code = (
        "import json, os, sys; import numpy; before = dict(os.environ); rows = hasattr(numpy, 'row_stack');"
        f"import {module};"
        "print(json.dumps({'env': {k: v for k, v in os.environ.items() if before.get(k) != v},"
        "'cuda': sorted(m for m in sys.modules if m.startswith('numba.cuda')),"
        "'row_stack': hasattr(numpy, 'row_stack') == rows}))"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"env": {}, "cuda": [], "row_stack": True}
