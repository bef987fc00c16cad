"""The run ledger: what a run has finished, kept durably so that a killed run resumes where it stopped.

One SQLite file per output folder (``run/ledger.sqlite``) records the run's id, a fingerprint of the job
parts that decide the outputs, every tile's outcome as soon as it arrives, and every scene once it is
vectorised (its objects written to the catalog under the run's id). Tile pixels themselves are already
durable: each tile writes its chunk of the scene's ``.zarr.partial`` mosaic before its outcome returns.

A rerun of the same job in the same folder continues the same run: finished (``done``/``skipped``) tiles
and vectorised scenes are not redone; ``failed`` tiles are tried again. A changed job starts afresh.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import sqlite3
import uuid
from collections.abc import Iterable
from pathlib import Path

from geobatch.infer import TileOutcome
from geobatch.jobs import JobSpec

log = logging.getLogger(__name__)

LEDGER_VERSION = 2
_SCHEMA = """
create table if not exists run (key text primary key, value text not null);
create table if not exists tiles (
    tile_id text primary key, scene_id text not null, status text not null, reason text,
    labelled_pixels integer not null, worker text, caption text, attempts integer not null default 1
);
create table if not exists scenes (scene_id text primary key, outcome text not null);
"""


def job_fingerprint(spec: JobSpec) -> str:
    """A hash of what decides the outputs (scenes, bands, grid, model, prompts), not of where or how fast."""
    decisive = spec.model_dump(mode="json", include={"scenes", "prompts", "model", "bands", "resolution", "tiling"})
    if spec.region:  # added only when set, so that the runs of jobs without one still resume
        decisive["region"] = spec.region.model_dump(mode="json")
    decisive["ledger"] = LEDGER_VERSION  # a ledger of another layout cannot be resumed
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


class Ledger:
    """The durable record of one run in one output folder. Use :meth:`open`."""

    def __init__(self, folder: Path, connection: sqlite3.Connection, run_id: str, resumed: bool) -> None:
        self.folder = folder
        self._db = connection
        self.run_id = run_id
        self.resumed = resumed

    @classmethod
    def open(cls, output: Path, fingerprint: str) -> Ledger:
        """Continue the run recorded under ``output`` if it ran this job; otherwise start a new one there."""
        folder = output / "run"
        folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(folder / "ledger.sqlite", isolation_level=None)  # autocommit: each write is durable
        db.execute("pragma journal_mode=wal")
        db.executescript(_SCHEMA)
        recorded = dict(db.execute("select key, value from run"))
        if recorded.get("fingerprint") == fingerprint:
            log.info("resuming run %s in %s", recorded["run_id"], output)
            return cls(folder, db, recorded["run_id"], resumed=True)
        if recorded:
            log.warning("the job changed since run %s in %s; starting a new run", recorded["run_id"], output)
            db.executescript("drop table run; drop table tiles; drop table scenes;" + _SCHEMA)
            for partial in (output / "mosaics").glob("*.zarr.partial"):
                shutil.rmtree(partial)
        run_id = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        db.executemany("insert into run values (?, ?)", [("run_id", run_id), ("fingerprint", fingerprint)])
        return cls(folder, db, run_id, resumed=False)

    def record_tile(self, outcome: TileOutcome) -> None:
        self._db.execute(
            "insert into tiles (tile_id, scene_id, status, reason, labelled_pixels, worker, caption)"
            " values (?, ?, ?, ?, ?, ?, ?) on conflict(tile_id) do update set status = excluded.status,"
            " reason = excluded.reason, labelled_pixels = excluded.labelled_pixels, worker = excluded.worker,"
            " caption = excluded.caption, attempts = attempts + 1",
            (
                outcome.tile_id,
                outcome.scene_id,
                outcome.status,
                outcome.reason,
                outcome.labelled_pixels,
                outcome.worker,
                outcome.caption,
            ),
        )

    def finished_tiles(self, scene_ids: Iterable[str]) -> set[str]:
        """Ids of the tiles of ``scene_ids`` that need no more work."""
        ids = list(scene_ids)
        marks = ",".join("?" * len(ids))
        query = f"select tile_id from tiles where status in ('done', 'skipped') and scene_id in ({marks})"
        return {row[0] for row in self._db.execute(query, ids)}

    def tile_outcomes(self, scene_id: str) -> dict[str, TileOutcome]:
        rows = self._db.execute(
            "select tile_id, status, reason, labelled_pixels, worker, caption from tiles where scene_id = ?",
            (scene_id,),
        )
        return {tile_id: TileOutcome(scene_id, tile_id, *rest) for tile_id, *rest in rows}

    def record_scene(self, scene_id: str, outcome: dict) -> None:
        self._db.execute("insert or replace into scenes values (?, ?)", (scene_id, json.dumps(outcome, default=str)))

    def scene_outcome(self, scene_id: str) -> dict | None:
        row = self._db.execute("select outcome from scenes where scene_id = ?", (scene_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        self._db.close()
