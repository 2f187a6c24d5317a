"""``iaflash-provision enrol``: a provisioning bundle becomes an installed, checked box.

Steps, in order: the service user (and its GPU groups), the folders, the secrets and certificates,
the trust store, the model bundles, the agent config (from a template; it must pass
check-config), the systemd unit, the registry's first snapshot (through the registry import
code, signature checked against the installed trust store), then check-config and doctor.

Each step changes only what differs, so a second run changes nothing and says so; ``dry_run``
lists what each step would do and touches nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iaflash.agent.config import parse_config, trust_state_path
from iaflash.agent.config_checks import semantic_issues
from iaflash.agent.errors import ConfigError, ConfigIssue, IaflashError
from iaflash.agent.registry.cache import import_signed_subset, read_state
from iaflash.agent.registry.plates import key_id, load_hmac_key
from iaflash.agent.registry.subset_file import SubsetReader
from iaflash.provisioning.doctor.checks import Report, run_doctor
from iaflash.provisioning.enrol.actions import INGRESS_GROUP, Box, Dir, File, Owner, ServiceUser, Step, Tree
from iaflash.provisioning.enrol.source import EnrolError, EnrolSource

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

__all__ = ["ETC", "STATE", "UNIT_FILE", "EnrolReport", "StepResult", "enrol", "find_unit", "render_config"]

ETC, STATE = "/etc/iaflash", "/var/lib/iaflash"
UNIT_FILE = "/etc/systemd/system/iaflash-agent.service"
SYSUSERS, TMPFILES = "/usr/lib/sysusers.d/iaflash.conf", "/usr/lib/tmpfiles.d/iaflash.conf"
AGENT_BIN = "/opt/iaflash/.venv/bin/iaflash-agent"  # the unit's ExecStart
ROOT_OWNER = Owner("root", "root")


def find_shipped(name: str) -> Path:
    """A file of systemd/ (unit, sysusers, tmpfiles): installed data (share/iaflash-edge/systemd), else the source."""
    for candidate in (
        Path(sys.prefix) / "share" / "iaflash-edge" / "systemd" / name,
        Path(__file__).resolve().parents[2] / "systemd" / name,
    ):
        if candidate.is_file():
            return candidate
    raise EnrolError(
        f"{name} is not installed under {sys.prefix}/share/iaflash-edge/systemd; "
        "fix: reinstall the agent (pip install iaflash-edge) in this environment"
    )


def find_unit() -> Path:
    return find_shipped("iaflash-agent.service")


def _q(value: object) -> str:
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def _key_id_line(source: EnrolSource) -> list[str]:
    """``hmac_key_id`` of the bundle's plate key, so another site's key file is refused later (docs/REGISTRY.md)."""
    try:
        raw = source.path("plate.key").read_bytes().strip()
        return [f"hmac_key_id = {_q(key_id(load_hmac_key(raw)))}  # this site's plate key"]
    except (OSError, ValueError, IaflashError):
        return []  # the key's own step says what is wrong with it


def render_config(source: EnrolSource, box: Box) -> str:
    """The agent config for this box: ids and broker from the bundle, every path under ``box.root``."""
    state, etc, b = box.at(STATE), box.at(ETC), source.broker
    lines = [
        f"# {ETC}/agent.toml: written by `iaflash-provision enrol` from the provisioning bundle of",
        f"# {source.site_id}/{source.device_id} made {source.created_at or 'at central'}. Edit it, then run:",
        "#   iaflash-agent check-config THIS_FILE   (a new enrol keeps the edited file as agent.toml.previous)",
        "[site]",
        f"site_id = {_q(source.site_id)}",
        f"device_id = {_q(source.device_id)}",
        "",
        "[spool]",
        f"dir = {_q(state / 'spool')}  # radars write into <dir>/incoming (image first, sidecar last)",
        "",
        "[model]",
        f"bundle = {_q(state / 'models' / 'classifier')}",
    ]
    if source.under("models/detector"):
        lines.append(f"detector_bundle = {_q(state / 'models' / 'detector')}")
    lines += [
        'backend = "auto"  # TensorRT where it runs, else ONNX Runtime (doctor says which and why)',
        f"engine_cache_dir = {_q(state / 'engines')}",
        "",
        "[registry]",
        f"db = {_q(state / 'registry.db')}",
        f"hmac_key_file = {_q(etc / 'hmac.key')}",
        *_key_id_line(source),
        "",
        "[security]",
        f"trust_dir = {_q(etc / 'trust')}",
        "",
        "[outbox]",
        f"db = {_q(state / 'state.db')}",
        "",
        "[mqtt]",
        f"host = {_q(b.host)}",
        f"port = {b.port}",
        f"protocol = {_q(b.protocol)}",
        f"tls = {'true' if b.tls else 'false'}",
    ]
    lines += [f"{key} = {_q(etc / name)}" for key, name in source.tls_files.items()]
    lines += ["", "[log]", 'level = "INFO"', 'format = "json"  # journald; `iaflash-provision tail` reads it', ""]
    return "\n".join(lines)


class RegistryImport(Step):
    """The bundle's snapshot into the cache, unless the cache already holds it (or a newer seq of it)."""

    def __init__(self, box: Box, source: EnrolSource) -> None:
        self.box, self.source = box, source
        self.file = source.path(source.registry_snapshot)
        self.db = box.at(STATE) / "registry.db"
        self.name = f"registry {self.db}"
        self.owner = box.service
        with SubsetReader(self.file) as reader:
            self.header = reader.header

    def pending(self) -> str | None:
        h = self.header
        what = f"import {h.kind} {h.dataset_id} seq {h.seq} ({h.count} vehicles)"
        if not self.db.is_file():
            return what
        try:
            state = read_state(self.db)
        except IaflashError as exc:
            return f"{what}, replacing an unreadable cache ({exc})"
        if state is None or state.dataset_id != h.dataset_id or state.key_id != h.key_id or state.seq < h.seq:
            return what
        self.note = f" (already at seq {state.seq} of {state.dataset_id}: {state.count} vehicles)"
        return None

    def apply(self) -> None:
        etc = self.box.at(ETC)
        raw = (etc / "hmac.key").read_bytes().strip()
        self.db.parent.mkdir(parents=True, exist_ok=True)
        state, _ = import_signed_subset(
            self.db,
            self.file,
            trust_dir=etc / "trust",
            allow_unsigned=False,
            expected_key_id=key_id(load_hmac_key(raw)),
            state_file=trust_state_path(self.db),  # the agent's own: revocations, registry mark
        )
        ids = self.box.ids(self.box.service)
        trust_state = trust_state_path(self.db)
        if ids is not None and trust_state.exists():  # the agent updates it as the service user
            os.chown(trust_state, *ids)
        for path in (self.db, self.db.with_name(self.db.name + "-wal"), self.db.with_name(self.db.name + "-shm")):
            if path.exists():
                if ids is not None:
                    os.chown(path, *ids)
                path.chmod(0o640)
        self.note = f" (now at seq {state.seq}: {state.count} vehicles)"


