"""The doctor's checks of the box itself: spool, rejections, disk, outbox, broker, systemd."""

from __future__ import annotations

import collections
import json
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from iaflash.agent.capture.spool import FIX_RADAR, visible
from iaflash.agent.config import Config
from iaflash.agent.errors import OutboxError
from iaflash.agent.link.mqtt import probe
from iaflash.agent.outbox.salvage import FIX_NOTE, describe, salvage_notes
from iaflash.agent.outbox.store import Outbox
from iaflash.provisioning.doctor.report import (
    INCOMING_MAX_AGE_S,
    OUTBOX_MAX_AGE_S,
    RECENT_REJECT_S,
    SERVICE_USER,
    SPOOL_DIRS,
    UNIT,
    Check,
    Status,
    age_text,
    split_fix,
)

_LOGS = f"journalctl -u {UNIT} -n 50"
_REJECT_FIXES = {
    "orphan_file": FIX_RADAR,
    "missing_image": FIX_RADAR,
    "corrupt_image": "images arrive truncated or damaged: check the radar's export and its disk",
    "truncated_jpeg": "images arrive cut short: check that the radar writes each image fully before its sidecar",
    "too_many_scans": "the radar's JPEGs have too many scans: check its encoder, or raise spool.max_jpeg_scans",
    "empty_image": "images arrive empty: check the radar's export and its disk",
    "not_a_file": "only capture files belong in spool/incoming: remove folders and links from it",
}
_SIDECAR_FIX = "the radar's sidecars break the capture contract (docs/CAPTURE.md): check its export settings"


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
    fix = (
        f"sudo mkdir -p {root}/{{{','.join(SPOOL_DIRS)}}} && sudo chown -R {owner}: {root} "
        f"&& sudo chmod 750 {root} {root}/*"
    )
    if locked:
        return Check("spool folders", "fail", f"{root}: not writable by {who}: {', '.join(locked)}", fix)
    if missing:
        return Check(
            "spool folders",
            "warn",
            f"{root}: {', '.join(missing)} missing (the agent creates them when it starts)",
            f"start the agent (sudo systemctl start {UNIT}), or: {fix}",
        )
    return Check("spool folders", "ok", f"{root}: {', '.join(SPOOL_DIRS)} exist, writable by {who}")


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if visible(p.name) and p.is_file()]


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
    finding += f", oldest waiting {age_text(oldest)}"
    if oldest > INCOMING_MAX_AGE_S:
        return Check(
            "spool queue",
            "warn",
            f"{finding}: the agent may be down or stuck",
            f"sudo systemctl status {UNIT}; {_LOGS}; then sudo systemctl restart {UNIT}",
        )
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


def _filesystems(cfg: Config) -> list[tuple[str, Path]]:
    """(what, existing folder) for each distinct file system the agent writes to."""
    out, seen = [], set()
    for what, path in (
        ("spool", cfg.spool.dir),
        ("state.db", cfg.outbox.db.parent),
        ("registry", cfg.registry.db.parent),
    ):
        root = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
        dev = os.stat(root).st_dev
        if dev not in seen:
            seen.add(dev)
            out.append((what, root))
    return out


def check_disk(cfg: Config) -> Check:
    """Free space and writability of every file system the agent writes to, against the disk guard."""
    need = cfg.spool.min_free_mb
    fix = (
        f"free space on that disk (old evidence in {cfg.spool.dir / 'done'} can go; never delete "
        f"{cfg.outbox.db}), or lower spool.retention_days"
    )
    findings, worst = [], "ok"
    for what, root in _filesystems(cfg):
        st = os.statvfs(root)
        if st.f_flag & os.ST_RDONLY:
            return Check(
                "disk",
                "fail",
                f"{root} ({what}) is on a read-only file system: intake and commits are paused",
                "check the disk (dmesg, fsck) and remount it read-write; the agent resumes by itself",
            )
        free_mb = st.f_bavail * st.f_frsize // (1024 * 1024)
        findings.append(f"{free_mb} MiB free under {root} ({what})")
        if free_mb < need:
            worst = "fail"
        elif free_mb < 2 * need and worst == "ok":
            worst = "warn"
    finding = f"{', '.join(findings)} (intake pauses below spool.min_free_mb = {need})"
    if worst == "fail":
        return Check("disk", "fail", f"{finding}: intake is paused", fix)
    if worst == "warn":
        return Check("disk", "warn", f"{finding}: close to the limit", fix)
    return Check("disk", "ok", finding)


# ------------------------------------------------------------------------------- outbox and broker


def _salvaged(notes: list[dict[str, Any]]) -> tuple[Status, str]:
    """(status, finding) for the salvage notes beside state.db: a warning, a failure when flags are in doubt."""
    described = [describe(note) for note in notes]
    status: Status = "fail" if any(doubt for doubt, _ in described) else "warn"
    return status, "; ".join(text for _, text in described)


