"""``iaflash-provision doctor``: check a box end to end and say what to fix.

Each check returns a :class:`Check`: a status, what it found and, when not ok, the fix.

- ``ok``: fine. ``warn``: works, but needs a look (stale registry, broker unreachable, backlog).
- ``fail``: the agent cannot do its job (bad config, unsigned bundle, wrong key, unwritable spool).
- ``skip``: not applicable here (no systemd, no detector, no valid config to check against).
- ``error``: doctor itself broke while checking (a bug): the other checks still run.

An unreadable or invalid config is a ``fail`` finding, not a doctor error: it is the box's problem.
Doctor only reads: it creates no file or folder (it opens the outbox only when it exists).
"""

from __future__ import annotations

import collections
import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from agent.cli import semantic_issues
from agent.config import Config, load_config, read_secret
from agent.errors import ConfigError, ConfigIssue, OutboxError, RegistryError
from agent.outbox import Outbox
from agent.plates import key_id, load_hmac_key
from agent.registry import read_state
from engines.base import backend_availability
from engines.errors import EngineError
from engines.signing import load_trusted_bundle

__all__ = ["DEFAULT_CONFIG", "Check", "Report", "run_doctor"]

Status = Literal["ok", "warn", "fail", "skip", "error"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "skip", "error")
DEFAULT_CONFIG = Path("/etc/iaflash/agent.toml")
SERVICE_USER = "iaflash"  # User= in systemd/iaflash-agent.service
UNIT = "iaflash-agent.service"
SPOOL_DIRS = ("incoming", "processing", "done", "rejected")
INCOMING_MAX_AGE_S = 300.0  # a capture waiting longer than this: the agent is probably not running
OUTBOX_MAX_AGE_S = 3600.0  # an event unsent for longer than this: the broker is probably unreachable
RECENT_REJECT_S = 86_400.0  # rejections in the last day are a warning; older ones are history
_COVERED = {"model.bundle", "registry.hmac_key_file", "spool.dir", "registry.db"}  # own checks say more
_LOGS = f"journalctl -u {UNIT} -n 50"
_ORDER_FIX = "the radar must write its image(s) before the sidecar (or rename the sidecar into place)"
_REJECT_FIXES = {
    "orphan_file": _ORDER_FIX, "missing_image": _ORDER_FIX,
    "corrupt_image": "images arrive truncated or damaged: check the radar's export and its disk",
    "empty_image": "images arrive empty: check the radar's export and its disk",
    "not_a_file": "only capture files belong in spool/incoming: remove folders and links from it",
}
_SIDECAR_FIX = "the radar's sidecars break the capture contract (docs/CAPTURE.md): check its export settings"


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    finding: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Report:
    """Every check, in order; ``exit_code`` follows STYLE.md (0 ok, 1 doctor broke, 3 problems found)."""

    config: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return not any(c.status in ("fail", "error") for c in self.checks)

    @property
    def exit_code(self) -> int:
        statuses = {c.status for c in self.checks}
        return 1 if "error" in statuses else 3 if "fail" in statuses else 0

    def summary(self) -> dict[str, int]:
        counts = collections.Counter(c.status for c in self.checks)
        return {s: counts.get(s, 0) for s in STATUSES}

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "config": self.config, "checks": [c.to_dict() for c in self.checks],
                "summary": self.summary()}


def _split(message: str, default_fix: str) -> tuple[str, str]:
    """Our errors read ``what; fix: how`` or ``what (fix: how)``: split them into finding and fix."""
    for sep in ("; fix: ", " (fix: ", "; Fix: ", ". Fix: "):
        if sep in message:
            what, _, how = message.partition(sep)
            return what, how.rstrip(")") if sep.startswith(" (") else how
    return message, default_fix


def _issues(name: str, issues: Iterable[ConfigIssue]) -> Check:
    items = list(issues)
    finding = "; ".join(f"{i.file}: {i.key}: {i.problem}" for i in items)
    return Check(name, "fail", finding, "; ".join(dict.fromkeys(f"{i.key}: {i.fix}" for i in items)))


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------- config and secrets


