"""The run: plan scenes and tiles, infer on Ray, stitch, vectorise and catalogue.

Job-level problems (unknown model, a prompt the model cannot answer) raise before anything is written.
Scene- and tile-level problems are recorded as data and the rest of the job goes on; the summary's
``failed`` says whether anything was lost. Progress is recorded in the run ledger as it happens, so a
rerun after a crash (or of a finished job) does only what is left; the catalog tables are rebuilt from
the ledger and the staged per-scene objects at the end of every invocation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dask
import geopandas as gpd
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import shapely
from rasterio.windows import bounds as window_bounds

from geobatch import catalog
from geobatch.access import Access
from geobatch.errors import GeobatchError, JobSpecError
from geobatch.identity import scene_identity
from geobatch.infer import PoolReport, TileOutcome, TileWork, inference_settings, run_tiles
from geobatch.instances import merge_instances
from geobatch.jobs import JobSpec
from geobatch.ledger import JobLock, Ledger, job_fingerprint, product_key
from geobatch.models.base import ObjectKind, Prompt, load_model, objects_of
from geobatch.regions import make_region
from geobatch.scenes import Region, Scene, SceneFailure, SceneLike, discover, open_scene
from geobatch.stitch import Mosaic, compute_overviews, create_mosaic, overview_factors
from geobatch.tiling import TileGrid, plan_tiles
from geobatch.vectorize import vectorize

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SceneOutcome:
    """What became of one scene: ``done``, ``partial`` (some tiles failed), ``failed`` or ``skipped`` (all nodata)."""

    scene_id: str
    uri: str
    status: str
    reason: str | None = None
    tiles_done: int = 0
    tiles_failed: int = 0
    tiles_skipped: int = 0
    objects: int = 0
    mosaic: str | None = None


@dataclass(frozen=True)
class RunSummary:
    """The numbers and paths a run ends with."""

    run_id: str
    job: str
    output: Path
    seconds: float
    scenes: tuple[SceneOutcome, ...]
    objects_per_label: dict[str, int]
    failed_tiles: tuple[TileOutcome, ...] = ()
    tables: dict[str, Path] = field(default_factory=dict)
    tiles_inferred: int = 0  # tiles sent to the model by this invocation (not those finished before it)
    resumed: bool = False
    phase_seconds: dict[str, float] = field(default_factory=dict)  # inference; vectorising, overviews, catalog
    unchanged: int = 0  # scenes an earlier run processed, unchanged since: not part of this run
    report: Path | None = None  # the run's HTML report (reports/<run_id>/index.html)
    prompts_outside: tuple[str, ...] = ()  # ids of vector prompt features that reach no scene of the job
    prompts_without_object: tuple[str, ...] = ()  # features inside a scene with no catalogued object

    @property
    def failed(self) -> bool:
        """True when any scene or tile failed (nodata that was skipped is not a failure)."""
        return any(s.status in ("partial", "failed") for s in self.scenes)

    @property
    def tiles(self) -> Counter:
        return Counter(
            {
                "done": sum(s.tiles_done for s in self.scenes),
                "skipped": sum(s.tiles_skipped for s in self.scenes),
                "failed": sum(s.tiles_failed for s in self.scenes),
            }
        )


def run_job(
    spec: JobSpec,
    on_tile: Callable[[TileOutcome], None] | None = None,
    total_tiles: Callable[[int, int], None] | None = None,
    wait: bool = False,
) -> RunSummary:
    """Run ``spec`` end to end, resuming the run recorded in its output folder if there is one.

    Scenes an earlier run of the job processed, and whose files are unchanged, are left alone; a run that
    ended is followed by a new run id when anything is new. Only one run of a job works in its output
    folder at a time: if another holds the lock this raises :class:`JobLocked`, or waits with ``wait``.
    ``total_tiles(total, already_finished)`` is called once the plan is known; ``on_tile`` for each tile
    outcome as it arrives. Raises :class:`GeobatchError` only for problems with the job itself.
    """
    started = time.perf_counter()
    prompts = [Prompt(p.text, p.kind, p.label) for p in spec.prompts]
    model = load_model(spec.model.name, spec.model.backend_options)
    if (
        objects_of(model) == "instances" and spec.tiling.overlap == 0
    ):  # views of one instance are matched on the overlap
        raise JobSpecError(f"job '{spec.name}': tiling.overlap must be > 0 for '{spec.model.name}', an instance model")
    bands = model.required_bands(prompts)
    access = Access.from_spec(spec.storage)
    with JobLock.acquire(spec.output, wait=wait):
        return _run_locked(spec, started, prompts, model, bands, access, on_tile, total_tiles)


def _run_locked(spec, started, prompts, model, bands, access, on_tile, total_tiles) -> RunSummary:
    """The run, once the job's lock is held (see :func:`run_job`)."""
    ledger = Ledger.open(spec.output, job_fingerprint(spec))
    scenes, failures = _open_scenes(spec, bands, model.input_values, access)
    outside = _prompts_outside(model, scenes)
    scenes, identities, unchanged = _increment(ledger, product_key(spec), scenes, access)
    if spec.region and scenes:  # a region is composited from all its sources: one new or changed redoes it
        scenes, unchanged = scenes + unchanged, []
    region = make_region(spec.region, scenes) if spec.region and scenes else None
    sources, scenes = (scenes, [region]) if region else ([], scenes)  # a region is one mosaic of its sources
    grid = TileGrid(spec.tiling.core, spec.tiling.overlap)
    labels = [p.label for p in prompts]
    mosaic_dir = spec.output / "mosaics"
    finished = {s.scene_id: outcome for s in scenes if (outcome := _finished(ledger, s, mosaic_dir))}
    active = [s for s in scenes if s.scene_id not in finished]
    mosaics = {
        s.scene_id: _staged_mosaic(s, grid, labels, mosaic_dir, ledger.resumed, objects_of(model)) for s in active
    }
    skip = ledger.finished_tiles(s.scene_id for s in active)
    if total_tiles:
        count = {s.scene_id: math.prod(grid.layout(s.shape)) for s in scenes}
        total_tiles(sum(count.values()), sum(count[s] for s in finished) + len(skip))
    work = (
        TileWork(s.reaching(t.read_window) if isinstance(s, Region) else s, t, mosaics[s.scene_id])
        for s in active
        for t in plan_tiles(s.scene_id, s.shape, grid)
        if t.tile_id not in skip
    )
    report = None
    with _ray_session(spec.ray.address) if active else contextlib.nullcontext():
        if active:
            settings = inference_settings(model, spec.ray.num_actors, spec.ray.batch_size, spec.ray.max_retries)
            report = PoolReport(settings, [])
            for outcome in run_tiles(work, spec.model, prompts, bands, access, settings, report):
                ledger.record_tile(outcome)  # durable before anything else looks at it
                if on_tile:
                    on_tile(outcome)
        from ray.util.dask import ray_dask_get  # imported while Ray started, if it started here

        finishing = time.perf_counter()
        with dask.config.set(scheduler=ray_dask_get):
            for scene in active:
                catalog.supersede_scene_objects(spec.output, scene.scene_id, ledger.run_id)
                finished[scene.scene_id] = _finish_scene(scene, mosaics[scene.scene_id], grid, ledger, spec, prompts)
        finishing = time.perf_counter() - finishing

    for scene in sources or scenes:  # again for scenes finished by an invocation that stopped before recording this
        outcome = finished[region.scene_id if region else scene.scene_id]
        ledger.record_processed(product_key(spec), scene.scene_id, identities[scene.scene_id], outcome)
    scene_outcomes = [finished[s.scene_id] for s in scenes]
    if region:
        scene_outcomes += _source_outcomes(sources, region, finished[region.scene_id])
    scene_outcomes += [SceneOutcome(f.scene_id, f.uri, "failed", f.reason) for f in failures]
    failed_tiles = [o for s in scenes for o in ledger.tile_outcomes(s.scene_id).values() if o.status == "failed"]
    tables = {
        "objects": spec.output / "catalog" / "objects",
        "scenes": catalog.write_run_table(
            spec.output, "scenes", _scene_table([*scenes, *sources], scene_outcomes, ledger.run_id), ledger.run_id
        ),
        "tiles": catalog.write_run_table(spec.output, "tiles", _tile_table(scenes, grid, ledger), ledger.run_id),
    }
    summary = RunSummary(
        run_id=ledger.run_id,
        job=spec.name,
        output=spec.output,
        seconds=time.perf_counter() - started,
        scenes=tuple(scene_outcomes),
        objects_per_label=_label_counts(spec.output, ledger.run_id),
        failed_tiles=tuple(failed_tiles),
        tables=tables,
        tiles_inferred=report.tiles if report else 0,
        resumed=ledger.resumed,
        phase_seconds={"inference": report.seconds if report else 0.0, "vectorize_and_catalog": finishing},
        unchanged=len(unchanged),
        prompts_outside=outside,
        prompts_without_object=_prompts_without_object(model, spec.output, outside),
    )
    _write_summary_file(ledger.folder / "summary.json", summary, report)
    ledger.end_run("failed" if summary.failed else "ok")
    summary = dataclasses.replace(summary, report=_write_report(spec.output, ledger.run_id))
    ledger.close()
    return summary


