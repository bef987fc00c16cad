"""The run report as a page: ``OUT/reports/<run_id>/index.html`` with a PNG quicklook per scene beside it.

Self-contained: inline CSS, no script, no web font, images referenced by relative path (the folder can
be copied or mailed as a zip); nothing is fetched when it is opened. Built from what the run left, so
``geobatch report`` can rebuild it at any time: the catalog's ``scenes`` / ``tiles`` tables of the run,
the run's object files (counts from Parquet metadata), ``run/summary.json`` (copied beside the report,
since the next run overwrites it) and the mosaics' overviews for the maps.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import os
import re
import shutil
import sqlite3
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import geopandas as gpd
import numba
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
import zarr

from geobatch import catalog
from geobatch.quicklook import PALETTE, quicklook

log = logging.getLogger(__name__)

MAX_OUTLINES = 20_000  # objects outlined per quicklook; the mask shows the rest
OUTLINE_BATCH_BYTES = 8 * 2**20  # WKB decoded at once for the outlines
_WINDOW = re.compile(r"window \(col \d+, row \d+, \d+x\d+\)")  # tiles differ only in it: group them
_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.25em .7em;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.done{color:#1a7f37}.partial{color:#9a6700}.failed{color:#cf222e}.skipped{color:#777}
.scenes{display:flex;flex-wrap:wrap;gap:1em}.scene{flex:1 1 480px}.scene img{max-width:100%;border:1px solid #ccc}
.key span{display:inline-block;width:1em;height:1em;vertical-align:middle;margin:0 .3em 0 1em}
.muted{color:#777}
"""


def latest_run(output: str | Path) -> str:
    """The id of the most recent run in ``output`` (run ids sort by their start time)."""
    runs = sorted(p.stem for p in (Path(output) / "catalog" / "scenes").glob("*.parquet"))
    if not runs:
        raise FileNotFoundError(f"no runs in {output}: its catalog has no scenes tables")
    return runs[-1]


def write_report(output: str | Path, run_id: str | None = None, quicklook_size: int = 768) -> Path:
    """Write the report of ``run_id`` (default: the latest run) and return the path of its ``index.html``."""
    output = Path(output)
    run_id = run_id or latest_run(output)
    scenes_file = output / "catalog" / "scenes" / f"{run_id}.parquet"
    if not scenes_file.exists():
        raise FileNotFoundError(f"no run {run_id} in {output} (no {scenes_file.relative_to(output)})")
    folder = output / "reports" / run_id
    (folder / "quicklooks").mkdir(parents=True, exist_ok=True)
    scenes = gpd.read_parquet(scenes_file)
    tiles_file = output / "catalog" / "tiles" / f"{run_id}.parquet"
    tiles = pd.read_parquet(tiles_file, columns=["scene_id", "status", "reason"]) if tiles_file.exists() else None
    summary = _summary(output, folder, run_id)
    looks = {}
    for scene in scenes.itertuples():
        try:
            looks[scene.scene_id] = _scene_quicklook(output, run_id, scene, folder, quicklook_size)
        except Exception as exc:  # a map that cannot be drawn must not cost the report; the page says why
            log.warning("no quicklook for scene %s: %s", scene.scene_id, exc, exc_info=True)
            looks[scene.scene_id] = f"no quicklook: {' '.join(str(exc).split())}"
    counts, times = _object_counts(output, run_id), _run_times(output, run_id)
    page = _page(run_id, scenes, tiles, counts, summary, looks, times, _labels(scenes) or list(counts))
    target = folder / "index.html"
    partial = target.with_suffix(".html.partial")
    partial.write_text(page, encoding="utf-8")
    partial.replace(target)
    return target


def _summary(output: Path, folder: Path, run_id: str) -> dict | None:
    """The run's ``summary.json``: the live one if it is this run's (kept beside the report), else the kept copy."""
    live, kept = output / "run" / "summary.json", folder / "summary.json"
    if live.exists():
        document = json.loads(live.read_text())
        if document.get("run_id") == run_id:
            shutil.copyfile(live, kept)
            return document
    return json.loads(kept.read_text()) if kept.exists() else None


def _run_times(output: Path, run_id: str) -> dict:
    ledger = output / "run" / "ledger.sqlite"
    if not ledger.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
            row = db.execute("select started_at, ended_at, outcome from runs where run_id = ?", (run_id,)).fetchone()
    except sqlite3.Error:
        return {}
    return dict(zip(("started_at", "ended_at", "outcome"), row)) if row else {}


