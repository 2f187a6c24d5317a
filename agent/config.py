"""The agent's one TOML config file, validated by pydantic.

Unknown keys are refused. Every error names the file, the dotted key and a fix.
Reading the file happens in :func:`load_config`, never at import time.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rapidfuzz import fuzz, process

from iaflash.agent.errors import ConfigError, ConfigIssue

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

Outcome = Literal["match", "mismatch", "inconclusive", "unknown_plate", "unreadable_plate", "unsupported"]
OUTCOMES: tuple[Outcome, ...] = (
    "match",
    "mismatch",
    "inconclusive",
    "unknown_plate",
    "unreadable_plate",
    "unsupported",
)


def _default_publish() -> list[Outcome]:
    return ["mismatch"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteConfig(_Section):
    site_id: str = Field(
        "site-000",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Radar site identifier; part of every MQTT topic.",
    )
    device_id: str = Field(
        "box-00",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="This box's identifier; part of every MQTT topic.",
    )


class SpoolConfig(_Section):
    dir: Path = Field(Path("/var/lib/iaflash/spool"), description="Spool root; radars write into <dir>/incoming.")
    poll_interval_s: float = Field(0.2, gt=0, le=60, description="How often incoming/ is scanned.")
    max_image_bytes: int = Field(30_000_000, gt=0, description="Larger image files are rejected.")
    max_image_pixels: int = Field(60_000_000, gt=0, description="Images with more pixels are rejected.")
    min_image_side: int = Field(64, gt=0, description="Images with a smaller side are rejected.")
    max_jpeg_scans: int = Field(
        100,
        ge=1,
        le=100_000,
        description="Decode budget: JPEGs with more scans are rejected (too_many_scans). A progressive image "
        "needs about 10; each scan walks the whole image, so thousands stall the decoder for minutes.",
    )
    max_sidecar_bytes: int = Field(65_536, gt=0, description="Larger sidecars are rejected.")
    retention_days: float = Field(30, ge=0, description="Processed captures are kept this long in done/.")
    min_free_mb: int = Field(500, ge=0, description="Disk guard: intake pauses below this much free space.")
    intake_threads: int = Field(
        2,
        ge=1,
        le=8,
        description="Parallel decode/detect workers feeding the classifier "
        "(OpenCV releases the GIL; see benchmarks/pipeline_bench.py).",
    )
    orphan_after_s: float = Field(3600, gt=0, description="Files in incoming/ with no sidecar this long are rejected.")
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="A capture whose handling stopped the agent this many times (crash, kill, watchdog) is "
        "quarantined to rejected/.",
    )
    rejected_retention_days: float = Field(
        30, ge=0, description="Files in rejected/ (their sidecars may hold plates in clear) are deleted after this."
    )


class ModelConfig(_Section):
    bundle: Path = Field(
        Path("/var/lib/iaflash/models/classifier"),
        description="Classifier model bundle directory (manifest.json, model.onnx, labels.csv).",
    )
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto", description="Inference backend; auto tries TensorRT then falls back to ONNX Runtime."
    )
    threads: int = Field(0, ge=0, le=64, description="Intra-op threads for ONNX Runtime; 0 = number of cores.")
    detector_bundle: Path | None = Field(
        None, description="Vehicle detector bundle; unset = use the sidecar's vehicle box or the whole frame."
    )
    precision: Literal["fp16", "fp32", "int8"] = Field(
        "fp16", description="TensorRT engine precision (int8 only after an accuracy check)."
    )
    engine_cache_dir: Path = Field(
        Path("/var/lib/iaflash/engines"), description="Where built TensorRT plans are cached, keyed by staleness key."
    )
    workspace_mb: int = Field(1024, ge=64, description="TensorRT builder workspace.")
    max_batch: int = Field(4, ge=1, le=64, description="Micro-batching: most captures classified in one call.")
    max_wait_ms: float = Field(5.0, ge=0, le=1000, description="Micro-batching: longest wait for a batch to fill.")
    store_dir: Path = Field(
        Path("/var/lib/iaflash/models"),
        description="Where `iaflash-provision model install` keeps bundles side by side "
        "(<store_dir>/<name>/<version>/); bundle and detector_bundle become links to the version in use.",
    )
    keep_versions: int = Field(
        3,
        ge=1,
        le=50,
        description="Versions kept per model slot, most recently used first (the one in use always stays).",
    )


class SecurityConfig(_Section):
    trust_dir: Path = Field(
        Path("/etc/iaflash/trust"),
        description="Directory of trusted Ed25519 publisher keys (*.pub) for bundles, registry files and commands.",
    )
    allow_unsigned: bool = Field(
        False,
        description="Accept unsigned bundles and registry files (development only; each one is logged and counted).",
    )


class RegistryConfig(_Section):
    db: Path = Field(Path("/var/lib/iaflash/registry.db"), description="SQLite file of the SIV subset cache.")
    hmac_key_file: Path = Field(
        Path("/etc/iaflash/hmac.key"),
        description="This site's plate key (HMAC, hex, >= 32 bytes), mode 0600. "
        "$CREDENTIALS_DIRECTORY/hmac-key takes precedence when set by systemd.",
    )
    hmac_key_id: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{16}$",
        description="Id of this site's plate key (iaflash-central registry keygen prints it): "
        "a key file with another id (another site's key) is refused; unset = not checked.",
    )
    max_age_hours: float = Field(72, gt=0, description="Past this age verdicts are marked registry_stale.")
    fuzzy_min_score: float = Field(
        88,
        ge=0,
        le=100,
        description="Registry make/model text maps onto the taxonomy only at or "
        "above this fuzzy score; below it the verdict is unsupported.",
    )


class DecisionConfig(_Section):
    min_plate_confidence: float = Field(
        0.5, ge=0, le=1, description="Radar plate reads below this are unreadable_plate."
    )
    min_top1: float = Field(
        0.6, ge=0, le=1, description="The classifier's top-1 probability must reach this for any flag."
    )
    make_threshold: float = Field(0.05, ge=0, le=1, description="mismatch/make when P(registered make) is below this.")
    model_threshold: float = Field(
        0.05, ge=0, le=1, description="mismatch/model when P(registered model) is below this."
    )
    match_threshold: float = Field(0.3, ge=0, le=1, description="match when P(registered model) reaches this.")
    top_k: int = Field(5, ge=1, le=50, description="How many predictions the verdict's evidence keeps.")
    other_threshold: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Abstain when the bundle's other/unknown classes hold this much probability, even below the top-1.",
    )
    override_operating_point: bool = Field(
        False,
        description="Use these thresholds as given, even looser than the bundle's fitted operating point, and flag "
        "with a bundle that has none (logged at start, named in every verdict). Without it, thresholds set here "
        "may only make the bundle's operating point stricter, and a bundle without one never flags.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> DecisionConfig:
        if self.model_threshold > self.match_threshold:
            raise ValueError(
                "model_threshold must not exceed match_threshold (a vehicle cannot be both a mismatch and a match)"
            )
        return self


class OutboxConfig(_Section):
    db: Path = Field(
        Path("/var/lib/iaflash/state.db"), description="SQLite (WAL) file holding processed captures and unsent events."
    )
    processed_retention_days: float = Field(
        90,
        ge=1,
        le=3650,
        description="Processed captures are remembered this long (at least spool.retention_days): a capture "
        "dropped again later is processed again as new. Unsent events are never pruned.",
    )


class MqttConfig(_Section):
    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version (5 may be written as a number).")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        """``protocol = 5`` (a TOML integer) means "5"; anything else is checked as written."""
        return "5" if value == 5 and not isinstance(value, bool) else value

    client_id: str = Field("", description="MQTT client id; empty = iaflash-<site_id>-<device_id>.")
    topic_prefix: str = Field("iaflash/v1", description="Topics are <prefix>/<site>/<device>/...")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive.")
    tls: bool = Field(False, description="Use TLS.")
    ca_file: Path | None = Field(None, description="CA bundle for TLS.")
    cert_file: Path | None = Field(None, description="Client certificate for TLS.")
    key_file: Path | None = Field(None, description="Client private key for TLS.")
    username: str | None = Field(None, description="Username (use with TLS).")
    password_file: Path | None = Field(None, description="File holding the password (mode 0600).")
    publish: list[Outcome] = Field(default_factory=_default_publish, description="Verdict outcomes sent as events.")
    max_inflight: int = Field(100, ge=1, le=1000, description="Unacknowledged publishes at once.")
    republish_after_s: float = Field(120, gt=0, description="Republish an event unacknowledged this long.")
    heartbeat_interval_s: float = Field(60, gt=0, description="Period of the heartbeat message.")

    @model_validator(mode="after")
    def _tls_files(self) -> MqttConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        if (self.cert_file is not None or self.ca_file is not None) and not self.tls:
            raise ValueError("ca_file/cert_file are set but tls = false: set tls = true")
        return self


MaskClass = Literal["face", "person", "plate"]


def _default_mask_classes() -> list[MaskClass]:
    return ["face", "person", "plate"]


def _default_occupant_region() -> list[float]:
    return [0.0, 0.0, 1.0, 0.55]


class EvidenceConfig(_Section):
    """How images are anonymised before they leave the box (docs/EVIDENCE.md)."""

    method: Literal["fill", "pixelate"] = Field(
        "fill", description="How masked regions are destroyed: solid fill, or heavy pixelation plus noise."
    )
    mask_outside_vehicle: bool = Field(
        True, description="Mask everything outside the reviewed vehicle's box (other vehicles, plates, people)."
    )
    occupant_region: list[float] = Field(
        default_factory=_default_occupant_region,
        description="Part of the vehicle box masked as its occupants (windscreen), as [x0, y0, x1, y1] "
        "fractions of the box; [] = only the face detector's boxes.",
    )
    detector_bundle: Path | None = Field(
        None,
        description="Optional ONNX face/person/plate detector bundle (signed, task detector); its boxes are masked.",
    )
    mask_classes: list[MaskClass] = Field(
        default_factory=_default_mask_classes,
        description="Detector classes masked: face and person anywhere, plate outside the vehicle's box.",
    )
    mask_margin: float = Field(0.2, ge=0, le=2, description="Detector boxes grow by this × their width/height.")
    vehicle_margin: float = Field(
        0.0, ge=0, le=0.5, description="The kept vehicle box grows by this × its width/height."
    )
    pixel_block: int = Field(24, ge=8, le=256, description="pixelate: block side in pixels (at least).")
    jpeg_quality: int = Field(85, ge=50, le=100, description="Quality of the re-encoded JPEG (no metadata kept).")
    no_vehicle_box: Literal["refuse", "withhold"] = Field(
        "refuse",
        description="An image with no vehicle box: refuse the command, or withhold that image and send the others.",
    )

    @model_validator(mode="after")
    def _safe(self) -> EvidenceConfig:
        region = self.occupant_region
        if region and (len(region) != 4 or not (0 <= region[0] < region[2] <= 1 and 0 <= region[1] < region[3] <= 1)):
            raise ValueError(
                "occupant_region must be [] or [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"
            )
        if self.detector_bundle is None and (not self.mask_outside_vehicle or not region):
            raise ValueError(
                "mask_outside_vehicle = false or occupant_region = [] without a detector_bundle would let "
                "bystanders or occupants out unmasked; set detector_bundle or keep the defaults"
            )
        return self


class MetricsConfig(_Section):
    """The heartbeat's figures for a local Prometheus/node_exporter (docs/METRICS.md); both are off by default."""

    port: int = Field(
        0, ge=0, le=65535, description="Serve OpenMetrics text on http://127.0.0.1:<port>/metrics; 0 = off."
    )
    textfile: Path | None = Field(
        None,
        description="Also write them to this node_exporter textfile (.../textfile/iaflash.prom); unset = off.",
    )
    interval_s: float = Field(15, gt=0, le=3600, description="How often the textfile is rewritten.")


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    format: Literal["json", "text"] = Field("json", description="json for journald, text for a terminal.")


