"""iaflash.agent.config: defaults, a full file, every kind of refusal (file, dotted key, fix), and read_secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iaflash.agent.config import Config, load_config, parse_config, read_secret
from iaflash.agent.errors import ConfigError, ConfigIssue

FULL_TOML = """\
[site]
site_id = "site-042"
device_id = "box-07"

[spool]
dir = "/srv/spool"
poll_interval_s = 0.5
max_image_bytes = 20000000
max_image_pixels = 50000000
min_image_side = 128
max_sidecar_bytes = 4096
retention_days = 7

[model]
bundle = "/srv/models/classifier"
backend = "onnxruntime"
threads = 2

[registry]
db = "/srv/registry.db"
hmac_key_file = "/srv/hmac.key"
max_age_hours = 24

[decision]
min_plate_confidence = 0.7
min_top1 = 0.65
make_threshold = 0.02
model_threshold = 0.03
match_threshold = 0.4
top_k = 3

[outbox]
db = "/srv/state.db"

[mqtt]
host = "broker.example"
port = 8883
protocol = "3.1.1"
client_id = "edge-7"
topic_prefix = "iaflash/v1"
keepalive_s = 60
tls = true
ca_file = "/srv/ca.pem"
cert_file = "/srv/box.pem"
key_file = "/srv/box.key"
username = "box-07"
password_file = "/srv/mqtt.pass"
publish = ["mismatch", "inconclusive"]
max_inflight = 10
republish_after_s = 30
heartbeat_interval_s = 15