def check_outbox(cfg: Config) -> Check:
    """Unsent events: how many and how old the oldest (they wait here while the broker is unreachable).

    A corrupt state.db the agent moved aside and salvaged (agent/outbox/salvage.py) is shown here
    until its copy and note are deleted: a warning, or a failure when rows could not be read.
    """
    depth = _outbox_depth(cfg)
    notes = salvage_notes(cfg.outbox.db)
    if not notes:
        return depth
    status, finding = _salvaged(notes)
    if depth.status == "fail":
        status = "fail"
    return Check("outbox", status, f"{finding}; now: {depth.finding}", f"{FIX_NOTE}; {depth.fix}".rstrip("; "))


def _outbox_depth(cfg: Config) -> Check:
    path = cfg.outbox.db
    if not path.is_file():
        return Check(
            "outbox",
            "warn",
            f"{path} does not exist: the agent has not run on this box yet",
            f"start the agent: sudo systemctl start {UNIT}",
        )
    try:
        with Outbox(path) as outbox:
            depth, oldest = outbox.depth(), outbox.oldest_age_s()
    except OutboxError as exc:
        return Check("outbox", "fail", *split_fix(str(exc), f"check {path}"))
    if oldest is None:
        return Check("outbox", "ok", f"{path}: no unsent events")
    finding = f"{path}: {depth} unsent events, oldest {age_text(oldest)}"
    if oldest > OUTBOX_MAX_AGE_S:
        return Check(
            "outbox",
            "warn",
            f"{finding}: the broker may be unreachable",
            "the events are kept and sent when the link returns; see the broker check "
            "(mqtt.host, mqtt.port, TLS files, 4G link)",
        )
    return Check("outbox", "ok", finding)


def check_broker(cfg: Config, timeout_s: float) -> Check:
    """A real MQTT CONNECT with the agent's TLS files and credentials (a warning, never a failure).

    TCP alone passes with refused credentials or broken TLS; this check says which of DNS, TCP,
    TLS (CA, expiry, host name), authentication or the broker's answer failed, and the fix.
    """
    start = time.monotonic()
    ok, what, fix = probe(cfg, timeout_s)
    if not ok:
        return Check("broker", "warn", f"{what}; flags wait safely in the outbox", f"{fix}; then run doctor again")
    return Check("broker", "ok", f"{what} in {(time.monotonic() - start) * 1000:.0f} ms")


def check_broker_files(cfg: Config) -> Check:
    """The TLS and password files the MQTT link needs exist, are readable and (secrets) private."""
    m = cfg.mqtt
    named = {
        "mqtt.ca_file": m.ca_file,
        "mqtt.cert_file": m.cert_file,
        "mqtt.key_file": m.key_file,
        "mqtt.password_file": m.password_file,
    }
    files = {k: p for k, p in named.items() if p is not None}
    if not files:
        return Check(
            "broker files",
            "skip" if not m.tls else "ok",
            "no TLS or password files configured" + (" (system CAs)" if m.tls else ""),
        )
    bad = [f"{k}: {p} is missing or unreadable" for k, p in files.items() if not os.access(p, os.R_OK)]
    if bad:
        return Check("broker files", "fail", "; ".join(bad), "copy the files from enrolment, or fix the paths")
    loose = [p for k, p in files.items() if k in ("mqtt.key_file", "mqtt.password_file") and p.stat().st_mode & 0o077]
    if loose:
        modes = ", ".join(f"{p} (mode {p.stat().st_mode & 0o777:o})" for p in loose)
        return Check(
            "broker files",
            "warn",
            f"secrets readable by group/others: {modes}",
            f"chmod 600 {' '.join(map(str, loose))}",
        )
    if m.password_file and not m.tls:
        return Check("broker files", "warn", "a password is sent without TLS", "set mqtt.tls = true")
    return Check("broker files", "ok", ", ".join(f"{k} {p}" for k, p in files.items()))


# ------------------------------------------------------------------------------- systemd


def check_systemd(unit: str = UNIT, booted_marker: Path = Path("/run/systemd/system")) -> Check:
    """The agent's unit is active (skipped where systemd is not running or the unit is not installed)."""
    systemctl = shutil.which("systemctl")
    if systemctl is None or not booted_marker.is_dir():
        return Check("systemd", "skip", "systemd is not running on this machine")
    out = subprocess.run(
        [systemctl, "show", "--property=LoadState,ActiveState,SubState", unit],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    if out.returncode != 0 or "LoadState" not in props:
        return Check("systemd", "warn", f"systemctl show {unit} failed: {out.stderr.strip()}", "run it as root")
    if props["LoadState"] == "not-found":
        return Check("systemd", "skip", f"{unit} is not installed", "install it: README, 'Running under systemd'")
    state = f"{unit} is {props.get('ActiveState')} ({props.get('SubState')})"
    if props.get("ActiveState") != "active":
        return Check("systemd", "warn", state, f"sudo systemctl start {unit}; if it stops again: {_LOGS}")
    return Check("systemd", "ok", state)