def _prompts_outside(model, scenes: list[Scene]) -> tuple[str, ...]:
    """Ids of the model's vector prompt features that reach none of the job's scenes: reported, never lost."""
    outside = getattr(model, "prompts_outside", None)
    ids = tuple(outside([scene.geobox for scene in scenes])) if outside else ()
    for feature_id in ids:
        log.warning("prompt feature %s is outside every scene of the job", feature_id)
    return ids


def _prompts_without_object(model, output: Path, outside: tuple[str, ...]) -> tuple[str, ...]:
    """Ids of the model's vector prompt features inside a scene that have no object in the catalog (an empty
    mask, or only nodata or failed tiles under them), from the catalog's ``prompt_id`` columns."""
    ids = getattr(model, "prompt_ids", ())
    if not ids:
        return ()
    answered = set(outside)
    for path in (output / "catalog" / "objects").glob("*/*/*.parquet"):
        if "prompt_id" in pq.read_schema(path).names:
            answered.update(pq.read_table(path, columns=["prompt_id"]).column(0).to_pylist())
    missing = tuple(feature_id for feature_id in ids if feature_id not in answered)
    for feature_id in missing:
        log.warning("prompt feature %s lies in a scene but got no object", feature_id)
    return missing


def _write_report(output: Path, run_id: str) -> Path | None:
    """The run's HTML report; a report that cannot be written is logged, it never fails the run."""
    from geobatch.run_report import write_report

    try:
        return write_report(output, run_id)
    except Exception:
        log.exception("could not write the report of run %s; `geobatch report %s %s` retries", run_id, output, run_id)
        return None