def check_config(path: Path | None) -> tuple[Check, Config | None]:
    """The config file parses and validates, and its paths and files are usable."""
    where = str(path) if path else "(built-in defaults)"
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return _issues("config", exc.issues), None
    issues = [i for i in semantic_issues(cfg, where) if i.key not in _COVERED]
    if issues:
        return _issues("config", issues), cfg
    finding = f"{where}: valid (site {cfg.site.site_id}, device {cfg.site.device_id})"
    if cfg.security.allow_unsigned:
        return Check("config", "warn", f"{finding}, but security.allow_unsigned = true accepts unsigned "
                     "bundles and registry files", "set security.allow_unsigned = false (development only)"), cfg
    return Check("config", "ok", finding), cfg


def _box_key(cfg: Config) -> tuple[str, str]:
    """(key id, where it came from) of the deployment HMAC key; raises ConfigError or RegistryError."""
    raw = read_secret("hmac-key", cfg.registry.hmac_key_file, what="HMAC key", config_key="registry.hmac_key_file")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    file = cfg.registry.hmac_key_file
    source = "systemd credential hmac-key" if creds and (Path(creds) / "hmac-key").is_file() \
        else f"{file} (mode {file.stat().st_mode & 0o777:o})"
    return key_id(load_hmac_key(raw)), source


def check_hmac_key(cfg: Config) -> Check:
    """The deployment key is readable, private, well formed; name its key id."""
    try:
        kid, source = _box_key(cfg)
    except ConfigError as exc:
        return _issues("hmac key", exc.issues)
    except RegistryError as exc:
        return Check("hmac key", "fail", *_split(f"{cfg.registry.hmac_key_file}: {exc}", "rewrite the key file"))
    return Check("hmac key", "ok", f"key id {kid} from {source}")


def check_registry(cfg: Config, config_file: str = str(DEFAULT_CONFIG)) -> Check:
    """The SIV cache exists, was made for this box's key, and is fresh."""
    db = cfg.registry.db
    command = f"iaflash-provision registry import FILE --config {config_file}"
    importing = f"import a snapshot: {command}"
    try:
        state = read_state(db)
    except RegistryError as exc:
        return Check("registry", "fail", *_split(str(exc), importing))
    if state is None:
        return Check("registry", "fail", f"{db}: empty (never imported)", importing)
    try:
        box_kid: str | None = _box_key(cfg)[0]
    except (ConfigError, RegistryError):
        box_kid = None  # the hmac key check reports why
    age, max_age = state.age_hours(), cfg.registry.max_age_hours
    finding = (f"{db}: {state.kind} {state.dataset_id} seq {state.seq}, {state.count} vehicles, "
               f"key id {state.key_id}, age {age:.1f} h (max {max_age:g} h)")
    if box_kid is not None and box_kid != state.key_id:
        return Check("registry", "fail", f"{finding}: made for key id {state.key_id} but this box's key is "
                     f"{box_kid}, so every plate looks unknown",
                     f"ask central for a snapshot made for key id {box_kid} and run {command}, "
                     "or install the deployment key the registry was made for")
    if age > max_age:
        return Check("registry", "warn", f"{finding}: STALE, verdicts are marked registry_stale",
                     "import the latest delta or snapshot from central (or check the box's link to central)")
    if state.count == 0:
        return Check("registry", "warn", f"{finding}: no vehicles", "import a snapshot that holds this site's plates")
    return Check("registry", "ok", finding)


# ------------------------------------------------------------------------------- models and backends


def check_bundle(cfg: Config, name: str, path: Path, task: str) -> Check:
    """A bundle loads, its signature checks against the trust store, every file's sha256 matches."""
    trust = cfg.security.trust_dir
    fix = (f"reinstall the bundle signed by the model publisher into {path}, and put the publisher's "
           f".pub into {trust} (docs/SIGNING.md)")
    try:
        bundle = load_trusted_bundle(path, trust, cfg.security.allow_unsigned)
    except EngineError as exc:  # its own fix speaks to the publisher; the technician reinstalls
        return Check(name, "fail", _split(str(exc), fix)[0], fix)
    m = bundle.manifest
    finding = f"{m.name} {m.version} ({m.task}, {len(bundle.labels)} labels) in {path}"
    if m.task != task:
        return Check(name, "fail", f"{finding}: is a {m.task}, a {task} is needed here",
                     f"point the config at a {task} bundle")
    signed = "signature not required (allow_unsigned)" if cfg.security.allow_unsigned else f"signed, trusted by {trust}"
    return Check(name, "ok", f"{finding}, {signed}")