[log]
level = "DEBUG"
format = "text"
"""


def _write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _issues(tmp_path: Path, text: str) -> tuple[Path, list[ConfigIssue]]:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return path, info.value.issues


def _only_issue(tmp_path: Path, text: str) -> tuple[Path, ConfigIssue]:
    path, issues = _issues(tmp_path, text)
    assert len(issues) == 1, issues
    assert issues[0].file == str(path)
    return path, issues[0]


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def test_none_gives_the_embedded_defaults() -> None:
    """load_config(None) reads no file and returns the documented defaults."""
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.site.site_id == "site-000"
    assert cfg.spool.dir == Path("/var/lib/iaflash/spool")
    assert cfg.model.backend == "auto"
    assert cfg.decision.min_top1 == 0.6
    assert cfg.decision.model_threshold <= cfg.decision.match_threshold
    assert cfg.mqtt.publish == ["mismatch"]
    assert cfg.mqtt.protocol == "5"
    assert cfg.mqtt.tls is False
    assert cfg.log.format == "json"
    assert cfg.client_id == "iaflash-site-000-box-00"
    assert cfg.topic_root == "iaflash/v1/site-000/box-00"


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    """Every key has a default, so an empty file is a valid config."""
    assert load_config(_write(tmp_path, "")) == Config()


def test_a_full_valid_file_parses_every_key(tmp_path: Path) -> None:
    """Every section and key of a complete file lands in the typed config."""
    cfg = load_config(_write(tmp_path, FULL_TOML))
    assert cfg.site.site_id == "site-042"
    assert cfg.spool.dir == Path("/srv/spool")
    assert cfg.spool.poll_interval_s == 0.5
    assert cfg.spool.retention_days == 7
    assert cfg.model.bundle == Path("/srv/models/classifier")
    assert cfg.model.backend == "onnxruntime"
    assert cfg.model.threads == 2
    assert cfg.registry.hmac_key_file == Path("/srv/hmac.key")
    assert cfg.registry.max_age_hours == 24
    assert cfg.decision.model_dump() == {
        "min_plate_confidence": 0.7,
        "min_top1": 0.65,
        "make_threshold": 0.02,
        "model_threshold": 0.03,
        "match_threshold": 0.4,
        "top_k": 3,
        "other_threshold": 0.3,
        "override_operating_point": False,
    }
    assert cfg.outbox.db == Path("/srv/state.db")
    assert cfg.mqtt.port == 8883
    assert cfg.mqtt.protocol == "3.1.1"
    assert cfg.mqtt.tls is True
    assert cfg.mqtt.key_file == Path("/srv/box.key")
    assert cfg.mqtt.password_file == Path("/srv/mqtt.pass")
    assert cfg.mqtt.publish == ["mismatch", "inconclusive"]
    assert cfg.log.level == "DEBUG"
    assert cfg.client_id == "edge-7"
    assert cfg.topic_root == "iaflash/v1/site-042/box-07"


def test_config_is_frozen() -> None:
    """A loaded config cannot be changed by accident."""
    cfg = load_config(None)
    with pytest.raises(ValueError, match="frozen"):
        cfg.site.site_id = "x"  # type: ignore[misc]  # the point of the test


# ---------------------------------------------------------------------------------------------------
# Refusals: file, dotted key, problem, fix
# ---------------------------------------------------------------------------------------------------


def test_unknown_key_is_refused_with_its_dotted_key_and_the_allowed_keys(tmp_path: Path) -> None:
    """A misspelt key names section.key, and the fix lists the allowed keys of that section."""
    _, issue = _only_issue(tmp_path, "[decision]\nmin_top_1 = 0.5\n")
    assert issue.key == "decision.min_top_1"
    assert "remove it or correct its spelling" in issue.fix
    assert (
        "allowed keys here: make_threshold, match_threshold, min_plate_confidence, min_top1, "
        "model_threshold, other_threshold, override_operating_point, top_k"
    ) in issue.fix


def test_unknown_section_lists_the_allowed_sections(tmp_path: Path) -> None:
    """An unknown top-level table is named, and the fix lists the real sections."""
    _, issue = _only_issue(tmp_path, "[mqqt]\nhost = 'x'\n")
    assert issue.key == "mqqt"
    assert (
        "allowed keys here: decision, evidence, log, metrics, model, mqtt, outbox, registry, security, site, spool"
        in issue.fix
    )


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    """Several bad keys in several sections give one issue each, not just the first."""
    _, issues = _issues(tmp_path, "[site]\nsite = 'x'\n[mqtt]\nport = 0\n[log]\nlevel = 'TRACE'\n")
    assert sorted(i.key for i in issues) == ["log.level", "mqtt.port", "site.site"]


@pytest.mark.parametrize(
    ("toml", "key", "problem_part"),
    [
        ("[mqtt]\nport = 'eighty'\n", "mqtt.port", "integer"),
        ("[mqtt]\ntls = 'yes please'\n", "mqtt.tls", "boolean"),
        ("[decision]\nmin_top1 = 'high'\n", "decision.min_top1", "number"),
        ("[spool]\ndir = 5\n", "spool.dir", "path"),
        ("[mqtt]\npublish = 'mismatch'\n", "mqtt.publish", "list"),
        ("site = 'x'\n", "site", "dictionary"),
    ],
)
def test_wrong_type_names_the_key_and_asks_for_the_right_type(
    tmp_path: Path, toml: str, key: str, problem_part: str
) -> None:
    """A value of the wrong type is refused with its key and a 'right type' fix."""
    _, issue = _only_issue(tmp_path, toml)
    assert issue.key == key
    assert problem_part in issue.problem.lower()
    assert issue.fix == "give a value of the right type (see the config reference in README.md)"


@pytest.mark.parametrize(
    ("toml", "key", "problem_part"),
    [
        ("[mqtt]\nport = 70000\n", "mqtt.port", "less than or equal to 65535"),
        ("[mqtt]\nport = 0\n", "mqtt.port", "greater than or equal to 1"),
        ("[decision]\nmin_top1 = 1.5\n", "decision.min_top1", "less than or equal to 1"),
        ("[decision]\nmake_threshold = -0.1\n", "decision.make_threshold", "greater than or equal to 0"),
        ("[decision]\ntop_k = 0\n", "decision.top_k", "greater than or equal to 1"),
        ("[spool]\npoll_interval_s = 0\n", "spool.poll_interval_s", "greater than 0"),
        ("[model]\nthreads = 65\n", "model.threads", "less than or equal to 64"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path: Path, toml: str, key: str, problem_part: str) -> None:
    """A number outside its documented range is refused with the bound in the problem."""
    _, issue = _only_issue(tmp_path, toml)
    assert issue.key == key
    assert problem_part in issue.problem
    assert issue.fix == "use a value inside the documented range"


@pytest.mark.parametrize(
    ("toml", "key", "choices"),
    [
        ("[model]\nbackend = 'cuda'\n", "model.backend", ["'auto'", "'onnxruntime'", "'tensorrt'"]),
        ("[mqtt]\nprotocol = '3'\n", "mqtt.protocol", ["'5'", "'3.1.1'"]),
        ("[log]\nformat = 'xml'\n", "log.format", ["'json'", "'text'"]),
        ("[log]\nlevel = 'info'\n", "log.level", ["'DEBUG'", "'INFO'", "'WARNING'", "'ERROR'"]),
        ("[mqtt]\npublish = ['mismatch', 'flag']\n", "mqtt.publish.1", ["'mismatch'", "'unsupported'"]),
    ],
)
def test_literal_choices_list_the_allowed_values(tmp_path: Path, toml: str, key: str, choices: list[str]) -> None:
    """A value outside a fixed set of choices is refused and the fix lists the choices."""
    _, issue = _only_issue(tmp_path, toml)
    assert issue.key == key
    assert issue.fix.startswith("use one of the allowed values (")
    for choice in choices:
        assert choice in issue.fix


def test_bad_identifier_pattern_is_refused(tmp_path: Path) -> None:
    """site_id goes into MQTT topics, so a slash or a space is refused."""
    _, issue = _only_issue(tmp_path, "[site]\nsite_id = 'a/b'\n")
    assert issue.key == "site.site_id"
    assert "pattern" in issue.problem


@pytest.mark.parametrize(
    ("toml", "key", "problem_part"),
    [
        (
            "[decision]\nmodel_threshold = 0.5\nmatch_threshold = 0.4\n",
            "decision",
            "model_threshold must not exceed match_threshold",
        ),
        ("[mqtt]\ntls = true\ncert_file = '/c.pem'\n", "mqtt", "cert_file and key_file go together"),
        ("[mqtt]\ntls = true\nkey_file = '/c.key'\n", "mqtt", "cert_file and key_file go together"),
        ("[mqtt]\nca_file = '/ca.pem'\n", "mqtt", "tls = false: set tls = true"),
        ("[mqtt]\ntls = false\ncert_file = '/c.pem'\nkey_file = '/c.key'\n", "mqtt", "tls = false: set tls = true"),
    ],
)
def test_cross_field_rules(tmp_path: Path, toml: str, key: str, problem_part: str) -> None:
    """Rules over several keys are refused on their section with a readable problem (no 'Value error')."""
    _, issue = _only_issue(tmp_path, toml)
    assert issue.key == key
    assert problem_part in issue.problem
    assert not issue.problem.startswith("Value error")
    assert issue.fix


def test_equal_model_and_match_thresholds_are_allowed(tmp_path: Path) -> None:
    """model_threshold == match_threshold is the boundary of the rule and is valid."""
    cfg = load_config(_write(tmp_path, "[decision]\nmodel_threshold = 0.3\nmatch_threshold = 0.3\n"))
    assert cfg.decision.model_threshold == cfg.decision.match_threshold == 0.3


def test_tls_with_ca_and_client_certificate_is_valid(tmp_path: Path) -> None:
    """tls = true with ca_file, cert_file and key_file passes the cross-field rules."""
    cfg = load_config(_write(tmp_path, "[mqtt]\ntls = true\nca_file = '/ca'\ncert_file = '/c'\nkey_file = '/k'\n"))
    assert (cfg.mqtt.ca_file, cfg.mqtt.cert_file, cfg.mqtt.key_file) == (Path("/ca"), Path("/c"), Path("/k"))


def test_invalid_toml_is_a_syntax_issue(tmp_path: Path) -> None:
    """Broken TOML gives one '(syntax)' issue naming the file, with the parser's position."""
    path, issue = _only_issue(tmp_path, "[mqtt\nport = 1883\n")
    assert issue.key == "(syntax)"
    assert issue.problem.startswith("not valid TOML:")
    assert "line 1" in issue.problem
    assert issue.fix == "fix the TOML syntax at the position given"
    assert str(issue).startswith(f"{path}: (syntax): not valid TOML")


