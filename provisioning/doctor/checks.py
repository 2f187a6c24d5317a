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

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from iaflash.agent.config import Config, load_config, read_secret
from iaflash.agent.config_checks import semantic_issues
from iaflash.agent.errors import AnonymiseError, ConfigError, ConfigIssue, RegistryError
from iaflash.agent.evidence.detector import load_finder
from iaflash.agent.registry.cache import read_state
from iaflash.agent.registry.plates import key_id, load_hmac_key
from iaflash.engines.errors import EngineError
from iaflash.engines.factory import backend_availability
from iaflash.engines.signing import load_trusted_bundle
from iaflash.provisioning.doctor.host import (
    check_broker,
    check_broker_files,
    check_disk,
    check_outbox,
    check_rejected,
    check_spool_dirs,
    check_spool_queue,
    check_systemd,
)
from iaflash.provisioning.doctor.report import (
    DEFAULT_CONFIG,
    SERVICE_USER,
    STATUSES,
    UNIT,
    Check,
    Report,
    split_fix,
)

__all__ = ["DEFAULT_CONFIG", "STATUSES", "Check", "Report", "check_systemd", "run_doctor"]

_COVERED = {"model.bundle", "registry.hmac_key_file", "spool.dir", "registry.db"}  # own checks say more


def _issues(name: str, issues: Iterable[ConfigIssue]) -> Check:
    items = list(issues)
    finding = "; ".join(f"{i.file}: {i.key}: {i.problem}" for i in items)
    return Check(name, "fail", finding, "; ".join(dict.fromkeys(f"{i.key}: {i.fix}" for i in items)))


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
        return Check(
            "config",
            "warn",
            f"{finding}, but security.allow_unsigned = true accepts unsigned bundles and registry files",
            "set security.allow_unsigned = false (development only)",
        ), cfg
    return Check("config", "ok", finding), cfg


def _box_key(cfg: Config) -> tuple[str, str]:
    """(key id, where it came from) of the deployment HMAC key; raises ConfigError or RegistryError."""
    raw = read_secret("hmac-key", cfg.registry.hmac_key_file, what="HMAC key", config_key="registry.hmac_key_file")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    file = cfg.registry.hmac_key_file
    source = (
        "systemd credential hmac-key"
        if creds and (Path(creds) / "hmac-key").is_file()
        else f"{file} (mode {file.stat().st_mode & 0o777:o})"
    )
    return key_id(load_hmac_key(raw, cfg.registry.hmac_key_id)), source


def check_hmac_key(cfg: Config) -> Check:
    """This site's plate key is readable, private, well formed; name its key id."""
    try:
        kid, source = _box_key(cfg)
    except ConfigError as exc:
        return _issues("hmac key", exc.issues)
    except RegistryError as exc:
        return Check("hmac key", "fail", *split_fix(f"{cfg.registry.hmac_key_file}: {exc}", "rewrite the key file"))
    return Check("hmac key", "ok", f"key id {kid} from {source}")


def check_registry(cfg: Config, config_file: str = str(DEFAULT_CONFIG)) -> Check:
    """The SIV cache exists, was made for this box's key, and is fresh."""
    db = cfg.registry.db
    command = f"iaflash-provision registry import FILE --config {config_file}"
    importing = f"import a snapshot: {command}"
    try:
        state = read_state(db)
    except RegistryError as exc:
        return Check("registry", "fail", *split_fix(str(exc), importing))
    if state is None:
        return Check("registry", "fail", f"{db}: empty (never imported)", importing)
    try:
        box_kid: str | None = _box_key(cfg)[0]
    except (ConfigError, RegistryError):
        box_kid = None  # the hmac key check reports why
    age, max_age = state.age_hours(), cfg.registry.max_age_hours
    finding = (
        f"{db}: {state.kind} {state.dataset_id} seq {state.seq}, {state.count} vehicles, "
        f"key id {state.key_id}, age {age:.1f} h (max {max_age:g} h)"
    )
    if box_kid is not None and box_kid != state.key_id:
        return Check(
            "registry",
            "fail",
            f"{finding}: made for key id {state.key_id} but this box's key is {box_kid}, so every plate looks unknown",
            f"ask central for a snapshot made for key id {box_kid} and run {command}, "
            "or install the site key the registry was made for",
        )
    if age > max_age:
        return Check(
            "registry",
            "warn",
            f"{finding}: STALE, verdicts are marked registry_stale",
            "import the latest delta or snapshot from central (or check the box's link to central)",
        )
    if state.count == 0:
        return Check("registry", "warn", f"{finding}: no vehicles", "import a snapshot that holds this site's plates")
    return Check("registry", "ok", finding)