def build_steps(source: EnrolSource, box: Box, unit: Path) -> list[Step]:
    svc, cfg_owner = box.service, box.config_owner
    ingress = Owner(box.user, INGRESS_GROUP)
    steps: list[Step] = [ServiceUser(box, STATE)]
    steps += [
        Dir(box, ETC, 0o750, cfg_owner),
        Dir(box, f"{ETC}/trust", 0o755, ROOT_OWNER),
        Dir(box, STATE, 0o751, svc),  # StateDirectoryMode=0751
        Dir(box, f"{STATE}/models", 0o750, svc),
        Dir(box, f"{STATE}/engines", 0o750, svc),
        # as systemd/iaflash.tmpfiles: the radar feed's group passes through to incoming/ and writes only there
        Dir(box, f"{STATE}/spool", 0o710, ingress),
        Dir(box, f"{STATE}/spool/incoming", 0o2770, ingress),
        *(Dir(box, f"{STATE}/spool/{sub}", 0o750, svc) for sub in ("processing", "done", "rejected")),
    ]
    for name, target in (("iaflash.sysusers", SYSUSERS), ("iaflash.tmpfiles", TMPFILES)):
        steps.append(File(box, target, 0o644, ROOT_OWNER, source=find_shipped(name), what="systemd " + name[8:]))
    steps.append(File(box, f"{ETC}/hmac.key", 0o600, svc, source=source.path("plate.key"), what="HMAC key"))
    public = {"ca.pem": "TLS CA", "client.pem": "client certificate"}
    for name, what in public.items():
        if source.has(name):
            steps.append(File(box, f"{ETC}/{name}", 0o644, ROOT_OWNER, source=source.path(name), what=what))
    if source.has("client.key"):
        steps.append(File(box, f"{ETC}/client.key", 0o600, svc, source=source.path("client.key"), what="client key"))
    for rel in source.under("trust"):
        steps.append(File(box, f"{ETC}/{rel}", 0o644, ROOT_OWNER, source=source.path(rel), what="trusted key"))
    for kind in ("classifier", "detector"):
        files = [r.split("/", 2)[2] for r in source.under(f"models/{kind}")]
        if files:
            steps.append(Tree(box, f"{STATE}/models/{kind}", source.path(f"models/{kind}"), files, svc, f"{kind}"))
    config = render_config(source, box).encode()
    steps.append(File(box, f"{ETC}/agent.toml", 0o640, cfg_owner, content=config, keep_previous=True, what="config"))
    steps.append(File(box, UNIT_FILE, 0o644, ROOT_OWNER, source=unit, what="systemd unit"))
    steps.append(RegistryImport(box, source))
    return steps