class Config(_Section):
    site: SiteConfig = Field(default_factory=SiteConfig)  # type: ignore[arg-type]  # all fields defaulted
    spool: SpoolConfig = Field(default_factory=SpoolConfig)  # type: ignore[arg-type]  # all fields defaulted
    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[arg-type]  # all fields defaulted
    registry: RegistryConfig = Field(default_factory=RegistryConfig)  # type: ignore[arg-type]  # defaulted
    security: SecurityConfig = Field(default_factory=SecurityConfig)  # type: ignore[arg-type]  # defaulted
    decision: DecisionConfig = Field(default_factory=DecisionConfig)  # type: ignore[arg-type]  # defaulted
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)  # type: ignore[arg-type]  # all defaulted
    mqtt: MqttConfig = Field(default_factory=MqttConfig)  # type: ignore[arg-type]  # all fields defaulted
    log: LogConfig = Field(default_factory=LogConfig)  # type: ignore[arg-type]  # all fields defaulted
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)  # type: ignore[arg-type]  # all defaulted
    evidence: EvidenceConfig = Field(default_factory=EvidenceConfig)  # type: ignore[arg-type]  # defaulted

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"iaflash-{self.site.site_id}-{self.site.device_id}"

    @property
    def topic_root(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.site.site_id}/{self.site.device_id}"

    @property
    def trust_state_file(self) -> Path:
        """The box's trust state (revocation list, rollback marks): beside the registry cache (docs/SIGNING.md)."""
        return trust_state_path(self.registry.db)


