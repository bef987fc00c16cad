"""The run ledger: what a run has finished, kept durably so that a killed run resumes where it stopped,
and which scenes earlier runs finished, so that a nightly run does only what is new.

One SQLite file per output folder (``run/ledger.sqlite``) records the current run's id, a fingerprint of
the job parts that decide the outputs, every tile's outcome as soon as it arrives, and every scene once it
is vectorised (its objects written to the catalog under the run's id). Tile pixels themselves are already
durable: each tile writes its chunk of the scene's ``.zarr.partial`` mosaic before its outcome returns.

A rerun of the same job in the same folder continues the same run: finished (``done``/``skipped``) tiles
and vectorised scenes are not redone; ``failed`` tiles are tried again. A changed job starts afresh.

Across runs the ledger keeps ``processed``: per *product key* (model, options, prompts, bands, grid:
the fingerprint without the scene list) and scene, the file identity the scene had (size and mtime, or
ETag) and the run whose objects are in the catalog. A run that ended is followed by a new run (a new run
id) as soon as a scene is new, changed or unfinished; scenes already processed with the same identity are
left alone. ``runs`` lists every run with its start, end and outcome. The ``lock`` row (see
:class:`JobLock`) lets one run of the job work in the folder at a time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from geobatch.errors import GeobatchError
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
create table if not exists staged (scene_id text primary key, identity text not null);
"""
_HISTORY = """
create table if not exists runs (
    run_id text primary key, fingerprint text not null, started_at text not null, ended_at text, outcome text
);
create table if not exists processed (
    product text not null, scene_id text not null, identity text not null, run_id text not null,
    status text not null, objects integer not null, finished_at text not null, primary key (product, scene_id)
);
create table if not exists lock (
    id integer primary key check (id = 1), token text not null, pid integer not null, host text not null,
    started_at real not null, heartbeat real not null
);
"""


def job_fingerprint(spec: JobSpec) -> str:
    """A hash of what decides the outputs (scenes, bands, grid, model, prompts), not of where or how fast."""
    decisive = spec.model_dump(mode="json", include={"scenes", "prompts", "model", "bands", "resolution", "tiling"})
    if spec.region:  # added only when set, so that the runs of jobs without one still resume
        decisive["region"] = spec.region.model_dump(mode="json")
    decisive["ledger"] = LEDGER_VERSION  # a ledger of another layout cannot be resumed
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def product_key(spec: JobSpec) -> str:
    """A hash of what decides a scene's outputs apart from the scene itself: model and options, prompts,
    bands, resolution, tiling. Scenes processed under the same key are not processed again."""
    decisive = spec.model_dump(mode="json", include={"prompts", "model", "bands", "resolution", "tiling"})
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Processed:
    """The last run that processed a scene (under one product key), and the scene's identity then."""

    scene_id: str
    identity: str
    run_id: str
    status: str
    objects: int

    def current(self, identity: str) -> bool:
        """True when this record covers a scene with ``identity``: finished, and its files unchanged."""
        return self.status in ("done", "skipped") and self.identity == identity


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
        db.executescript(_SCHEMA + _HISTORY)
        recorded = dict(db.execute("select key, value from run"))
        if recorded.get("fingerprint") == fingerprint:
            log.info("resuming run %s in %s", recorded["run_id"], output)
            return cls(folder, db, recorded["run_id"], resumed=True)
        if recorded:
            log.warning("the job changed since run %s in %s; starting a new run", recorded["run_id"], output)
            db.executescript("drop table run; drop table tiles; drop table scenes; drop table staged;" + _SCHEMA)
            for partial in (output / "mosaics").glob("*.zarr.partial"):
                shutil.rmtree(partial)
        ledger = cls(folder, db, "", resumed=False)
        ledger._start(fingerprint)
        return ledger

    def _start(self, fingerprint: str) -> None:
        self.run_id = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        self.resumed = False
        self._db.executemany(
            "insert or replace into run values (?, ?)", [("run_id", self.run_id), ("fingerprint", fingerprint)]
        )
        self._db.execute(
            "insert into runs (run_id, fingerprint, started_at) values (?, ?, ?)", (self.run_id, fingerprint, _now())
        )

    @property
    def ended(self) -> bool:
        """True when the current run reached its end (even with failed scenes)."""
        row = self._db.execute("select ended_at from runs where run_id = ?", (self.run_id,)).fetchone()
        return bool(row and row[0])

    def start_next_run(self) -> None:
        """Begin a new run of the same job after an ended one: the per-run tile and scene records start empty,
        ``processed`` stays."""
        fingerprint = dict(self._db.execute("select key, value from run"))["fingerprint"]
        self._db.executescript("begin; delete from tiles; delete from scenes; delete from staged; commit;")
        for partial in (self.folder.parent / "mosaics").glob("*.zarr.partial"):
            shutil.rmtree(partial)
        self._start(fingerprint)
        log.info("starting run %s: new or changed scenes since the last run", self.run_id)

    def end_run(self, outcome: str) -> None:
        self._db.execute("update runs set ended_at = ?, outcome = ? where run_id = ?", (_now(), outcome, self.run_id))

    def runs(self) -> list[dict]:
        """Every run recorded in this folder, oldest first."""
        rows = self._db.execute("select run_id, fingerprint, started_at, ended_at, outcome from runs order by rowid")
        return [dict(zip(("run_id", "fingerprint", "started_at", "ended_at", "outcome"), r)) for r in rows]

    def processed(self, product: str) -> dict[str, Processed]:
        """Scene id -> the last run that processed it under ``product``."""
        rows = self._db.execute(
            "select scene_id, identity, run_id, status, objects from processed where product = ?", (product,)
        )
        return {row[0]: Processed(*row) for row in rows}

    def record_processed(self, product: str, scene_id: str, identity: str, outcome) -> None:
        """This run processed ``scene_id`` (a ``SceneOutcome``) when its files had ``identity``."""
        self._db.execute(
            "insert or replace into processed values (?, ?, ?, ?, ?, ?, ?)",
            (product, scene_id, identity, self.run_id, outcome.status, outcome.objects, _now()),
        )

    def stage(self, scene_id: str, identity: str) -> bool:
        """Note that this run works on ``scene_id`` with files of ``identity``. If the run staged it before
        with other files, its tiles and outcome are dropped (they came from the old files): returns True."""
        row = self._db.execute("select identity from staged where scene_id = ?", (scene_id,)).fetchone()
        if row and row[0] == identity:
            return False
        self._db.execute("begin")
        self._db.execute("delete from tiles where scene_id = ?", (scene_id,))
        self._db.execute("delete from scenes where scene_id = ?", (scene_id,))
        self._db.execute("insert or replace into staged values (?, ?)", (scene_id, identity))
        self._db.execute("commit")
        return row is not None

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


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class JobLocked(GeobatchError, RuntimeError):
    """Another run of the same job holds the lock of its output folder."""


