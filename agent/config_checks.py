"""Checks a valid config can still fail: the bundle, the HMAC key and the paths it names.

Shared by ``iaflash-agent check-config`` and ``iaflash-provision doctor``.
"""

from __future__ import annotations

from iaflash.agent.config import Config, read_secret
from iaflash.agent.errors import ConfigError, ConfigIssue
from iaflash.engines.errors import EngineError
from iaflash.engines.signing import load_trusted_bundle

__all__ = ["semantic_issues"]


def semantic_issues(cfg: Config, file: str) -> list[ConfigIssue]:
    """Problems a valid file can still have: missing bundle, unreadable key, unusable paths."""
    issues: list[ConfigIssue] = []
    try:
        load_trusted_bundle(
            cfg.model.bundle, cfg.security.trust_dir, cfg.security.allow_unsigned, state_file=cfg.trust_state_file
        )
    except EngineError as exc:
        issues.append(
            ConfigIssue(
                file,
                "model.bundle",
                str(exc),
                "point it at a bundle directory (manifest.json, model.onnx, labels.csv); see docs/BUNDLES.md",
            )
        )
    try:
        read_secret("hmac-key", cfg.registry.hmac_key_file, what="HMAC key", config_key="registry.hmac_key_file")
    except ConfigError as exc:
        issues.extend(ConfigIssue(file, i.key, i.problem, i.fix) for i in exc.issues)
    for key, path in (
        ("spool.dir", cfg.spool.dir),
        ("outbox.db", cfg.outbox.db.parent),
        ("registry.db", cfg.registry.db.parent),
    ):
        parent = next((p for p in (path, *path.parents) if p.exists()), None)
        if parent is None or not parent.is_dir():
            issues.append(
                ConfigIssue(
                    file, key, f"{path} has no existing parent directory", "create the directory or fix the path"
                )
            )
    return issues