def trust_state_path(registry_db: Path) -> Path:
    """Where the box keeps its trust state for a registry cache at ``registry_db``: beside it."""
    return (
        registry_db.parent / "trust-state.json"
    )  # engines.trust_state.STATE_FILE (not imported: the decision imports config, and must not pull cryptography)


def _unknown_key_fix(key: str, section_model: type[BaseModel] | None) -> str:
    """The fix for a key the section does not have, with the closest allowed key when one is close."""
    if section_model is None:
        return "remove it or correct its spelling; see the config reference in README.md"
    names = sorted(section_model.model_fields)
    guess = process.extractOne(key, names, scorer=fuzz.ratio, score_cutoff=60)
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    return f"{hint}remove it or correct its spelling; allowed keys here: {', '.join(names)}"


def _fix_for(err: dict[str, Any], section_model: type[BaseModel] | None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return _unknown_key_fix(str(err["loc"][-1]), section_model)
    if kind == "missing":
        return "add this key"
    if kind == "literal_error":
        return f"use one of the allowed values ({err.get('ctx', {}).get('expected', '')})"
    if kind.endswith("_parsing") or kind.endswith("_type"):
        return "give a value of the right type (see the config reference in README.md)"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return "use a value inside the documented range"
    return "see the config reference in README.md"


def _section_of(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    if len(loc) <= 1:
        return Config
    field = Config.model_fields.get(str(loc[0]))
    ann = field.annotation if field else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


_TABLE_RE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\- ]+?)\s*\]\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*=")


