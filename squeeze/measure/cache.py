"""SQLite store of measurements, keyed by artifact hash + target + runtime version + protocol."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from pathlib import Path

from squeeze.util.cache import cache_dir

__all__ = ["MeasurementCache", "measurement_key"]


def measurement_key(artifact_sha: str, target_json: str, runtime_version: str, protocol_json: str) -> str:
    raw = "|".join([artifact_sha, target_json, runtime_version, protocol_json])
    return hashlib.sha256(raw.encode()).hexdigest()


def _set_aside(path: Path, exc: sqlite3.DatabaseError) -> None:
    """A damaged store is kept for inspection under a new name; the next open starts an empty one."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(aside)
    logging.getLogger("squeeze").warning(f"the measurement cache {path} was unreadable ({exc}); moved it to {aside} "
                                         "and started a new one (cached latencies are re-measured)")


class MeasurementCache:
    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path else cache_dir() / "measurements.sqlite"
        try:
            self._create()
        except sqlite3.DatabaseError as exc:  # not a database (overwritten, truncated), or a damaged one
            _set_aside(self.path, exc)
            self._create()

    def _create(self) -> None:
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS measurements (key TEXT PRIMARY KEY, created REAL, record TEXT)")
            db.execute("SELECT count(*) FROM measurements").fetchone()  # reads a page: damage shows here

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get(self, key: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT record FROM measurements WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, record: dict) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO measurements VALUES (?, ?, ?)", (key, time.time(), json.dumps(record)))