# ------------------------------------------------------------------------------- models and backends


def check_bundle(cfg: Config, name: str, path: Path, task: str) -> Check:
    """A bundle loads, its signature checks against the trust store, every file's sha256 matches."""
    trust = cfg.security.trust_dir
    fix = (
        f"reinstall the bundle signed by the model publisher into {path}, and put the publisher's "
        f".pub into {trust} (docs/SIGNING.md)"
    )
    try:
        bundle = load_trusted_bundle(path, trust, cfg.security.allow_unsigned, state_file=cfg.trust_state_file)
    except EngineError as exc:  # its own fix speaks to the publisher; the technician reinstalls
        return Check(name, "fail", split_fix(str(exc), fix)[0], fix)
    m = bundle.manifest
    finding = f"{m.name} {m.version} ({m.task}, {len(bundle.labels)} labels) in {path}"
    if m.task != task:
        return Check(
            name, "fail", f"{finding}: is a {m.task}, a {task} is needed here", f"point the config at a {task} bundle"
        )
    signed = "signature not required (allow_unsigned)" if cfg.security.allow_unsigned else f"signed, trusted by {trust}"
    return Check(name, "ok", f"{finding}, {signed}")


GPU_NODES = ("/dev/nvhost-ctrl-gpu", "/dev/nvmap", "/dev/nvidia0", "/dev/nvidiactl")  # Jetson, then discrete


def gpu_access_problem(user: str | None, nodes: tuple[str, ...] = GPU_NODES) -> str | None:
    """Why the service user cannot open the GPU's device nodes (its groups), or None (fine, or no GPU here)."""
    import grp  # noqa: PLC0415  # only for this check
    import pwd  # noqa: PLC0415

    try:
        account = pwd.getpwnam(user) if user and os.geteuid() == 0 else None
    except KeyError:
        account = None
    for node in (Path(n) for n in nodes):
        if not node.exists():
            continue
        st = node.stat()
        if account is None:
            if not os.access(node, os.R_OK | os.W_OK):
                return f"this user cannot open {node}"
            continue
        groups = os.getgrouplist(account.pw_name, account.pw_gid)
        bits = (
            st.st_mode >> 6 if st.st_uid == account.pw_uid else st.st_mode >> 3 if st.st_gid in groups else st.st_mode
        )
        if account.pw_uid != 0 and bits & 0o6 != 0o6:
            group = grp.getgrgid(st.st_gid).gr_name
            return f"user {account.pw_name} cannot open {node} (group {group}, and {account.pw_name} is not in it)"
    return None


def _serving(cfg: Config, found: dict[str, tuple[bool, str]]) -> str:
    """Which backend the agent will really run on, and why."""
    wanted, (trt_ok, trt_why) = cfg.model.backend, found["tensorrt"]
    ort = (
        "ONNX Runtime on the GPU (CUDA)"
        if "CUDAExecutionProvider" in found["onnxruntime"][1]
        else "ONNX Runtime on the CPU"
    )
    if wanted == "tensorrt":
        return "TensorRT, as model.backend = tensorrt asks"
    if wanted == "onnxruntime":
        return f"{ort}, as model.backend = onnxruntime asks"
    if trt_ok:
        return f"TensorRT (model.backend = auto; {ort} serves while its plan builds, the first start only)"
    return f"{ort}, because model.backend = auto and TensorRT cannot run here: {trt_why}"


