"""Build a complete, real agent site in a temp dir: demo bundle, HMAC key, registry, config.

Used by the end-to-end tests. Everything is real files; nothing is mocked.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from iaflash.agent.config import Config, parse_config
from iaflash.agent.demo.runner import demo_config
from iaflash.agent.demo.scenario import DemoCapture, build_scenario, registry_rows, start_time, write_capture
from iaflash.agent.registry.cache import import_subset, records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(doc: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


@dataclass
class Site:
    root: Path
    cfg: Config
    config_file: Path
    scenario: list[DemoCapture]
    key: bytes

    @property
    def incoming(self) -> Path:
        return self.cfg.spool.dir / "incoming"

    def expected_flags(self) -> dict[str, str]:
        """capture_id -> 'mismatch/make' | 'mismatch/model' for every capture that must be flagged."""
        return {c.capture_id: c.expect for c in self.scenario if c.expect.startswith("mismatch")}

    def expected_verdicts(self) -> int:
        return sum(c.expect != "rejected" for c in self.scenario)

    def drop(self, captures: list[DemoCapture]) -> None:
        t0 = start_time()
        for c in captures:
            i = int(c.capture_id.split("-")[1])
            write_capture(c, self.incoming, t0 + timedelta(seconds=5 * i), seed=1000 + i)

    def processed_count(self) -> int:
        db = self.cfg.outbox.db
        if not db.exists():
            return 0
        with sqlite3.connect(db, timeout=10) as conn:
            try:
                return int(conn.execute("SELECT count(*) FROM processed").fetchone()[0])
            except sqlite3.OperationalError:  # table not created yet
                return 0

    def files_in(self, sub: str, pattern: str = "*") -> list[Path]:
        return sorted((self.cfg.spool.dir / sub).glob(pattern))


def build_models(out: Path) -> Path:
    """Signed demo classifier + demo detector and the trust store holding their publisher's key (role models)."""
    from iaflash.agent.demo.detector import build_demo_detector_bundle
    from iaflash.agent.demo.model import build_demo_bundle
    from iaflash.engines.signing import generate_keypair, sign_bundle

    out.mkdir(parents=True, exist_ok=True)
    (out / "trust" / "models").mkdir(parents=True)  # the trust store's folder for the model publisher's role
    private, public = generate_keypair(out / "publisher", role="models")
    shutil.copy(public, out / "trust" / "models" / public.name)
    _, accuracy = build_demo_bundle(out / "model")
    assert accuracy > 0.95
    build_demo_detector_bundle(out / "detector")
    for bundle in ("model", "detector"):
        sign_bundle(out / bundle, private, signer="test-publisher")
    return out


def make_site(
    root: Path,
    models: Path,
    port: int,
    *,
    n: int = 50,
    protocol: str = "5",
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Site:
    """A site whose registry matches the demo scenario of n captures (models from build_models)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "secrets").mkdir()
    key = secrets.token_bytes(32)
    key_file = root / "secrets" / "hmac.key"
    key_file.write_text(key.hex())
    os.chmod(key_file, 0o600)
    for sub in ("model", "detector", "trust"):
        shutil.copytree(models / sub, root / sub)
    scenario = build_scenario(n)
    subset = root / "snapshot.jsonl.gz"
    write_subset(
        subset,
        kind="snapshot",
        dataset_id="test-siv",
        seq=1,
        key_id=key_id(key),
        records=records_from_plates(key, registry_rows(scenario)),
    )
    import_subset(root / "registry.db", subset, expected_key_id=key_id(key))
    doc = demo_config(root, port, protocol)
    doc["log"] = {"level": "INFO", "format": "json"}
    for section, values in (overrides or {}).items():
        doc.setdefault(section, {}).update(values)
    config_file = root / "agent.toml"
    config_file.write_text(to_toml(doc))
    cfg = parse_config(doc, str(config_file))
    (cfg.spool.dir / "incoming").mkdir(parents=True, exist_ok=True)
    return Site(root, cfg, config_file, scenario, key)