@dataclass
class StepResult:
    name: str
    status: str  # changed | unchanged | would change
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


@dataclass
class EnrolReport:
    source: str
    root: str
    config: str
    dry_run: bool
    steps: list[StepResult] = field(default_factory=list)
    issues: list[ConfigIssue] = field(default_factory=list)
    doctor: Report | None = None
    next_steps: list[str] = field(default_factory=list)
    ownership: str | None = None  # why owners were not set (not root, no service user here)

    @property
    def changed(self) -> int:
        return sum(s.status in ("changed", "would change") for s in self.steps)

    @property
    def exit_code(self) -> int:
        if self.dry_run:
            return 0
        if self.issues:
            return 3
        return self.doctor.exit_code if self.doctor is not None else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == 0,
            "command": "enrol",
            "source": self.source,
            "root": self.root,
            "config": self.config,
            "dry_run": self.dry_run,
            "changed": self.changed,
            "steps": [s.to_dict() for s in self.steps],
            "check_config": [vars(i) for i in self.issues],
            "doctor": None if self.doctor is None else self.doctor.to_dict(),
            "next": self.next_steps,
            "ownership": self.ownership,
        }


def _check_config(path: Path) -> list[ConfigIssue]:
    text = path.read_text(encoding="utf-8")
    try:
        cfg = parse_config(tomllib.loads(text), str(path), text)
    except ConfigError as exc:
        return exc.issues
    return semantic_issues(cfg, str(path))


def _run_system(box: Box, argv: list[str], what: str) -> StepResult | None:
    """Run a systemd tool on the running system (--root /, systemd booted, tool installed), else nothing."""
    tool = shutil.which(argv[0])
    if not box.is_system or tool is None or not Path("/run/systemd/system").is_dir():
        return None
    out = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise EnrolError(f"{' '.join(argv)} failed: {out.stderr.strip()}; fix: run it by hand and read its error")
    return StepResult(what, "changed", " ".join(argv))


def _systemctl_reload(box: Box) -> StepResult | None:
    return _run_system(box, ["systemctl", "daemon-reload"], "systemd")


def _tmpfiles(box: Box) -> StepResult | None:
    """systemd-tmpfiles sets the default ACL of spool/incoming (the radar's files stay readable by the agent)."""
    return _run_system(box, ["systemd-tmpfiles", "--create", TMPFILES], "spool ACL")


def _next_steps(box: Box, config: Path) -> list[str]:
    sudo = "sudo " if box.is_system else ""
    cfg = "" if box.is_system else f" --config {config}"
    out = []
    if not box.at(AGENT_BIN).is_file():
        out.append(f"install the agent where the unit runs it: {box.at(AGENT_BIN)} (docs/TECHNICIAN.md, 'Install')")
    out += [
        f"{sudo}systemctl enable --now iaflash-agent   (start the agent)",
        f"{sudo}iaflash-provision selftest{cfg}   (known captures through this box, to the broker)",
        f"{sudo}iaflash-provision tail   (watch the verdicts and their reasons; Ctrl-C stops)",
    ]
    return out


def enrol(source: EnrolSource, box: Box, *, dry_run: bool = False, broker_timeout_s: float = 3.0) -> EnrolReport:
    """Run (or, with ``dry_run``, list) every step; then check-config and doctor on the result."""
    config = box.at(ETC) / "agent.toml"
    report = EnrolReport(str(source.origin), str(box.root), str(config), dry_run, ownership=box.ownership_problem())
    unit_changed = spool_changed = False
    for step in build_steps(source, box, find_unit()):
        if step.skipped is not None:
            report.steps.append(StepResult(step.name, "skipped", step.skipped))
            continue
        change = step.pending()
        owner = getattr(step, "owner", None)
        if change is not None and not dry_run:
            step.apply()
            unit_changed |= step.name.startswith("systemd unit")
            spool_changed |= "/spool" in step.name or step.name.startswith("systemd tmpfiles")
        note = step.note + (box.owner_note(owner) if isinstance(owner, Owner) else "")
        if change is None:
            report.steps.append(StepResult(step.name, "unchanged", ("up to date" + note).strip()))
        else:
            report.steps.append(StepResult(step.name, "would change" if dry_run else "changed", change + note))
    if dry_run:
        report.next_steps = [f"run it again without --dry-run: sudo iaflash-provision enrol {source.origin}"]
        return report
    for ran in (_systemctl_reload(box) if unit_changed else None, _tmpfiles(box) if spool_changed else None):
        if ran is not None:
            report.steps.append(ran)
    report.issues = _check_config(config)
    report.doctor = run_doctor(config, broker_timeout_s=broker_timeout_s, user=box.user)
    report.next_steps = _next_steps(box, config)
    return report
