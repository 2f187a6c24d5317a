"""The README and the example config stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from iaflash.agent.config import Config, load_config, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_config_key_under_its_section() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = []
    for section, field in Config.model_fields.items():
        assert field.annotation is not None
        match = re.search(rf"\*\*\[{section}\]\*\*(.*?)(\n\*\*\[|\n## )", readme, re.S)
        assert match, f"README has no [{section}] table"
        for key in field.annotation.model_fields:
            if f"`{key}`" not in match.group(1):
                missing.append(f"{section}.{key}")
    assert missing == []


def test_example_config_is_valid_and_not_just_defaults() -> None:
    cfg = load_config(ROOT / "docs" / "agent.example.toml")
    assert cfg.mqtt.tls is True and cfg.mqtt.port == 8883
    assert cfg.site.site_id == "A13-PK42"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run test     # the test suite" in readme
    assert "\n./run test\n" in ci


def test_readme_config_reference_is_the_generated_one() -> None:
    """README's tables are exactly reference_markdown(): regenerate with ./run docs after a config change."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- config-reference:start")
    body = readme[readme.index("\n", start) + 1 : readme.index("<!-- config-reference:end -->")]
    assert body == reference_markdown()
