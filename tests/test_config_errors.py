"""agent.config errors as a technician reads them: the line of the key, "did you mean" for a
typo, and a protocol version written as a number."""

from __future__ import annotations

from pathlib import Path

import pytest

from iaflash.agent.config import line_of, load_config
from iaflash.agent.errors import ConfigError

TEXT = """[site]
site_id = "site-7"
device_id = "box-3"

[mqtt]
host = "127.0.0.1"
prot = 1883

[decision]
min_top_1 = 0.5
"""


def _issues(tmp_path: Path, text: str) -> dict[str, tuple[int | None, str, str]]:
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return {i.key: (i.line, i.fix, str(i)) for i in info.value.issues}


def test_unknown_keys_carry_their_line_and_the_closest_allowed_key(tmp_path: Path) -> None:
    issues = _issues(tmp_path, TEXT)
    line, fix, text = issues["mqtt.prot"]
    assert line == 7 and fix.startswith("did you mean 'port'?")
    assert text.startswith(f"{tmp_path / 'agent.toml'}:7: mqtt.prot:")
    line, fix, _ = issues["decision.min_top_1"]
    assert line == 10 and fix.startswith("did you mean 'min_top1'?")


def test_a_misspelt_section_points_at_its_header_and_the_section_it_meant(tmp_path: Path) -> None:
    issues = _issues(tmp_path, '[site]\nsite_id = "s"\ndevice_id = "d"\n\n[mqqt]\nport = 1\n')
    line, fix, _ = issues["mqqt"]
    assert line == 5 and fix.startswith("did you mean 'mqtt'?")


def test_no_guess_when_nothing_is_close(tmp_path: Path) -> None:
    issues = _issues(tmp_path, '[site]\nsite_id = "s"\ndevice_id = "d"\nzzzzqqq = 1\n')
    line, fix, _ = issues["site.zzzzqqq"]
    assert line == 4 and "did you mean" not in fix and fix.startswith("remove it or correct its spelling")


@pytest.mark.parametrize(("written", "expected"), [("5", "5"), ('"5"', "5"), ('"3.1.1"', "3.1.1")])
def test_protocol_may_be_written_as_a_number(tmp_path: Path, written: str, expected: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[site]\nsite_id = "s"\ndevice_id = "d"\n[mqtt]\nprotocol = {written}\n', encoding="utf-8")
    assert load_config(path).mqtt.protocol == expected


def test_other_protocol_numbers_are_still_refused_with_the_line(tmp_path: Path) -> None:
    issues = _issues(tmp_path, '[site]\nsite_id = "s"\ndevice_id = "d"\n[mqtt]\nprotocol = 4\n')
    assert issues["mqtt.protocol"][0] == 5


def test_line_of_ignores_keys_of_other_tables() -> None:
    text = "[a]\nx = 1\n[b]\nx = 2\n"
    assert (line_of(text, ("a", "x")), line_of(text, ("b", "x")), line_of(text, ("c", "x"))) == (2, 4, None)
