"""Central's TOML configuration for ``serve`` (every key optional; unknown keys are refused).

```toml
[store]
url = "postgresql://central@db.example:5432/iaflash"   # default: sqlite file central.db

[web]
host = "127.0.0.1"
port = 8080
users_file = "/etc/iaflash-central/reviewers"           # lines "name:<werkzeug password hash>"

[retention]
decided_days = 365     # dismissed / confirmed / cannot-tell flags
evidence_days = 90     # evidence images fetched from the boxes
# the audit log is never purged

[plates]
max_speed_kmh = 250    # faster than this between two sites = impossible journey

[sites.site-042]
lat = 48.8566
lon = 2.3522
```
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

__all__ = ["CentralConfig", "load_config"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreConfig(_Section):
    url: str = Field("central.db", description="SQLite file (default) or postgresql:// URL.")


class WebConfig(_Section):
    host: str = Field("127.0.0.1", description="Address of the review page (loopback by default).")
    port: int = Field(8080, ge=0, le=65535, description="Port of the review page (0: none).")
    users_file: Path | None = Field(None, description="Reviewers: one 'name:hash' line each (iaflash-central user).")


class RetentionConfig(_Section):
    decided_days: float = Field(365.0, gt=0, description="Keep decided flags this long after the decision.")
    evidence_days: float = Field(90.0, gt=0, description="Keep fetched evidence images this long.")


class PlatesConfig(_Section):
    max_speed_kmh: float = Field(250.0, gt=0, description="Speed above which two sightings are impossible.")


class Site(_Section):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    name: str = ""


class CentralConfig(_Section):
    store: StoreConfig = StoreConfig()
    web: WebConfig = WebConfig()
    retention: RetentionConfig = RetentionConfig()
    plates: PlatesConfig = PlatesConfig()
    sites: dict[str, Site] = Field(default_factory=dict)

    def coordinates(self) -> dict[str, tuple[float, float]]:
        return {k: (s.lat, s.lon) for k, s in self.sites.items()}


def load_config(path: Path | None) -> CentralConfig:
    """The config in ``path`` (defaults when None); ValueError naming the file, key and fix."""
    if path is None:
        return CentralConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return CentralConfig.model_validate(data)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror} (fix: --config to a readable TOML file)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{path}: {problems} (fix: see docs/CENTRAL.md#configuration)") from exc