def _increment(ledger: Ledger, product: str, scenes: list[Scene], access: Access):
    """Split the scenes into this run's and those an earlier run processed with the same files.

    Starts the next run when the recorded one ended and anything is new, changed or unfinished; forgets
    the staged work of a scene whose files changed while this run was interrupted. Returns this run's
    scenes, every scene's identity, and the unchanged scenes.
    """
    identities = {s.scene_id: scene_identity(s, access) for s in scenes}
    processed = ledger.processed(product)

    def current(scene: Scene) -> bool:
        return scene.scene_id in processed and processed[scene.scene_id].current(identities[scene.scene_id])

    if ledger.ended and not all(current(s) for s in scenes):
        ledger.start_next_run()
    mine = [s for s in scenes if not current(s) or processed[s.scene_id].run_id == ledger.run_id]
    for scene in mine:
        if ledger.stage(scene.scene_id, identities[scene.scene_id]):  # True: staged earlier with other files
            log.info("scene %s changed while the run was stopped; starting it again", scene.scene_id)
            shutil.rmtree(ledger.folder.parent / "mosaics" / f"{scene.scene_id}.zarr.partial", ignore_errors=True)
    ours = {s.scene_id for s in mine}
    return mine, identities, [s for s in scenes if s.scene_id not in ours]