def _object_counts(output: Path, run_id: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for path in catalog.run_object_files(output, run_id):
        counts[path.parent.parent.name] += pq.ParquetFile(path).metadata.num_rows
    return dict(sorted(counts.items()))


def _scene_quicklook(output: Path, run_id: str, scene, folder: Path, size: int) -> str:
    """Draw the scene's map; returns the PNG's path relative to the report, or why there is none."""
    mosaic = scene.mosaic if isinstance(scene.mosaic, str) and Path(scene.mosaic).exists() else None
    if scene.status == "failed" and mosaic is None and not Path(str(scene.uri)).exists() and "://" not in scene.uri:
        return "no quicklook: the scene could not be read"
    labels: list[str] = []
    if mosaic:
        meanings = zarr.open_group(mosaic, mode="r")["label"].attrs.get("flag_meanings", "")
        labels = meanings.split()[1:-1]  # background, the prompts' labels, nodata
    files = catalog.run_object_files(output, run_id, scene.scene_id)
    pixel = max(scene.geometry.bounds[2] - scene.geometry.bounds[0], 1e-12) / size if scene.geometry else 0.0
    outlines = _outlines(files, pixel) if files else None
    name = f"quicklooks/{scene.scene_id}.png"
    quicklook(folder / name, scene.uri, mosaic, outlines, labels, size)
    return name


def _outlines(files: list[Path], pixel: float) -> gpd.GeoSeries:
    """The outlines of the objects worth one on a map of ``pixel`` degrees: at least a pixel across, at
    most ``MAX_OUTLINES`` of them, largest first: a large scene holds millions of specks (the tinted mask
    shows them). They are chosen from the small ``bbox`` and ``area_m2`` columns; only the chosen
    geometries are decoded, ``OUTLINE_BATCH_BYTES`` of WKB at a time, and of each only the rings (shells
    and holes) at least a pixel across are kept, simplified to half a pixel as lines (simplifying
    polygons of thousands of holes as polygons repairs each result: 23 s for 20 000 of them). Row groups
    are drawn on a thread per CPU (up to 4), so memory holds a batch, or the largest object, per thread,
    however many objects the scene has."""
    parquets = [pq.ParquetFile(path) for path in files]
    candidates = [_visible(parquet, pixel) for parquet in parquets]
    found = pd.concat(candidates, keys=range(len(files)), names=["file", None]).reset_index(level="file")
    chosen = found.nlargest(MAX_OUTLINES, "area_m2", keep="first").groupby(["file", "group"])["row"]

    def draw(item: tuple[tuple[int, int], pd.Series]) -> np.ndarray:
        (file, group), rows = item  # a reader per task: a ParquetFile is not to be shared between threads
        parquet = pq.ParquetFile(files[file], metadata=parquets[file].metadata)
        return _group_outlines(parquet, group, rows, pixel)

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # Parquet, Numba and GEOS release the GIL
        outlines = list(pool.map(draw, chosen))
    return gpd.GeoSeries(np.concatenate(outlines) if outlines else [], crs=4326)


def _group_outlines(parquet: pq.ParquetFile, group: int, rows: pd.Series, pixel: float) -> np.ndarray:
    """The visible rings of ``rows`` of one row group, decoded ``OUTLINE_BATCH_BYTES`` of WKB at a time."""
    column = parquet.read_row_group(group, columns=["geometry"]).column("geometry")
    wkb = column.take(rows.to_numpy()).to_numpy(zero_copy_only=False)
    sizes = np.cumsum([len(value) for value in wkb])
    batches = np.split(wkb, np.flatnonzero(np.diff(sizes // OUTLINE_BATCH_BYTES)) + 1)
    rings = [_visible_rings(batch, pixel) for batch in batches]
    if column.nbytes > OUTLINE_BATCH_BYTES:  # a row group of large objects: Arrow's pool keeps it otherwise
        del column, wkb  # (the others it reuses: mapped afresh for each, they took a page fault per 4 KiB)
        pa.default_memory_pool().release_unused()
    return np.concatenate(rings)


def compile_kernels() -> None:
    """Compile the outline kernels into Numba's cache, so that a run's first report loads them (0.3 s) rather
    than compiling them (4.4 s); set-up runs it."""
    _visible_rings(shapely.to_wkb(np.array([shapely.box(0, 0, 1, 1)])), 0.5)


def _visible_rings(wkb: np.ndarray, pixel: float) -> np.ndarray:
    """The rings of the (Multi)Polygons ``wkb`` at least ``pixel`` wide or tall, simplified to half a pixel.
    Rings are measured in the WKB itself: a large object has up to hundreds of thousands of holes,
    a geometry each for shapely (1.2 s for the 20 000 largest objects of a 20 000² scene)."""
    data = np.frombuffer(b"".join(wkb), np.uint8)
    offsets = np.concatenate(([0], np.cumsum([len(value) for value in wkb], dtype=np.int64)))
    starts = offsets[:-1]
    if not ((data[starts] == 1) & np.isin(data[starts + 1], (3, 6)) & (data[starts + 2] == 0)).all():
        plain = shapely.to_wkb(shapely.from_wkb(wkb), byte_order=1, output_dimension=2)  # little-endian, 2-D
        return _visible_rings(plain, pixel)
    first, points, extent = _rings(data, offsets)
    seen = extent >= pixel
    lines = shapely.linearrings(
        _points(data, first[seen], points[seen]), indices=np.repeat(np.arange(seen.sum()), points[seen])
    )
    return shapely.simplify(lines, pixel / 2, preserve_topology=False)


@numba.njit(cache=True, nogil=True)
def _rings(data, offsets):
    """Every ring of little-endian 2-D (Multi)Polygon WKB (one after the other from ``offsets``): the byte
    where its points start, their number, and its width or height, whichever is larger."""
    capacity = len(data) // 68 + 1  # a ring takes at least 4 + 4 x 16 bytes
    first, points, extent = np.empty(capacity, np.int64), np.empty(capacity, np.int64), np.empty(capacity)
    n = 0
    for g in range(len(offsets) - 1):
        at, parts = offsets[g], 1
        if data[at + 1] == 6:  # MultiPolygon: its polygons follow
            parts, at = _uint32(data, at + 5), at + 9
        for _ in range(parts):
            rings, at = _uint32(data, at + 5), at + 9
            for _ in range(rings):
                count, at = _uint32(data, at), at + 4
                xy = data[at : at + 16 * count].view(np.float64)
                first[n], points[n] = at, count
                extent[n] = max(xy[0::2].max() - xy[0::2].min(), xy[1::2].max() - xy[1::2].min())
                n, at = n + 1, at + 16 * count
    return first[:n], points[:n], extent[:n]


@numba.njit(cache=True, nogil=True)
def _uint32(data, at):
    return (
        np.int64(data[at]) | np.int64(data[at + 1]) << 8 | np.int64(data[at + 2]) << 16 | np.int64(data[at + 3]) << 24
    )


@numba.njit(cache=True, nogil=True)
def _points(data, first, points):
    """The points of the rings starting at bytes ``first`` of ``data``, one after the other."""
    coords = np.empty((points.sum(), 2))
    flat = coords.ravel().view(np.uint8)
    at = 0
    for r in range(len(first)):
        size = 16 * points[r]
        flat[at : at + size] = data[first[r] : first[r] + size]
        at += size
    return coords


def _visible(parquet: pq.ParquetFile, pixel: float) -> pd.DataFrame:
    """Row group, row and area of the objects of one file at least ``pixel`` wide or tall."""
    found = []
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group, columns=["area_m2", "bbox"])
        box = table.column("bbox").combine_chunks()
        wide = pc.greater_equal(pc.subtract(box.field("xmax"), box.field("xmin")), pixel)
        tall = pc.greater_equal(pc.subtract(box.field("ymax"), box.field("ymin")), pixel)
        rows = np.flatnonzero(pc.or_(wide, tall).to_numpy(zero_copy_only=False))
        area = table.column("area_m2").to_numpy()[rows]
        found.append(pd.DataFrame({"group": group, "row": rows, "area_m2": area}))
    empty = pd.DataFrame({"group": np.zeros(0, np.int64), "row": np.zeros(0, np.int64), "area_m2": np.zeros(0)})
    return pd.concat([empty, *found], ignore_index=True)


def _labels(scenes: pd.DataFrame) -> list[str]:
    """The prompts' labels in mosaic order (the i-th label is mask value i), from the first mosaic."""
    for mosaic in scenes["mosaic"].dropna():
        if Path(mosaic).exists():
            return zarr.open_group(mosaic, mode="r")["label"].attrs.get("flag_meanings", "").split()[1:-1]
    return []


def _page(run_id, scenes, tiles, objects, summary, looks, times, labels) -> str:
    e = html.escape
    statuses = Counter(scenes["status"])
    tile_counts = Counter(tiles["status"]) if tiles is not None else Counter()
    inference = (summary or {}).get("inference")
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>geobatch run {e(run_id)}</title><link rel=icon href='data:,'><style>{_CSS}</style></head><body>",
        f"<h1>geobatch run {e(run_id)}" + (f" — job '{e(summary['job'])}'" if summary else "") + "</h1>",
        "<p class=muted>"
        + e(
            "  ".join(
                f"{k.replace('_', ' ')}: {v}" for k, v in {**times, "report written": _now()}.items() if v is not None
            )
        )
        + "</p>",
        "<h2>Numbers</h2><table>",
        _row("scenes", ", ".join(f"{statuses.get(s, 0)} {s}" for s in ("done", "partial", "failed", "skipped"))),
        _row("tiles", ", ".join(f"{tile_counts.get(s, 0)} {s}" for s in ("done", "skipped", "failed"))),
    ]
    if summary:
        parts.append(_row("unchanged scenes", f"{summary.get('unchanged', 0)} (processed by earlier runs, not redone)"))
        parts.append(_row("tiles inferred", f"{summary.get('tiles_inferred', 0)} by the last invocation"))
    parts.append(_row("objects", ", ".join(f"{k}: {v:,}" for k, v in objects.items()) or "none"))
    if inference:
        busy = sum(w["busy_s"] for w in inference["workers"])
        wall = sum(w["wall_s"] for w in inference["workers"])
        parts += [
            _row(
                "throughput",
                f"{inference['tiles_per_s']:.2f} tiles/s ({inference['tiles']} tiles in "
                f"{inference['seconds']:.1f} s, {inference['num_actors']} model actor(s))",
            ),
            _row("model busy", f"{busy / wall:.1%} of the actors' time" if wall else "n/a"),
            _row("batches in flight", f"{inference['mean_batches_in_flight']:.2f} on average"),
        ]
    elif summary:
        parts.append(_row("throughput", "no inference in the last invocation (everything was finished before)"))
    parts.append("</table>")
    if inference and inference["workers"]:
        parts.append("<h2>Model actors</h2><table><tr><th>worker<th>device<th>tiles<th>busy s<th>wall s<th>busy</tr>")
        for w in inference["workers"]:
            parts.append(
                f"<tr><td>{e(w['worker'])}<td>{e(w['device'])}<td class=n>{w['tiles']}<td class=n>{w['busy_s']:.2f}"
                f"<td class=n>{w['wall_s']:.2f}<td class=n>{w['busy_fraction']:.1%}</tr>"
            )
        parts.append("</table>")
    parts += _problems(scenes, tiles)
    parts.append("<h2>Scenes</h2><table><tr><th>scene<th>status<th>done<th>skipped<th>failed<th>objects<th>reason</tr>")
    for s in scenes.itertuples():
        counts = "".join(f"<td class=n>{int(v)}" for v in (s.tiles_done, s.tiles_skipped, s.tiles_failed, s.objects))
        reason = e(s.reason) if isinstance(s.reason, str) else ""
        parts.append(f"<tr><td>{e(s.scene_id)}<td class={e(s.status)}>{e(s.status)}{counts}<td>{reason}</tr>")
    parts.append("</table><h2>Maps</h2>")
    parts.append(
        "<p class=key>imagery with"
        + "".join(
            f"<span style='background:rgb{tuple(int(c) for c in PALETTE[i % len(PALETTE)])}'></span>{e(name)}"
            for i, name in enumerate(labels)
        )
        + "<span style='background:rgb(255,221,0)'></span>catalog polygons"
        + "<span style='background:rgb(60,60,60)'></span>nodata / failed</p><div class=scenes>"
    )
    for s in scenes.itertuples():
        look = looks.get(s.scene_id, "")
        figure = (
            f"<img src='{e(look)}' alt='quicklook of {e(s.scene_id)}'>"
            if look.endswith(".png")
            else f"<p class=muted>{e(look)}</p>"
        )
        parts.append(
            f"<div class=scene><h3>{e(s.scene_id)} <small class={e(s.status)}>{e(s.status)}</small></h3>{figure}</div>"
        )
    parts.append("</div></body></html>")
    return "\n".join(parts)


def _problems(scenes: pd.DataFrame, tiles: pd.DataFrame | None) -> list[str]:
    """Failed and skipped scenes with their reasons; failed tiles grouped by reason."""
    e = html.escape
    rows = [
        (s.scene_id, s.status, "all" if not s.tiles_failed else str(int(s.tiles_failed)), s.reason or "")
        for s in scenes.itertuples()
        if s.status in ("failed", "skipped") and not s.tiles_failed
    ]
    if tiles is not None:
        failed = tiles[tiles["status"] == "failed"]
        grouped = Counter(zip(failed["scene_id"], failed["reason"].fillna("").map(lambda r: _WINDOW.sub("window", r))))
        rows += [(scene, "failed", str(n), reason) for (scene, reason), n in grouped.items()]
    if not rows:
        return ["<h2>Problems</h2><p>none: every scene and tile finished.</p>"]
    out = ["<h2>Problems</h2><table><tr><th>scene<th>status<th>tiles<th>reason</tr>"]
    out += [f"<tr><td>{e(a)}<td class={e(b)}>{e(b)}<td class=n>{e(c)}<td>{e(d)}</tr>" for a, b, c, d in rows]
    return [*out, "</table>"]


def _row(name: str, value: str) -> str:
    return f"<tr><th>{html.escape(name)}<td>{html.escape(value)}</tr>"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