def line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line where the key at ``loc`` (``("mqtt", "port")``) is set in TOML ``text``.

    A plain scan of ``[table]`` headers and ``key =`` lines, enough for this flat, two-level
    file; None when the key is not written there (a missing key, an inline table).
    """
    if not loc:
        return None
    *tables, key = (str(part) for part in loc)
    current: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TABLE_RE.match(line)
        if header:
            current = [part.strip() for part in header.group(1).split(".")]
            if current == [*tables, key]:
                return number  # the key names a whole table (a misspelt section)
            continue
        found = _KEY_RE.match(line)
        if found and current == tables and found.group(1) == key:
            return number
    return None


def issues_from_validation(exc: ValidationError, file: str, text: str | None = None) -> list[ConfigIssue]:
    """Turn pydantic's errors into file/line/key/problem/fix issues (lines when ``text`` is given)."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        problem = err["msg"].replace("Value error, ", "")
        line = line_of(text, loc) if text is not None else None
        fix = _fix_for(dict(err), _section_of(loc))
        out.append(ConfigIssue(file=file, key=key, problem=problem, fix=fix, line=line))
    return out


def parse_config(data: dict[str, Any], file: str = "<config>", text: str | None = None) -> Config:
    """Validate an already-parsed TOML document (``text``, its source, gives line numbers)."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(issues_from_validation(exc, file, text)) from exc


def load_config(path: Path | str | None) -> Config:
    """Read and validate a config file; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            [
                ConfigIssue(
                    str(path),
                    "(file)",
                    f"cannot read: {exc.strerror}",
                    "check the path and that the service user may read it",
                )
            ]
        ) from exc
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            [ConfigIssue(str(path), "(syntax)", f"not valid TOML: {exc}", "fix the TOML syntax at the position given")]
        ) from exc
    return parse_config(data, str(path), text)


def read_secret(name: str, fallback: Path | None, *, what: str, config_key: str) -> bytes:
    """Read a secret from ``$CREDENTIALS_DIRECTORY/<name>`` or from a 0600 file.

    Refuses a fallback file readable by group or others, saying how to fix it.
    """
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / name).is_file():
        return (Path(creds) / name).read_bytes().strip()
    if fallback is None:
        raise ConfigError(
            [
                ConfigIssue(
                    "(config)",
                    config_key,
                    f"no {what} configured",
                    f"set {config_key} or provide the systemd credential {name!r}",
                )
            ]
        )
    try:
        st = fallback.stat()
    except OSError as exc:
        raise ConfigError(
            [
                ConfigIssue(
                    "(config)",
                    config_key,
                    f"{what} file {fallback}: {exc.strerror}",
                    f"create it (mode 0600) or set LoadCredential={name}:...",
                )
            ]
        ) from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            [
                ConfigIssue(
                    "(config)",
                    config_key,
                    f"{what} file {fallback} is readable by group/others (mode {stat.S_IMODE(st.st_mode):o})",
                    f"chmod 600 {fallback}",
                )
            ]
        )
    return fallback.read_bytes().strip()


def _default_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]"
    if isinstance(value, (str, Path)):
        return f'"{value}"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def reference_markdown() -> str:
    """The config reference tables that README.md embeds (regenerate with `./run docs`)."""
    out: list[str] = []
    for section, field in Config.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        out += [f"**[{section}]**", "", "| key | default | meaning |", "|---|---|---|"]
        for key, f in model.model_fields.items():
            default = _default_text(f.get_default(call_default_factory=True))
            out.append(f"| `{key}` | `{default}` | {f.description} |".replace("``", "(unset)"))
        out.append("")
    return "\n".join(out)