def _open_scenes(
    spec: JobSpec, bands: tuple[str, ...], values: str, access: Access
) -> tuple[list[Scene], list[SceneFailure]]:
    """Every scene the job names, opened; those that cannot be used become failures with the reason."""
    refs, failures = discover(spec)
    scenes: list[Scene] = []
    for ref in refs:
        try:
            scenes.append(open_scene(ref, bands, values=values, resolution=spec.resolution, access=access))
        except GeobatchError as exc:  # the message names the scene; the reason need not repeat it
            failures.append(SceneFailure(ref.scene_id, ref.uri, str(exc).removeprefix(f"scene {ref.uri}: ")))
    for failure in failures:
        log.info("scene %s failed: %s", failure.scene_id, failure.reason)
    return scenes, failures


# What Ray workers run with (a local Ray's, and those of ray-cluster.yaml and cluster/Dockerfile). A worker
# runs one task at a time on its CPU: zarr's own pool of CPUs + 4 codec threads gained nothing, and glibc's
# malloc arena per thread (Ray's, zarr's) kept what each task freed: idle workers grew from 0.2 to 0.3 GiB.
WORKER_ENVIRONMENT = {"ZARR_THREADING__MAX_WORKERS": "1", "MALLOC_ARENA_MAX": "1"}


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """Use the running Ray if there is one; otherwise start (or join, with ``address`` / RAY_ADDRESS) one.

    A Ray started here stops before the run writes its tables and report. Not beside them, on a thread:
    an object reference freed by the run while Ray stopped ended the process (3 of 22 runs at 20 000²).
    """
    if ray.is_initialized():
        yield
        return
    for name, value in WORKER_ENVIRONMENT.items():  # a local Ray's workers inherit it
        os.environ.setdefault(name, value)
    # ray.init mostly waits for Ray's processes: meanwhile Dask-on-Ray is imported (0.7 s: Dask's dataframes)
    importing = threading.Thread(target=importlib.import_module, args=("ray.util.dask",), name="import-dask-on-ray")
    importing.start()
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    importing.join()
    try:
        yield
    finally:
        ray.shutdown()


def _source_outcomes(sources: list[Scene], region: Region, outcome: SceneOutcome) -> list[SceneOutcome]:
    """The region's scenes, in job order: each shares the region's fate, or is skipped if it misses it."""
    inside = {s.scene.scene_id for s in region.sources}
    composited, missed = f"composited into region '{region.scene_id}'", f"outside region '{region.scene_id}'"
    return [
        SceneOutcome(s.scene_id, s.uri, outcome.status, composited, mosaic=outcome.mosaic)
        if s.scene_id in inside
        else SceneOutcome(s.scene_id, s.uri, "skipped", missed)
        for s in sources
    ]


def _finished(ledger: Ledger, scene: SceneLike, mosaic_dir: Path) -> SceneOutcome | None:
    """The outcome of a scene an earlier invocation of this run completed, if nothing is left to do for it."""
    recorded = ledger.scene_outcome(scene.scene_id)
    if recorded is None or recorded["status"] not in ("done", "skipped"):
        return None  # never finished, or has failed tiles to try again
    outcome = SceneOutcome(**recorded)
    if outcome.objects and not catalog.run_object_files(ledger.folder.parent, ledger.run_id, scene.scene_id):
        return None
    _publish(mosaic_dir, scene.scene_id)  # in case the run stopped between recording and moving
    return outcome


