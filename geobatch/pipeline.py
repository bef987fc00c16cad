"""The run: plan scenes and tiles, infer on Ray, stitch, vectorise and catalogue.

Job-level problems (unknown model, a prompt the model cannot answer) raise before anything is written.
Scene- and tile-level problems are recorded as data and the rest of the job goes on; the summary's
``failed`` says whether anything was lost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dask
import geopandas as gpd
import pandas as pd
import ray
import shapely
from rasterio.windows import bounds as window_bounds
from ray.util.dask import ray_dask_get

from geobatch import catalog
from geobatch.access import Access
from geobatch.errors import GeobatchError
from geobatch.infer import TileOutcome, TileWork, run_tiles
from geobatch.jobs import JobSpec
from geobatch.models.base import Prompt, load_model
from geobatch.scenes import Scene, SceneFailure, discover, open_scene
from geobatch.stitch import Mosaic, create_mosaic
from geobatch.tiling import Tile, TileGrid, plan_tiles
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
    total_tiles: Callable[[int], None] | None = None,
) -> RunSummary:
    """Run ``spec`` end to end. Raises :class:`GeobatchError` only for problems with the job itself."""
    started = time.perf_counter()
    run_id = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    prompts = [Prompt(p.text, p.kind, p.label) for p in spec.prompts]
    model = load_model(spec.model.name, spec.model.options)
    bands = model.required_bands(prompts)
    access = Access.from_spec(spec.storage)
    refs, failures = discover(spec)
    scenes: list[Scene] = []
    for ref in refs:
        try:
            scenes.append(open_scene(ref, bands, values=model.input_values, resolution=spec.resolution, access=access))
        except GeobatchError as exc:  # the message names the scene; the reason need not repeat it
            failures.append(SceneFailure(ref.scene_id, ref.uri, str(exc).removeprefix(f"scene {ref.uri}: ")))
    for failure in failures:
        log.info("scene %s failed: %s", failure.scene_id, failure.reason)

    grid = TileGrid(spec.tiling.core, spec.tiling.overlap)
    labels = [p.label for p in prompts]
    mosaic_dir = spec.output / "mosaics"
    mosaics = {s.scene_id: create_mosaic(s, grid, labels, mosaic_dir / f"{s.scene_id}.zarr.partial") for s in scenes}
    tiles = {s.scene_id: list(plan_tiles(s.scene_id, s.shape, grid)) for s in scenes}
    work = [TileWork(s, t, mosaics[s.scene_id]) for s in scenes for t in tiles[s.scene_id]]
    if total_tiles:
        total_tiles(len(work))

    outcomes: dict[str, TileOutcome] = {}
    with _ray_session(spec.ray.address) if work else contextlib.nullcontext():
        for outcome in run_tiles(work, spec.model, prompts, bands, access, spec.ray.num_actors):
            outcomes[outcome.tile_id] = outcome
            if on_tile:
                on_tile(outcome)
        with dask.config.set(scheduler=ray_dask_get):
            results = [_finish_scene(s, mosaics[s.scene_id], tiles[s.scene_id], outcomes, mosaic_dir) for s in scenes]

    scene_outcomes = [r[0] for r in results] + [SceneOutcome(f.scene_id, f.uri, "failed", f.reason) for f in failures]
    objects = _object_table([r[1] for r in results], spec, run_id, {p.label: p.text for p in prompts}, scenes)
    tables = {
        "objects": catalog.write_table(spec.output, "objects", objects),
        "scenes": catalog.write_table(spec.output, "scenes", _scene_table(scenes, scene_outcomes, run_id)),
        "tiles": catalog.write_table(spec.output, "tiles", _tile_table(scenes, tiles, outcomes, run_id)),
    }
    return RunSummary(
        run_id=run_id,
        job=spec.name,
        output=spec.output,
        seconds=time.perf_counter() - started,
        scenes=tuple(scene_outcomes),
        objects_per_label=dict(Counter(objects["label"])),
        failed_tiles=tuple(o for o in outcomes.values() if o.status == "failed"),
        tables=tables,
    )


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """Use the running Ray if there is one; otherwise start (or join, with ``address`` / RAY_ADDRESS) one."""
    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _finish_scene(
    scene: Scene, mosaic: Mosaic, tiles: list[Tile], outcomes: dict[str, TileOutcome], mosaic_dir: Path
) -> tuple[SceneOutcome, gpd.GeoDataFrame | None]:
    """Vectorise a scene whose tiles are all processed and move its mosaic into place."""
    statuses = Counter(outcomes[t.tile_id].status for t in tiles)
    counts = (statuses["done"], statuses["failed"], statuses["skipped"])
    failed = next((outcomes[t.tile_id].reason for t in tiles if outcomes[t.tile_id].status == "failed"), None)
    if not statuses["done"]:
        shutil.rmtree(mosaic.path, ignore_errors=True)
        status, reason = (
            ("failed", f"{statuses['failed']} tile(s) failed; first: {failed}")
            if failed
            else ("skipped", f"no valid pixels: all {len(tiles)} tiles are nodata")
        )
        return SceneOutcome(scene.scene_id, scene.uri, status, reason, *counts), None
    objects = vectorize(mosaic, scene)
    final = mosaic_dir / f"{scene.scene_id}.zarr"
    shutil.rmtree(final, ignore_errors=True)
    Path(mosaic.path).rename(final)
    status, reason = ("partial", f"{statuses['failed']} tile(s) failed; first: {failed}") if failed else ("done", None)
    return SceneOutcome(scene.scene_id, scene.uri, status, reason, *counts, len(objects), str(final)), objects


def _object_table(
    frames: list[gpd.GeoDataFrame | None], spec: JobSpec, run_id: str, phrases: dict[str, str], scenes: list[Scene]
) -> gpd.GeoDataFrame:
    acquired = {s.scene_id: s.acquired_at for s in scenes}
    parts = [frame.assign(scene_id=scene.scene_id) for scene, frame in zip(scenes, frames) if frame is not None]
    if not parts:  # no scene got as far as vectorising; the table still gets every column
        parts = [gpd.GeoDataFrame(columns=[*catalog.OBJECT_COLUMNS, "geometry"], geometry="geometry", crs=4326)]
    objects = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), geometry="geometry", crs=4326)
    objects["phrase"] = objects["label"].map(phrases)
    objects["acquired_at"] = pd.to_datetime(objects["scene_id"].map(acquired), utc=True)
    objects["run_id"] = run_id
    objects["model"] = spec.model.name
    return objects[[*catalog.OBJECT_COLUMNS, "geometry"]]


def _scene_table(scenes: list[Scene], outcomes: list[SceneOutcome], run_id: str) -> gpd.GeoDataFrame:
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


def _tile_table(
    scenes: list[Scene], tiles: dict[str, list[Tile]], outcomes: dict[str, TileOutcome], run_id: str
) -> gpd.GeoDataFrame:
    frames = []
    for scene in scenes:
        scene_tiles = tiles[scene.scene_id]
        cores = [shapely.box(*window_bounds(t.core_window, scene.geobox.affine)) for t in scene_tiles]
        frames.append(
            gpd.GeoDataFrame(
                {
                    "tile_id": [t.tile_id for t in scene_tiles],
                    "scene_id": scene.scene_id,
                    "row": [t.row for t in scene_tiles],
                    "col": [t.col for t in scene_tiles],
                    "status": [outcomes[t.tile_id].status for t in scene_tiles],
                    "reason": [outcomes[t.tile_id].reason for t in scene_tiles],
                    "labelled_pixels": [outcomes[t.tile_id].labelled_pixels for t in scene_tiles],
                    "run_id": run_id,
                },
                geometry=gpd.GeoSeries(cores, crs=scene.geobox.crs.wkt).to_crs(4326),
            )
        )
    empty = gpd.GeoDataFrame({"tile_id": [], "scene_id": [], "status": [], "reason": []}, geometry=[], crs=4326)
    return pd.concat(frames, ignore_index=True) if frames else empty