def check_backends(cfg: Config) -> Check:
    """The configured inference backend can run here; say why the others cannot."""
    found = {kind: backend_availability(kind) for kind in ("onnxruntime", "tensorrt")}
    finding = "; ".join(f"{k}: {'yes' if ok else 'no'} ({why})" for k, (ok, why) in found.items())
    wanted = cfg.model.backend
    need = "onnxruntime" if wanted == "auto" else wanted
    if not found[need][0]:
        return Check("backends", "fail", f"model.backend = {wanted}: {finding}",
                     "reinstall the agent's Python environment (onnxruntime)" if need == "onnxruntime"
                     else "install TensorRT from JetPack, or set model.backend = \"auto\"")
    if wanted == "auto" and not found["tensorrt"][0] and Path("/etc/nv_tegra_release").exists():
        return Check("backends", "warn", f"{finding}: this Jetson runs on the CPU (slow)",
                     "install JetPack's TensorRT and pycuda (docs/JETSON.md)")
    return Check("backends", "ok", f"model.backend = {wanted}: {finding}")


# ------------------------------------------------------------------------------- spool and disk


def _account(user: str | None) -> pwd.struct_passwd | None:
    """The service account, when we run as root and it exists (root can write anywhere; the agent can't)."""
    if user is None or os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def _writable(path: Path, account: pwd.struct_passwd | None) -> bool:
    if account is None:
        return os.access(path, os.W_OK | os.X_OK)
    st = path.stat()
    if account.pw_uid == 0:
        return True
    if st.st_uid == account.pw_uid:
        bits = st.st_mode >> 6
    elif st.st_gid in os.getgrouplist(account.pw_name, account.pw_gid):
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & 0o3 == 0o3  # write and search


def check_spool_dirs(cfg: Config, user: str | None = SERVICE_USER) -> Check:
    """incoming/, processing/, done/, rejected/ exist (or can be made) and the agent may write into them."""
    root, account = cfg.spool.dir, _account(user)
    who = f"user {account.pw_name}" if account else "this user"
    missing = [sub for sub in SPOOL_DIRS if not (root / sub).is_dir()]
    locked = [f"{sub}/" for sub in SPOOL_DIRS if sub not in missing and not _writable(root / sub, account)]
    parent = next((p for p in (root, *root.parents) if p.is_dir()), Path("/"))
    if missing and not _writable(parent, account):
        locked.append(f"{parent} (to create {', '.join(missing)})")
    owner = user or "iaflash"
    fix = (f"sudo mkdir -p {root}/{{{','.join(SPOOL_DIRS)}}} && sudo chown -R {owner}: {root} "
           f"&& sudo chmod 750 {root} {root}/*")
    if locked:
        return Check("spool folders", "fail", f"{root}: not writable by {who}: {', '.join(locked)}", fix)
    if missing:
        return Check("spool folders", "warn", f"{root}: {', '.join(missing)} missing (the agent creates them "
                     "when it starts)", f"start the agent (sudo systemctl start {UNIT}), or: {fix}")
    return Check("spool folders", "ok", f"{root}: {', '.join(SPOOL_DIRS)} exist, writable by {who}")


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir()
            if not p.name.startswith(".") and not p.name.endswith((".tmp", ".part")) and p.is_file()]


def check_spool_queue(cfg: Config) -> Check:
    """How many files wait in incoming/ and processing/, and how old the oldest waiting one is."""
    root = cfg.spool.dir
    incoming, processing = _files(root / "incoming"), _files(root / "processing")
    if not (root / "incoming").is_dir():
        return Check("spool queue", "skip", f"{root / 'incoming'} is missing (see spool folders)")
    finding = f"{len(incoming)} files in incoming/, {len(processing)} in processing/"
    if not incoming:
        return Check("spool queue", "ok", finding)
    oldest = time.time() - min(p.stat().st_mtime for p in incoming)
    finding += f", oldest waiting {_age(oldest)}"
    if oldest > INCOMING_MAX_AGE_S:
        return Check("spool queue", "warn", f"{finding}: the agent may be down or stuck",
                     f"sudo systemctl status {UNIT}; {_LOGS}; then sudo systemctl restart {UNIT}")
    return Check("spool queue", "ok", finding)


def _reason(path: Path) -> str:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return "unreadable_error_file"
    return str(doc.get("reason", "unknown")) if isinstance(doc, dict) else "unknown"