def _staged_mosaic(
    scene: SceneLike, grid: TileGrid, labels: list[str], mosaic_dir: Path, resume: bool, objects: ObjectKind
) -> Mosaic:
    """The scene's ``.zarr.partial`` mosaic: kept when resuming (its chunks are finished tiles), else new."""
    partial, final = mosaic_dir / f"{scene.scene_id}.zarr.partial", mosaic_dir / f"{scene.scene_id}.zarr"
    if resume and final.exists() and not partial.exists():
        final.rename(partial)  # published with failed tiles: reopened to add the retried ones
    return create_mosaic(scene, grid, labels, partial, keep_existing=resume, objects=objects)


def _publish(mosaic_dir: Path, scene_id: str) -> None:
    partial, final = mosaic_dir / f"{scene_id}.zarr.partial", mosaic_dir / f"{scene_id}.zarr"
    if partial.exists():
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)


def _finish_scene(
    scene: SceneLike, mosaic: Mosaic, grid: TileGrid, ledger: Ledger, spec: JobSpec, prompts: list[Prompt]
) -> SceneOutcome:
    """Vectorise a scene whose tiles are all processed, stage its objects, and move its mosaic into place.

    The objects go into the catalog and the ledger records the scene before the mosaic moves, so a run
    killed in between finishes the move.
    """
    outcomes = ledger.tile_outcomes(scene.scene_id)
    statuses = Counter(o.status for o in outcomes.values())
    counts = (statuses["done"], statuses["failed"], statuses["skipped"])
    failed = next((o.reason for o in outcomes.values() if o.status == "failed"), None)
    mosaic_dir = Path(mosaic.path).parent
    if not statuses["done"]:
        shutil.rmtree(mosaic.path, ignore_errors=True)
        status, reason = (
            ("failed", f"{statuses['failed']} tile(s) failed; first: {failed}")
            if failed
            else ("skipped", f"no valid pixels: all {len(outcomes)} tiles are nodata")
        )
        outcome = SceneOutcome(scene.scene_id, scene.uri, status, reason, *counts)
        ledger.record_scene(scene.scene_id, dataclasses.asdict(outcome))
        return outcome
    overviews = overview_factors(mosaic)  # declared with the mosaic
    if mosaic.objects == "instances":
        found, remaining = [catalog.geoparquet_table(merge_instances(mosaic, scene, grid))], overviews
    else:  # vectorising writes the first overview level from the pixels it reads anyway
        found, remaining = vectorize(mosaic, scene, overview=bool(overviews)), overviews[1:]
    batches = (_catalogue_objects(rows, scene, spec, ledger.run_id, prompts) for rows in found)
    files = catalog.write_scene_objects(spec.output, batches, ledger.run_id, scene.scene_id)
    compute_overviews(mosaic, remaining)  # after the catalog: beside the driver's writing, it added to the peak
    status, reason = ("partial", f"{statuses['failed']} tile(s) failed; first: {failed}") if failed else ("done", None)
    final = str(mosaic_dir / f"{scene.scene_id}.zarr")
    objects = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    outcome = SceneOutcome(scene.scene_id, scene.uri, status, reason, *counts, objects, final)
    ledger.record_scene(scene.scene_id, dataclasses.asdict(outcome))
    _publish(mosaic_dir, scene.scene_id)
    return outcome


def _catalogue_objects(rows: pa.Table, scene: SceneLike, spec: JobSpec, run_id: str, prompts: list[Prompt]) -> pa.Table:
    """A batch of a scene's objects with every catalog column."""
    phrases = {p.label: p.text for p in prompts}
    return catalog.scene_object_columns(rows, scene.scene_id, scene.acquired_at, run_id, spec.model.name, phrases)


def _label_counts(output: Path, run_id: str) -> dict[str, int]:
    """Objects per label in the run's files (from the files' metadata: no rows are read)."""
    counts: Counter[str] = Counter()
    for path in catalog.run_object_files(output, run_id):
        counts[path.parent.parent.name] += pq.ParquetFile(path).metadata.num_rows
    return dict(counts)


