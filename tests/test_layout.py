"""The layout rules: one installed namespace, every package listed, empty subpackage
``__init__`` files, and no import cycle anywhere (module level, every package)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("agent", "engines", "provisioning", "central")


def _py_files() -> list[Path]:
    return sorted(p for folder in (*FOLDERS, "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py"))


def test_every_package_folder_is_installed_under_the_iaflash_namespace() -> None:
    """pyproject lists exactly the folders that hold an __init__.py, each as iaflash.<path>."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(project["tool"]["setuptools"]["packages"])
    on_disk = {
        "iaflash." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert listed == on_disk, f"add to / remove from pyproject's packages: {sorted(listed ^ on_disk)}"
    assert project["tool"]["setuptools"]["package-dir"] == {f"iaflash.{f}": f for f in FOLDERS}


def test_no_module_imports_a_folder_as_a_top_level_package() -> None:
    """``import agent`` / ``from engines.x import y`` would load a second copy of a module."""
    offenders = []
    for path in _py_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert offenders == []


def test_subpackage_init_files_are_empty_or_docstring_only() -> None:
    """Importing a leaf (say the decision) must not pull in SQLite, paho or cryptography via an __init__."""
    busy = []
    for folder in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            body = ast.parse(init.read_text(encoding="utf-8")).body
            code = [n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
            if code:
                busy.append(str(init.relative_to(ROOT)))
    assert busy == []


def test_importing_the_decision_loads_no_storage_network_or_crypto_library() -> None:
    """Checked in a fresh interpreter: the pure decision stays pure at import time too."""
    code = (
        "import sys, iaflash.agent.decision.verdict; "
        "print(sorted(m for m in ('sqlite3', 'sqlite_utils', 'paho', 'cryptography', 'onnxruntime', 'cv2') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root, first in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(first)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_import_cycles_anywhere(tmp_path: Path) -> None:
    """Every import (lazy and TYPE_CHECKING ones included) points one way, in every package."""
    grimp = pytest.importorskip("grimp")
    farm = tmp_path / "iaflash"
    farm.mkdir()
    for folder in FOLDERS:
        (farm / folder).symlink_to(ROOT / folder)
    sys.path.insert(0, str(tmp_path))
    try:
        graph = grimp.build_graph("iaflash", cache_dir=None)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "iaflash" or m.startswith("iaflash.")]:
            if getattr(sys.modules[name], "__file__", None) and str(tmp_path) in str(sys.modules[name].__file__):
                del sys.modules[name]
    modules = {m for m in graph.modules if not m.endswith(".__init__")}
    assert len(modules) > 80 and "iaflash.agent.decision.verdict" in modules  # the whole tree was read
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in modules} for m in modules}
    assert _strongly_connected(edges) == []
