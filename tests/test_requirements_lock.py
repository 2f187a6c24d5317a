"""requirements/box.lock pins every runtime dependency with hashes, and each locked package has its licence listed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "box.lock"
_ENTRY = re.compile(
    r"^([A-Za-z0-9_.-]+)==(\S+?)(?:\s*;\s*([^\\]+?))?\s*\\\n((?:\s+--hash=sha256:[0-9a-f]{64}\s*\\?\n?)+)", re.M
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of every pinned entry."""
    text = LOCK.read_text()
    entries = {canonical(m[1]): (m[2], re.findall(r"sha256:([0-9a-f]{64})", m[4])) for m in _ENTRY.finditer(text)}
    pinned_lines = [line for line in text.splitlines() if line and not line[0].isspace() and not line.startswith("#")]
    assert len(pinned_lines) == len(entries), "a line of the lock is not 'name==version \\' followed by its hashes"
    return entries


def runtime_dependencies() -> list[Requirement]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(r) for r in doc["project"]["dependencies"]]


def test_every_runtime_dependency_of_pyproject_is_locked_at_a_version_it_allows_with_hashes() -> None:
    entries = lock_entries()
    box = {
        "python_version": "3.10", "python_full_version": "3.10.12", "sys_platform": "linux",
        "platform_machine": "aarch64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
    }  # fmt: skip
    deps = runtime_dependencies()
    assert len(deps) >= 10
    for req in deps:
        if req.marker is not None and not req.marker.evaluate(box):
            continue
        name = canonical(req.name)
        assert name in entries, f"{req} is not in {LOCK.name}: run python requirements/refresh.py"
        version, hashes = entries[name]
        assert Version(version) in req.specifier, f"{name}=={version} is outside pyproject's {req.specifier}"
        assert hashes, f"{name} has no hash"


def test_every_locked_package_is_pinned_exactly_with_at_least_one_hash() -> None:
    entries = lock_entries()
    assert len(entries) >= len(runtime_dependencies())
    for name, (version, hashes) in entries.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), (name, version)
        assert hashes and len(set(hashes)) == len(hashes), name


def test_every_locked_package_has_its_licence_listed_at_its_version() -> None:
    text = (ROOT / "docs" / "LICENCES.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (\S+) \| .+ \|$", text, re.M))
    for name, (version, _) in lock_entries().items():
        assert rows.get(name) == version, f"{name}=={version} is not listed in docs/LICENCES.md"
    assert set(rows) == set(lock_entries())


def test_the_readme_installs_the_box_from_the_lock_with_hashes() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "pip install --require-hashes -r requirements/box.lock" in readme