def check_rejected(cfg: Config) -> Check:
    """Rejected captures: how many, why (from each ``*.error.json``), and whether any is recent."""
    folder = cfg.spool.dir / "rejected"
    errors = sorted(folder.glob("*.error.json")) if folder.is_dir() else []
    if not errors:
        return Check("rejected", "ok", f"none in {folder}")
    reasons = collections.Counter(_reason(p) for p in errors)
    recent = sum(time.time() - p.stat().st_mtime < RECENT_REJECT_S for p in errors)
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    finding = f"{len(errors)} captures rejected ({why}), {recent} in the last 24 h"
    if not recent:
        return Check("rejected", "ok", f"{finding}; details in {folder}/*.error.json")
    top = reasons.most_common(1)[0][0]
    fix = _REJECT_FIXES.get(top, _SIDECAR_FIX)
    return Check("rejected", "warn", finding, f"{fix}; read why in {folder}/<capture>.error.json")


def check_disk(cfg: Config) -> Check:
    """Free space where the spool lives, against the disk guard (spool.min_free_mb)."""
    root = next((p for p in (cfg.spool.dir, *cfg.spool.dir.parents) if p.exists()), Path("/"))
    free_mb = shutil.disk_usage(root).free // (1024 * 1024)
    need = cfg.spool.min_free_mb
    finding = f"{free_mb} MiB free under {root} (intake pauses below spool.min_free_mb = {need})"
    fix = (f"free space on that disk (old evidence in {cfg.spool.dir / 'done'} can go; never delete "
           f"{cfg.outbox.db}), or lower spool.retention_days")
    if free_mb < need:
        return Check("disk", "fail", f"{finding}: intake is paused", fix)
    if free_mb < 2 * need:
        return Check("disk", "warn", f"{finding}: close to the limit", fix)
    return Check("disk", "ok", finding)


# ------------------------------------------------------------------------------- outbox and broker


def check_outbox(cfg: Config) -> Check:
    """Unsent events: how many and how old the oldest (they wait here while the broker is unreachable)."""
    path = cfg.outbox.db
    if not path.is_file():
        return Check("outbox", "warn", f"{path} does not exist: the agent has not run on this box yet",
                     f"start the agent: sudo systemctl start {UNIT}")
    try:
        with Outbox(path) as outbox:
            depth, oldest = outbox.depth(), outbox.oldest_age_s()
    except OutboxError as exc:
        return Check("outbox", "fail", *_split(str(exc), f"check {path}"))
    if oldest is None:
        return Check("outbox", "ok", f"{path}: no unsent events")
    finding = f"{path}: {depth} unsent events, oldest {_age(oldest)}"
    if oldest > OUTBOX_MAX_AGE_S:
        return Check("outbox", "warn", f"{finding}: the broker may be unreachable",
                     "the events are kept and sent when the link returns; see the broker check "
                     "(mqtt.host, mqtt.port, TLS files, 4G link)")
    return Check("outbox", "ok", finding)


def check_broker(cfg: Config, timeout_s: float) -> Check:
    """A TCP connection to mqtt.host:mqtt.port opens within ``timeout_s`` (a warning, never a failure)."""
    host, port = cfg.mqtt.host, cfg.mqtt.port
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            ms = (time.monotonic() - start) * 1000
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        return Check("broker", "warn", f"cannot reach {host}:{port} within {timeout_s:g} s: {why}; "
                     "flags wait safely in the outbox",
                     "check the 4G link and the site firewall, mqtt.host and mqtt.port; then run doctor again")
    tls = "TLS" if cfg.mqtt.tls else "no TLS"
    return Check("broker", "ok", f"{host}:{port} accepts TCP connections ({ms:.0f} ms; MQTT {cfg.mqtt.protocol}, "
                 f"{tls})")