def test_non_utf8_file_is_a_syntax_issue(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a syntax issue too, not a crash."""
    path = tmp_path / "latin1.toml"
    path.write_bytes("[site]\nsite_id = 'Sète'\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [(i.file, i.key) for i in info.value.issues] == [(str(path), "(syntax)")]


def test_missing_file_is_refused_with_its_path(tmp_path: Path) -> None:
    """A config path that does not exist is a '(file)' issue that says why."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert (issue.file, issue.key) == (str(path), "(file)")
    assert "cannot read: No such file or directory" in issue.problem
    assert "check the path" in issue.fix
    assert str(path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a 0000 file")
def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    """A config file the service user may not read is a '(file)' issue with 'Permission denied'."""
    path = _write(tmp_path, FULL_TOML)
    path.chmod(0)
    try:
        with pytest.raises(ConfigError) as info:
            load_config(path)
    finally:
        path.chmod(0o600)
    (issue,) = info.value.issues
    assert issue.key == "(file)"
    assert "Permission denied" in issue.problem


def test_a_directory_is_an_unreadable_file(tmp_path: Path) -> None:
    """Pointing the agent at a directory gives a '(file)' issue, not a traceback."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert [i.key for i in info.value.issues] == ["(file)"]
    assert "Is a directory" in info.value.issues[0].problem


def test_parse_config_uses_the_given_file_name() -> None:
    """parse_config validates an already-parsed document and names the given file in issues."""
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": {"port": "x"}}, "central.toml")
    assert [(i.file, i.key) for i in info.value.issues] == [("central.toml", "mqtt.port")]
    assert parse_config({"site": {"site_id": "s1"}}).site.site_id == "s1"


# ---------------------------------------------------------------------------------------------------
# read_secret
# ---------------------------------------------------------------------------------------------------


def _secret_file(tmp_path: Path, content: bytes, mode: int, name: str = "hmac.key") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_read_secret_prefers_the_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$CREDENTIALS_DIRECTORY/<name> wins over the configured file and is stripped of whitespace."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hmac-key").write_bytes(b"from-systemd\n")
    fallback = _secret_file(tmp_path, b"from-file", 0o600)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_secret("hmac-key", fallback, what="HMAC key", config_key="registry.hmac_key_file") == b"from-systemd"


def test_read_secret_falls_back_when_the_credential_is_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A credentials directory without this credential falls back to the 0600 file."""
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    fallback = _secret_file(tmp_path, b"  abcdef0123  \n", 0o600)
    assert read_secret("hmac-key", fallback, what="HMAC key", config_key="registry.hmac_key_file") == b"abcdef0123"


def test_read_secret_reads_a_0600_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without systemd credentials, a 0600 (or 0400) file is read and stripped."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert read_secret("k", _secret_file(tmp_path, b"s3cret\n", 0o600), what="key", config_key="a.b") == b"s3cret"
    assert read_secret("k", _secret_file(tmp_path, b"ro\n", 0o400, "ro.key"), what="key", config_key="a.b") == b"ro"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_read_secret_refuses_a_file_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    """A secret file readable by group or others is refused, with its mode and a 'chmod 600' fix."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = _secret_file(tmp_path, b"s3cret", mode)
    with pytest.raises(ConfigError) as info:
        read_secret("hmac-key", path, what="HMAC key", config_key="registry.hmac_key_file")
    (issue,) = info.value.issues
    assert issue.key == "registry.hmac_key_file"
    assert "readable by group/others" in issue.problem
    assert f"(mode {mode:o})" in issue.problem
    assert issue.fix == f"chmod 600 {path}"
    assert "s3cret" not in str(info.value)


def test_read_secret_missing_file_says_how_to_create_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing secret file names the key, the file and the two ways to provide it."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "absent.key"
    with pytest.raises(ConfigError) as info:
        read_secret("hmac-key", path, what="HMAC key", config_key="registry.hmac_key_file")
    (issue,) = info.value.issues
    assert issue.key == "registry.hmac_key_file"
    assert f"HMAC key file {path}: No such file or directory" == issue.problem
    assert "mode 0600" in issue.fix
    assert "LoadCredential=hmac-key" in issue.fix


def test_read_secret_without_any_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """No credential and no configured file: the fix names the config key and the credential."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError) as info:
        read_secret("mqtt-password", None, what="MQTT password", config_key="mqtt.password_file")
    (issue,) = info.value.issues
    assert issue.problem == "no MQTT password configured"
    assert issue.fix == "set mqtt.password_file or provide the systemd credential 'mqtt-password'"