def _scene_table(scenes: list[SceneLike], outcomes: list[SceneOutcome], run_id: str) -> gpd.GeoDataFrame:
    extents = gpd.GeoSeries([s.geobox.extent.to_crs("epsg:4326").geom for s in scenes], crs=4326)
    footprints = dict(zip([s.scene_id for s in scenes], extents))
    acquired = {s.scene_id: s.acquired_at for s in scenes}
    rows = [
        {
            "scene_id": o.scene_id,
            "uri": o.uri,
            "status": o.status,
            "reason": o.reason,
            "tiles_done": o.tiles_done,
            "tiles_failed": o.tiles_failed,
            "tiles_skipped": o.tiles_skipped,
            "objects": o.objects,
            "mosaic": o.mosaic,
            "acquired_at": acquired.get(o.scene_id),
            "run_id": run_id,
            "geometry": footprints.get(o.scene_id),
        }
        for o in outcomes
    ]
    frame = gpd.GeoDataFrame(rows, geometry="geometry", crs=4326)
    frame["acquired_at"] = pd.to_datetime(frame["acquired_at"], utc=True)
    return frame


def _tile_table(scenes: list[SceneLike], grid: TileGrid, ledger: Ledger) -> gpd.GeoDataFrame:
    frames = []
    for scene in scenes:
        outcomes = ledger.tile_outcomes(scene.scene_id)
        tiles = [t for t in plan_tiles(scene.scene_id, scene.shape, grid) if t.tile_id in outcomes]
        rows = [outcomes[t.tile_id] for t in tiles]
        cores = [shapely.box(*window_bounds(t.core_window, scene.geobox.affine)) for t in tiles]
        frames.append(
            gpd.GeoDataFrame(
                {
                    "tile_id": [t.tile_id for t in tiles],
                    "scene_id": scene.scene_id,
                    "row": [t.row for t in tiles],
                    "col": [t.col for t in tiles],
                    "status": [o.status for o in rows],
                    "reason": [o.reason for o in rows],
                    "labelled_pixels": [o.labelled_pixels for o in rows],
                    "worker": [o.worker for o in rows],
                    "caption": [o.caption for o in rows],
                    "run_id": ledger.run_id,
                },
                geometry=gpd.GeoSeries(cores, crs=scene.geobox.crs.wkt).to_crs(4326),
            )
        )
    empty = gpd.GeoDataFrame({"tile_id": [], "scene_id": [], "status": [], "reason": []}, geometry=[], crs=4326)
    return pd.concat(frames, ignore_index=True) if frames else empty


def _write_summary_file(path: Path, summary: RunSummary, report: PoolReport | None) -> None:
    """The run's numbers as JSON: outcomes, and how busy the model actors were."""
    inference = None
    if report:
        inference = {
            **dataclasses.asdict(report.settings),
            "tiles": report.tiles,
            "seconds": round(report.seconds, 3),
            "tiles_per_s": round(report.tiles_per_s, 3),
            "mean_batches_in_flight": round(report.mean_batches_in_flight, 2),
            "workers": [{**dataclasses.asdict(w), "busy_fraction": round(w.busy_fraction, 4)} for w in report.workers],
        }
    document = {
        "run_id": summary.run_id,
        "job": summary.job,
        "resumed": summary.resumed,
        "seconds": round(summary.seconds, 3),
        "phase_seconds": {name: round(seconds, 3) for name, seconds in summary.phase_seconds.items()},
        "tiles": dict(summary.tiles),
        "tiles_inferred": summary.tiles_inferred,
        "unchanged": summary.unchanged,
        "scenes": [dataclasses.asdict(s) for s in summary.scenes],
        "objects_per_label": summary.objects_per_label,
        "prompts_outside": list(summary.prompts_outside),
        "prompts_without_object": list(summary.prompts_without_object),
        "inference": inference,
    }
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(document, indent=2, default=str))
    os.replace(partial, path)