def check_broker_files(cfg: Config) -> Check:
    """The TLS and password files the MQTT link needs exist, are readable and (secrets) private."""
    m = cfg.mqtt
    named = {"mqtt.ca_file": m.ca_file, "mqtt.cert_file": m.cert_file, "mqtt.key_file": m.key_file,
             "mqtt.password_file": m.password_file}
    files = {k: p for k, p in named.items() if p is not None}
    if not files:
        return Check("broker files", "skip" if not m.tls else "ok",
                     "no TLS or password files configured" + (" (system CAs)" if m.tls else ""))
    bad = [f"{k}: {p} is missing or unreadable" for k, p in files.items() if not os.access(p, os.R_OK)]
    if bad:
        return Check("broker files", "fail", "; ".join(bad), "copy the files from enrolment, or fix the paths")
    loose = [p for k, p in files.items() if k in ("mqtt.key_file", "mqtt.password_file") and p.stat().st_mode & 0o077]
    if loose:
        modes = ", ".join(f"{p} (mode {p.stat().st_mode & 0o777:o})" for p in loose)
        return Check("broker files", "warn", f"secrets readable by group/others: {modes}",
                     f"chmod 600 {' '.join(map(str, loose))}")
    if m.password_file and not m.tls:
        return Check("broker files", "warn", "a password is sent without TLS", "set mqtt.tls = true")
    return Check("broker files", "ok", ", ".join(f"{k} {p}" for k, p in files.items()))


# ------------------------------------------------------------------------------- systemd


def check_systemd(unit: str = UNIT, booted_marker: Path = Path("/run/systemd/system")) -> Check:
    """The agent's unit is active (skipped where systemd is not running or the unit is not installed)."""
    systemctl = shutil.which("systemctl")
    if systemctl is None or not booted_marker.is_dir():
        return Check("systemd", "skip", "systemd is not running on this machine")
    out = subprocess.run([systemctl, "show", "--property=LoadState,ActiveState,SubState", unit],
                         capture_output=True, text=True, timeout=10, check=False)
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    if out.returncode != 0 or "LoadState" not in props:
        return Check("systemd", "warn", f"systemctl show {unit} failed: {out.stderr.strip()}", "run it as root")
    if props["LoadState"] == "not-found":
        return Check("systemd", "skip", f"{unit} is not installed", "install it: README, 'Running under systemd'")
    state = f"{unit} is {props.get('ActiveState')} ({props.get('SubState')})"
    if props.get("ActiveState") != "active":
        return Check("systemd", "warn", state, f"sudo systemctl start {unit}; if it stops again: {_LOGS}")
    return Check("systemd", "ok", state)


# ------------------------------------------------------------------------------- running and printing


def _guard(name: str, check: Callable[[], Check]) -> Check:
    """Run one check; a crash inside doctor becomes an ``error`` line and the other checks still run."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001  # a doctor bug must not hide the other checks' findings
        return Check(name, "error", f"doctor could not run this check: {type(exc).__name__}: {exc}",
                     "report it with the output of `iaflash-provision doctor --json`")


def check_detector(cfg: Config) -> Check:
    """The detector bundle, when one is configured."""
    if cfg.model.detector_bundle is None:
        return Check("detector", "skip", "no detector configured (model.detector_bundle): sidecar box or whole frame")
    return check_bundle(cfg, "detector", cfg.model.detector_bundle, "detector")


def _site_checks(cfg: Config, where: str, broker_timeout_s: float, user: str | None) -> list[Check]:
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("hmac key", lambda: check_hmac_key(cfg)), ("registry", lambda: check_registry(cfg, where)),
        ("model", lambda: check_bundle(cfg, "model", cfg.model.bundle, "classifier")),
        ("detector", lambda: check_detector(cfg)), ("backends", lambda: check_backends(cfg)),
        ("spool folders", lambda: check_spool_dirs(cfg, user)), ("spool queue", lambda: check_spool_queue(cfg)),
        ("rejected", lambda: check_rejected(cfg)), ("outbox", lambda: check_outbox(cfg)),
        ("disk", lambda: check_disk(cfg)), ("broker", lambda: check_broker(cfg, broker_timeout_s)),
        ("broker files", lambda: check_broker_files(cfg))]
    return [_guard(name, check) for name, check in checks]


def run_doctor(config_path: Path | None, *, broker_timeout_s: float = 3.0, user: str | None = SERVICE_USER,
               unit: str = UNIT) -> Report:
    """Run every check against the config at ``config_path`` (None: built-in defaults).

    ``user`` is the service account whose write access to the spool is checked when doctor runs as root.
    """
    where = str(config_path) if config_path else "(built-in defaults)"
    first, cfg = check_config(config_path)
    if cfg is None:
        site = [Check("site", "skip", "the other checks need a valid config", "fix the config first")]
    else:
        site = _site_checks(cfg, where, broker_timeout_s, user)
    return Report(where, [first, *site, _guard("systemd", lambda: check_systemd(unit))])
