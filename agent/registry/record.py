"""What the registry says about a plate, and the cache's provenance: plain data, no SQLite.

The decision and the events import these types without pulling in the cache's storage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

__all__ = ["RegistryRecord", "RegistryState"]


@dataclass(frozen=True)
class RegistryRecord:
    """What the registry says about a plate: make, model, genre (J.1) and body (J.3)."""

    make: str
    model: str
    genre: str | None
    body: str | None

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


@dataclass(frozen=True)
class RegistryState:
    """The cache's provenance. ``count`` is the number of vehicles in the cache.

    ``created_at`` is when central wrote the last imported file (None for caches that predate it);
    the cache's age is measured from it, since that is how old the data is.
    """

    dataset_id: str
    seq: int
    key_id: str
    kind: str
    imported_at: datetime
    count: int
    created_at: datetime | None = None

    def age_hours(self, now: datetime | None = None) -> float:
        """Hours since the data was created at central (since import when created_at is unknown)."""
        since = self.created_at or self.imported_at
        return ((now or datetime.now(timezone.utc)) - since).total_seconds() / 3600

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["imported_at"] = self.imported_at.isoformat()
        out["created_at"] = self.created_at.isoformat() if self.created_at else None
        return out