class JobLock:
    """One run of a job at a time: a row in the ledger's ``lock`` table (pid, host, start, heartbeat).

    Taken in an immediate transaction, so two runs starting together cannot both get it. The holder
    refreshes ``heartbeat`` every ``heartbeat_s`` from a daemon thread. A lock is *stale*, and is taken
    over with a warning, when its process is gone (same host, pid not alive) or its heartbeat is older
    than ``stale_after_s`` (any host: a crashed machine). Use :meth:`acquire` as a context manager.
    """

    def __init__(self, path: Path, token: str, heartbeat_s: float) -> None:
        self.path = path
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="geobatch-lock", daemon=True)

    @classmethod
    def acquire(
        cls,
        output: Path,
        wait: bool = False,
        timeout_s: float | None = None,
        stale_after_s: float = 600.0,
        heartbeat_s: float = 30.0,
        poll_s: float = 1.0,
    ) -> JobLock:
        """Take the lock of ``output``'s ledger, or raise :class:`JobLocked` naming the holder.

        With ``wait`` it polls every ``poll_s`` until the holder releases it (or ``timeout_s`` passes).
        """
        folder = Path(output) / "run"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "ledger.sqlite"
        token = uuid.uuid4().hex
        started = time.monotonic()
        first = True
        while True:
            holder = _try_lock(path, token, stale_after_s)
            if holder is None:
                lock = cls(path, token, heartbeat_s)
                lock._thread.start()
                return lock
            waited = time.monotonic() - started
            if wait and first:
                log.warning(
                    "another run of this job holds %s (pid %s on %s); waiting", output, holder["pid"], holder["host"]
                )
            if not wait or (timeout_s is not None and waited >= timeout_s):
                raise JobLocked(
                    f"another run of this job is running in {output} (pid {holder['pid']} on {holder['host']}, "
                    f"since {dt.datetime.fromtimestamp(holder['started_at'], dt.UTC):%Y-%m-%d %H:%M:%S} UTC); "
                    + ("gave up waiting" if wait else "try again later, or pass --wait to wait for it")
                )
            first = False
            time.sleep(poll_s)

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            with contextlib.closing(_connect(self.path)) as db:
                db.execute("update lock set heartbeat = ? where token = ?", (time.time(), self.token))

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.closing(_connect(self.path)) as db:
            db.execute("delete from lock where token = ?", (self.token,))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    db.execute("pragma journal_mode=wal")
    db.executescript(_HISTORY)
    return db


def _try_lock(path: Path, token: str, stale_after_s: float) -> dict | None:
    """Take the lock if it is free or stale; otherwise return its holder."""
    host, pid = socket.gethostname(), os.getpid()
    with contextlib.closing(_connect(path)) as db:
        db.execute("begin immediate")  # one writer: the check and the take are one step
        try:
            row = db.execute("select pid, host, started_at, heartbeat from lock").fetchone()
            if row is not None:
                holder = dict(zip(("pid", "host", "started_at", "heartbeat"), row))
                stale = _stale(holder, host, stale_after_s)
                if not stale:
                    return holder
                log.warning("taking over the lock of a run that is gone (pid %s on %s): %s", row[0], row[1], stale)
            now = time.time()
            db.execute("insert or replace into lock values (1, ?, ?, ?, ?, ?)", (token, pid, host, now, now))
            return None
        finally:
            db.execute("commit")


def _stale(holder: dict, host: str, stale_after_s: float) -> str | None:
    """Why the holder is gone, or None if it may still be running."""
    if holder["host"] == host and not _alive(holder["pid"]):
        return "its process no longer exists"
    age = time.time() - holder["heartbeat"]
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
