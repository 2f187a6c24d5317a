"""The systemd unit is valid and sandboxed (systemd-analyze, offline); the spool ingress set-up works as shipped."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from waiting import wait_until

from iaflash.agent.demo.broker import free_port

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "iaflash-agent.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")


def unit_with_existing_binary(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists here (verify checks it is executable)."""
    text = UNIT.read_text().replace("/opt/iaflash/.venv/bin/iaflash-agent", shutil.which("true") or "/bin/true")
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def test_unit_verifies_without_any_warning(tmp_path: Path) -> None:
    """Unknown keys only warn (rc 0), so stderr must be empty, not just the exit code."""
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit_with_existing_binary(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert result.stderr.strip() == ""


def test_unit_is_sandboxed_to_an_exposure_of_at_most_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(unit_with_existing_binary(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr[-500:]
    assert float(match.group(1)) <= 2.0


def test_a_stopped_crash_loop_never_leaves_the_unit_failed_for_good(tmp_path: Path) -> None:
    """No start limit (StartLimitIntervalSec=0): systemd retries every RestartSec forever, so the
    agent comes back by itself once the cause is fixed; poison captures are quarantined meanwhile."""
    text = UNIT.read_text()
    unit_section = text.split("[Service]")[0]
    assert "StartLimitIntervalSec=0" in unit_section and "StartLimitBurst" not in text
    assert "Restart=on-failure" in text
    restart = re.search(r"^RestartSec=(\d+)$", text, re.M)
    assert restart and 5 <= int(restart.group(1)) <= 60
    shown = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit_with_existing_binary(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert shown.returncode == 0 and shown.stderr.strip() == ""


def test_unit_is_a_notify_service_with_a_watchdog_and_the_key_as_a_credential() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=60",
        "Restart=on-failure",
        "LoadCredential=hmac-key:",
        "ExecStart=/opt/iaflash/.venv/bin/iaflash-agent run --config /etc/iaflash/agent.toml",
    ):
        assert line in text


# ---------------------------------------------------------------- spool ingress: the radar's own user

SYSUSERS = UNIT.parent / "iaflash.sysusers"
TMPFILES = UNIT.parent / "iaflash.tmpfiles"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes file owners and runs processes as other users")


@dataclass
class Box:
    """A file system root laid out by the shipped sysusers and tmpfiles snippets, plus a radar user."""

    root: Path
    ids: dict[str, tuple[int, int]]  # name -> (uid, gid): iaflash, radar; and the group iaflash-ingress

    @property
    def state(self) -> Path:
        return self.root / "var/lib/iaflash"

    @property
    def spool(self) -> Path:
        return self.state / "spool"

    def as_user(self, name: str, umask: int) -> Callable[[], None]:
        """preexec_fn: become ``name`` with its groups (as the unit, or the radar's FTP daemon, does)."""
        uid, gid = self.ids[name]
        groups = [gid] + [self.ids["iaflash-ingress"][1]] * (name in ("iaflash", "radar"))

        def drop() -> None:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            os.umask(umask)

        return drop


def _reachable(path: Path) -> bool:
    """True when a user other than root may execute ``path`` (every folder above it has o+x)."""
    real = path.resolve()
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in [real, *real.parents])


def python_for_others() -> str | None:
    """A Python of this version that another user may run (the venv's often lives under /root, 0700)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        path = Path(candidate)
        if not path.exists() or not _reachable(path):
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(tuple(sys.version_info[:2]))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.stdout.strip() == str(tuple(sys.version_info[:2])):
            return candidate
    return None


def agent_command(python: str, config: Path) -> list[str]:
    """``iaflash-agent run`` on ``python`` with this venv's packages (their folder is world-readable)."""
    boot = (
        "import runpy, site, sys; site.addsitedir(sys.argv.pop(1)); "
        "runpy.run_module('iaflash.agent', run_name='__main__', alter_sys=True)"
    )
    return [python, "-c", boot, sysconfig.get_paths()["purelib"], "run", "--config", str(config)]


def _ids(etc: Path) -> dict[str, tuple[int, int]]:
    users = {
        f[0]: (int(f[2]), int(f[3])) for f in (line.split(":") for line in (etc / "passwd").read_text().splitlines())
    }
    groups = {f[0]: int(f[2]) for f in (line.split(":") for line in (etc / "group").read_text().splitlines())}
    return {**users, "iaflash-ingress": (-1, groups["iaflash-ingress"])}


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp folder that other users may pass through (pytest's own tmp_path is under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="iaflash-ingress-"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def box(shared_tmp: Path) -> Box:
    """systemd-sysusers and systemd-tmpfiles --root on the shipped snippets; the radar user added by hand."""
    root = shared_tmp / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(["systemd-sysusers", f"--root={root}", str(SYSUSERS)], check=True, capture_output=True)
    # on site: useradd radar && usermod -aG iaflash-ingress radar
    with (root / "etc/passwd").open("a") as fh:
        fh.write("radar:x:64102:64102:radar feed:/nonexistent:/usr/sbin/nologin\n")
    group = (root / "etc/group").read_text().replace("iaflash-ingress:x:", "IG:x:")
    lines = [(line + ",radar") if line.startswith("IG:x:") else line for line in group.splitlines()]
    (root / "etc/group").write_text("\n".join(lines).replace("IG:x:", "iaflash-ingress:x:") + "\nradar:x:64102:\n")
    result = subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={root}", str(TMPFILES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "radar" in (root / "etc/group").read_text().split("iaflash-ingress:x:")[1].splitlines()[0]
    return Box(root, _ids(root / "etc"))


def _radar_tries(box: Box, script: str) -> dict[str, str]:
    """Run ``script`` as the radar user; it fills ``out`` (what -> "ok" or the error) and prints it as JSON."""
    code = (
        "import json, os, shutil, sys\nout = {}\n"
        "def attempt(what, fn):\n"
        "    try:\n        fn(); out[what] = 'ok'\n"
        "    except OSError as exc:\n        out[what] = type(exc).__name__\n"
        f"{script}\nprint(json.dumps(out))\n"
    )
    python = python_for_others()
    assert python is not None
    result = subprocess.run(  # the child changes its user on purpose, before any thread
        [python, "-I", "-c", code], preexec_fn=box.as_user("radar", 0o077), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]  # a JSON object


@needs_root
def test_the_shipped_snippets_lay_out_the_spool_for_the_radar_group(box: Box) -> None:
    agent_uid, agent_gid = box.ids["iaflash"]
    ingress = box.ids["iaflash-ingress"][1]
    expected = {box.state: (0o751, agent_gid), box.spool: (0o710, ingress), box.spool / "incoming": (0o2770, ingress)}
    for path, (mode, gid) in expected.items():
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, agent_uid, gid), path
    assert "system.posix_acl_default" in os.listxattr(box.spool / "incoming")
    unit = UNIT.read_text()
    assert "StateDirectoryMode=0751" in unit and "SupplementaryGroups=iaflash-ingress" in unit


@needs_root
def test_a_capture_the_radar_user_drops_into_incoming_is_claimed_and_processed_by_the_agent(
    box: Box, tmp_path: Path
) -> None:
    """The radar (umask 077) writes into incoming/ only; the agent, as iaflash, claims and processes it."""
    python = python_for_others()
    if python is None:
        pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that another user may run here")
    from e2e_site import to_toml
    from onnx_builders import make_bundle

    from iaflash.agent.demo.scenario import build_scenario, start_time, write_capture
    from iaflash.engines.keys import generate_keypair
    from iaflash.engines.signing import sign_bundle

    agent_uid, agent_gid = box.ids["iaflash"]
    state = box.state
    (state / "trust").mkdir()
    private, public = generate_keypair(tmp_path / "publisher")
    shutil.copy(public, state / "trust" / public.name)
    make_bundle(state / "model", height=32, width=32)
    sign_bundle(state / "model", private, signer="test")
    (state / "hmac.key").write_text(secrets.token_hex(32))
    os.chmod(state / "hmac.key", 0o600)
    config = state / "agent.toml"
    config.write_text(to_toml({
        "site": {"site_id": "site-1", "device_id": "box-1"},
        "spool": {"dir": str(box.spool), "poll_interval_s": 0.05},
        "model": {"bundle": str(state / "model"), "backend": "onnxruntime", "engine_cache_dir": str(state / "engines")},
        "registry": {"db": str(state / "registry.db"), "hmac_key_file": str(state / "hmac.key")},
        "outbox": {"db": str(state / "state.db")},
        "security": {"trust_dir": str(state / "trust")},
        "mqtt": {"port": free_port()},  # no broker: events wait in the outbox
        "log": {"level": "INFO", "format": "text"},
    }))  # fmt: skip
    for path in [state / n for n in ("trust", "model", "hmac.key", "agent.toml")]:
        for p in [path, *path.rglob("*")]:
            os.chown(p, agent_uid, agent_gid)

    staging = box.root.parent / "radar-out"
    staging.mkdir()
    captures = [c for c in build_scenario(16) if not c.bad][:3]
    for i, c in enumerate(captures):
        write_capture(c, staging, start_time(), seed=i)
    os.chmod(staging, 0o755)
    for p in staging.iterdir():
        os.chmod(p, 0o644)
    dropped = _radar_tries(
        box,
        f"""
src, dst = {str(staging)!r}, {str(box.spool / "incoming")!r}
names = sorted(os.listdir(src), key=lambda n: n.endswith('.json'))  # images first, sidecars last
for n in names:
    tmp = os.path.join(dst, '.' + n + '.part')
    attempt('drop ' + n, lambda: (shutil.copyfile(os.path.join(src, n), tmp), os.rename(tmp, os.path.join(dst, n))))
""",
    )
    assert set(dropped.values()) == {"ok"} and len(dropped) == len(list(staging.iterdir()))
    dropped_file = next((box.spool / "incoming").iterdir())
    assert (
        dropped_file.stat().st_uid == box.ids["radar"][0]
        and dropped_file.stat().st_gid == box.ids["iaflash-ingress"][1]
    )
    assert stat.S_IMODE(dropped_file.stat().st_mode) == 0o660  # umask 077, but the default ACL gives the group rw

    log = (tmp_path / "agent.log").open("wb")
    as_agent = box.as_user("iaflash", 0o027)  # the unit's User=iaflash, SupplementaryGroups=iaflash-ingress
    env = {**os.environ, "HOME": str(state), "PYTHONUNBUFFERED": "1"}
    agent = subprocess.Popen(
        agent_command(python, config),
        preexec_fn=as_agent,  # noqa: PLW1509  # the child drops to iaflash before running anything
        stdout=log,
        stderr=log,
        cwd=state,
        env=env,  # before any thread
    )
    try:
        ids = {c.capture_id for c in captures}
        assert wait_until(
            lambda: _processed(state / "state.db") == ids, 60, "the agent to process the radar's captures"
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        log.close()
    assert {p.name for p in (box.spool / "done").iterdir()} >= {f"{i}.json" for i in ids}
    assert list((box.spool / "incoming").iterdir()) == [] and list((box.spool / "rejected").iterdir()) == []
    assert stat.S_IMODE((box.spool / "done").stat().st_mode) == 0o750  # the agent's own folders

    tried = _radar_tries(
        box,
        f"""
state, spool = {str(state)!r}, {str(box.spool)!r}
attempt('write spool/', lambda: open(os.path.join(spool, 'x.json'), 'w').close())
attempt('list spool/', lambda: os.listdir(spool))
attempt('write processing/', lambda: open(os.path.join(spool, 'processing', 'x.json'), 'w').close())
attempt('list done/', lambda: os.listdir(os.path.join(spool, 'done')))
attempt('read a done/ file', lambda: open(os.path.join(spool, 'done', {next(iter(ids)) + ".json"!r})).read())
attempt('write rejected/', lambda: open(os.path.join(spool, 'rejected', 'x.json'), 'w').close())
attempt('write the state folder', lambda: open(os.path.join(state, 'x'), 'w').close())
attempt('list the state folder', lambda: os.listdir(state))
attempt('read the registry', lambda: open(os.path.join(state, 'registry.db'), 'rb').read())
attempt('read the outbox', lambda: open(os.path.join(state, 'state.db'), 'rb').read())
attempt('read the plate key', lambda: open(os.path.join(state, 'hmac.key')).read())
attempt('write incoming/', lambda: open(os.path.join(spool, 'incoming', 'late.jpg'), 'w').close())
""",
    )
    assert tried.pop("write incoming/") == "ok"
    assert tried == dict.fromkeys(tried, "PermissionError")


def _processed(db: Path) -> set[str]:
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return {r[0] for r in conn.execute("SELECT capture_id FROM processed")}
    except sqlite3.OperationalError:
        return set()