def check_backends(cfg: Config, user: str | None = SERVICE_USER) -> Check:
    """The configured inference backend can run here; say which one the agent will use and why."""
    found = {kind: backend_availability(kind) for kind in ("onnxruntime", "tensorrt")}
    finding = "; ".join(f"{k}: {'yes' if ok else 'no'} ({why})" for k, (ok, why) in found.items())
    wanted = cfg.model.backend
    need = "onnxruntime" if wanted == "auto" else wanted
    if not found[need][0]:
        return Check(
            "backends",
            "fail",
            f"model.backend = {wanted}: {finding}",
            "reinstall the agent's Python environment (onnxruntime)"
            if need == "onnxruntime"
            else 'install TensorRT from JetPack, or set model.backend = "auto"',
        )
    uses = f"the agent will use {_serving(cfg, found)}"
    gpu = gpu_access_problem(user)
    if gpu is not None:
        who = user or "iaflash"
        return Check(
            "backends",
            "warn",
            f"{uses}, but {gpu}: TensorRT and CUDA would fail there and the agent would run on the CPU ({finding})",
            f"sudo usermod -aG video,render {who} (the groups that exist), then sudo systemctl restart {UNIT}",
        )
    if wanted == "auto" and not found["tensorrt"][0] and Path("/etc/nv_tegra_release").exists():
        return Check(
            "backends",
            "warn",
            f"{uses}: this Jetson runs on the CPU (slow); {finding}",
            "install JetPack's TensorRT and pycuda (docs/JETSON.md)",
        )
    return Check("backends", "ok", f"{uses}; {finding}")


# ------------------------------------------------------------------------------- running and printing


def _guard(name: str, check: Callable[[], Check]) -> Check:
    """Run one check; a crash inside doctor becomes an ``error`` line and the other checks still run."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001  # a doctor bug must not hide the other checks' findings
        return Check(
            name,
            "error",
            f"doctor could not run this check: {type(exc).__name__}: {exc}",
            "report it with the output of `iaflash-provision doctor --json`",
        )


def check_detector(cfg: Config) -> Check:
    """The detector bundle, when one is configured."""
    if cfg.model.detector_bundle is None:
        return Check("detector", "skip", "no detector configured (model.detector_bundle): sidecar box or whole frame")
    return check_bundle(cfg, "detector", cfg.model.detector_bundle, "detector")


def check_evidence(cfg: Config) -> Check:
    """How evidence images are anonymised; the face/person/plate detector bundle loads, when one is set."""
    ev = cfg.evidence
    masks = ("everything outside the vehicle box" if ev.mask_outside_vehicle else "") + (
        f", occupant_region {ev.occupant_region}" if ev.occupant_region else ""
    )
    if ev.detector_bundle is None:
        return Check("evidence", "ok", f"evidence masked by geometry ({ev.method}: {masks.strip(', ')}); no detector")
    try:
        finder = load_finder(cfg)
    except AnonymiseError as exc:
        finding, fix = split_fix(str(exc), "install a signed face/person/plate detector bundle (docs/EVIDENCE.md)")
        return Check("evidence", "fail", finding, fix)
    assert finder is not None  # detector_bundle is set
    info = finder.info
    finder.close()
    detail = f"detector {info['name']} {info['version']} masks {', '.join(info['classes'])}"
    return Check(
        "evidence", "ok", f"evidence masked ({ev.method}: {masks.strip(', ') or 'detector boxes only'}); {detail}"
    )


def _site_checks(cfg: Config, where: str, broker_timeout_s: float, user: str | None) -> list[Check]:
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("hmac key", lambda: check_hmac_key(cfg)),
        ("registry", lambda: check_registry(cfg, where)),
        ("model", lambda: check_bundle(cfg, "model", cfg.model.bundle, "classifier")),
        ("detector", lambda: check_detector(cfg)),
        ("evidence", lambda: check_evidence(cfg)),
        ("backends", lambda: check_backends(cfg, user)),
        ("spool folders", lambda: check_spool_dirs(cfg, user)),
        ("spool queue", lambda: check_spool_queue(cfg)),
        ("rejected", lambda: check_rejected(cfg)),
        ("outbox", lambda: check_outbox(cfg)),
        ("disk", lambda: check_disk(cfg)),
        ("broker", lambda: check_broker(cfg, broker_timeout_s)),
        ("broker files", lambda: check_broker_files(cfg)),
    ]
    return [_guard(name, check) for name, check in checks]


def run_doctor(
    config_path: Path | None, *, broker_timeout_s: float = 3.0, user: str | None = SERVICE_USER, unit: str = UNIT
) -> Report:
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
