"""Merging tile instances into scene instances: each instance of an instance model becomes one object.

An instance model (SAM, GeoPixel, ``synthetic-instances``) answers a tile with instances that overlap and
touch each other, and sees an instance that crosses its read window's edge only in part; the same instance
is then seen, whole or in part, by every tile whose read window it reaches. Each tile stages its instances
(``stitch.stage_instances``); this stage turns them into objects, as a Dask graph run after the scene's
tiles are processed, in which no task holds more than a few tiles' instances:

1. per processed tile: each staged instance's label, score and the first pixel, pixel count, coordinate
   sums and box of its pixels inside the tile's *core* (no masks leave the task);
2. per pair of tiles whose read windows overlap (side and diagonal neighbours; farther ones when the
   overlap exceeds half a core): instances with the same label are matched on the pixels both tiles see
   well, their cores grown by half the overlap (:func:`_compared`; a band one overlap wide along a seam),
   by :func:`match_masks`: IoU >= ``MatchThresholds.iou`` or intersection-over-smaller >=
   ``MatchThresholds.ios``, one to one, best IoU first;
3. on the driver: the objects are the connected components of the matches. An object's pixels are its
   members' masks, each cut to its own tile's core: the cores partition the scene, so no pixel counts
   twice, and each tile is the authority over its core (a pixel no member's tile claimed stays out, so
   a neighbour's partial view never overrides the centred one). Object ids follow the first pixel in
   row-major order, so they are the same for any tiling; the object's score and phrase are those of the
   member that saw most of it (the widest view); it is owned by the tile whose core holds its centroid;
4. per chunk: ``instance``, ``label`` and ``score`` are painted from the tile's own members, cut to its
   core; where objects overlap the higher score wins the pixel (then the lower id);
5. per owning tile: each object's mask is assembled over its box from its members' staged masks and
   polygonised whole (memory: one object's box), so overlapping objects keep their whole polygons.

Needs an overlap > 0 (the pipeline refuses a job without): otherwise the two parts of an instance cut by a
seam share no pixel to match on.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import dask
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely
import shapely.geometry
from rasterio.windows import Window
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from geobatch.catalog import OPTIONAL_OBJECT_COLUMNS
from geobatch.polygonize import boundary_runs, polygons
from geobatch.scenes import Scene
from geobatch.stitch import LABEL_BACKGROUND, LABEL_NODATA, Mosaic, mosaic_array, staged_mask
from geobatch.tiling import Tile, TileGrid, plan_tiles
from geobatch.vectorize import Georeference


@dataclass(frozen=True, slots=True)
class MatchThresholds:
    """When two views of the same label, compared on the pixels both tiles see, are one instance.

    IoU catches whole views that agree; intersection over the smaller view catches a view cut short (by
    the read window's edge, or a model that sees less near it) that lies inside its counterpart.
    """

    iou: float = 0.5
    ios: float = 0.8


MATCH = MatchThresholds()


@dataclass(frozen=True, slots=True)
class StagedTile:
    """A processed tile and the file holding its staged instances."""

    tile: Tile
    path: str


TileKey = tuple[int, int]  # a tile's (row, col)


def merge_instances(
    mosaic: Mosaic, scene: Scene, grid: TileGrid, thresholds: MatchThresholds = MATCH
) -> gpd.GeoDataFrame:
    """One row per object of the tiles' staged instances, and the mosaic's ``instance``/``label``/``score``.

    Columns: ``object_id``, ``label``, ``phrase``, ``score``, ``pixels``, ``area_m2`` (ellipsoidal),
    ``geometry`` (EPSG:4326; a MultiPolygon where an object's pixels are disjoint). Tiles that staged no
    file (failed or skipped) keep their nodata chunk. Runs on the current Dask scheduler.
    """
    tiles = {
        (t.row, t.col): StagedTile(t, str(mosaic.staged_instances(t.row, t.col)))
        for t in plan_tiles(mosaic.scene_id, mosaic.shape, grid)
        if mosaic.staged_instances(t.row, t.col).exists()
    }
    instances = _summaries(tiles, mosaic.shape[1])
    edges = np.concatenate([_matches(tiles, instances, grid, thresholds), _same_prompt(instances)])
    objects = _objects(instances, edges, grid.core, mosaic.labels)
    shapes = _paint_and_polygonise(mosaic, tiles, instances, objects, Georeference.of(scene))
    return _catalog_rows(objects.join(shapes), mosaic, scene)


def _paint_and_polygonise(
    mosaic: Mosaic,
    tiles: dict[TileKey, StagedTile],
    instances: pd.DataFrame,
    objects: pd.DataFrame,
    georeference: Georeference,
) -> pd.DataFrame:
    """Paint every processed chunk, and polygonise each object in its owner's task: geometry and area by id."""
    paint, empty = _paint_orders(instances, objects), pd.DataFrame(columns=["id", "code", "score", "rank"])
    painting = [dask.delayed(_paint_chunk)(mosaic.path, tile, paint.get(key, empty)) for key, tile in tiles.items()]
    members = _members(instances)
    owned = []
    for ids in objects.groupby(["owner_row", "owner_col"]).groups.values():
        owned_objects = [(i, _box(objects, i), members[i]) for i in ids]
        sources = {key: tiles[key] for _, _, of_object in owned_objects for key, _ in of_object}
        owned.append(dask.delayed(_polygonise)(owned_objects, sources, georeference))
    _, *polygonised = dask.compute(painting, *owned)
    rows = [row for rows in polygonised for row in rows]
    return pd.DataFrame(rows, columns=["id", "geometry", "area"]).set_index("id")


def _summaries(tiles: dict[TileKey, StagedTile], width: int) -> pd.DataFrame:
    """Every staged instance's summary (:func:`_summarise`), with its tile and index there; row = global index."""
    summaries = dask.compute(*[dask.delayed(_summarise)(staged, width) for staged in tiles.values()])
    frames = [s.assign(tile_row=row, tile_col=col, local=np.arange(len(s))) for (row, col), s in zip(tiles, summaries)]
    return pd.concat(frames or [_SUMMARY_FRAME], ignore_index=True)


def _matches(
    tiles: dict[TileKey, StagedTile], instances: pd.DataFrame, grid: TileGrid, thresholds: MatchThresholds
) -> np.ndarray:
    """Pairs of global instance indices that match, from a task per pair of neighbouring tiles."""
    pairs = _neighbour_pairs({key: staged.tile for key, staged in tiles.items()}, grid)
    found = dask.compute(*[dask.delayed(_match_tiles)(tiles[a], tiles[b], grid, thresholds) for a, b in pairs])
    sizes = Counter(zip(instances["tile_row"], instances["tile_col"]))
    starts = dict(zip(tiles, np.cumsum([0, *(sizes[key] for key in tiles)]).tolist()))  # tiles' instances in order
    offsets = [(starts[a], starts[b]) for a, b in pairs]
    return np.concatenate([np.zeros((0, 2), np.int64)] + [m + offset for m, offset in zip(found, offsets)])


def _same_prompt(instances: pd.DataFrame) -> np.ndarray:
    """Pairs of global instance indices that answer the same vector prompt (``prompt_id``): one object."""
    prompted = instances[instances["prompt_id"].notna()]
    pairs = [
        np.stack([group[:-1], group[1:]], axis=1)
        for group in prompted.groupby("prompt_id").indices.values()
        if len(group) > 1
    ]
    return np.concatenate([np.zeros((0, 2), np.int64), *[prompted.index.to_numpy()[p] for p in pairs]])


def match_masks(
    a: Sequence[tuple[str, np.ndarray]], b: Sequence[tuple[str, np.ndarray]], thresholds: MatchThresholds = MATCH
) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` of views ``a[i]``, ``b[j]`` (label, bool mask on one shared window) that are one instance.

    A pair matches if the labels are equal, the masks intersect, and IoU >= ``thresholds.iou`` or the
    intersection over the smaller mask >= ``thresholds.ios``. Matching is one to one, taking pairs by
    descending IoU (then IoS): a small instance inside a large one of the same label matches its own
    counterpart, not the large one.
    """
    if not a or not b:
        return []
    flat_a = np.stack([m.ravel() for _, m in a]).astype(np.float32)  # counts stay exact below 2**24 pixels
    flat_b = np.stack([m.ravel() for _, m in b]).astype(np.float32)
    inter = flat_a @ flat_b.T
    size_a, size_b = flat_a.sum(axis=1)[:, None], flat_b.sum(axis=1)[None, :]
    iou = inter / np.maximum(size_a + size_b - inter, 1)
    ios = inter / np.maximum(np.minimum(size_a, size_b), 1)
    same = np.array([label for label, _ in a])[:, None] == np.array([label for label, _ in b])[None, :]
    candidate = same & (inter > 0) & ((iou >= thresholds.iou) | (ios >= thresholds.ios))
    rows, cols = np.nonzero(candidate)
    order = np.lexsort((cols, rows, -ios[rows, cols], -iou[rows, cols]))
    taken_a, taken_b, pairs = set(), set(), []
    for i, j in zip(rows[order].tolist(), cols[order].tolist()):
        if i not in taken_a and j not in taken_b:
            taken_a.add(i)
            taken_b.add(j)
            pairs.append((i, j))
    return pairs


def _read_staged(path: str) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def _staged_over(row: pd.Series, window: Window) -> np.ndarray:
    """A staged instance's mask over ``window`` (bool, window shape; False where its box is outside)."""
    out = np.zeros((window.height, window.width), bool)
    mask = staged_mask(row["height"], row["width"], row["mask"])
    top, left = row["row"] - window.row_off, row["col"] - window.col_off
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + row["height"], window.height), min(left + row["width"], window.width)
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] = mask[r0 - top : r1 - top, c0 - left : c1 - left]
    return out


_SUMMARY_COLUMNS = ("label", "score", "phrase", "seen", "pixels", "first_pixel", "row_sum", "col_sum",
                    "top", "left", "bottom", "right", "prompt_id", "attributes")  # fmt: skip
_SUMMARY_FRAME = pd.DataFrame(columns=[*_SUMMARY_COLUMNS, "tile_row", "tile_col", "local"])


def _summarise(staged: StagedTile, width: int) -> pd.DataFrame:
    """Per staged instance of one tile: label, score, phrase, pixels seen, and its core piece's statistics.

    ``pixels`` counts the piece inside the core; the first pixel, sums and box are only meaningful if > 0.
    """
    core = staged.tile.core_window
    rows, cols = np.mgrid[core.row_off : core.row_off + core.height, core.col_off : core.col_off + core.width]
    summary = []
    for _, instance in _read_staged(staged.path).iterrows():
        piece = _staged_over(instance, core)
        r, c = (rows[piece], cols[piece]) if piece.any() else (np.zeros(1, np.int64), np.zeros(1, np.int64))
        seen = np.count_nonzero(staged_mask(instance["height"], instance["width"], instance["mask"]))
        summary.append(
            (instance["label"], instance["score"], instance["phrase"], seen, np.count_nonzero(piece),
             (r * width + c).min(), r.sum(), c.sum(), r.min(), c.min(), r.max() + 1, c.max() + 1,
             instance.get("prompt_id"), instance.get("attributes"))
        )  # fmt: skip
    return pd.DataFrame(summary, columns=list(_SUMMARY_COLUMNS))


def _neighbour_pairs(tiles: dict[TileKey, Tile], grid: TileGrid) -> list[tuple[TileKey, TileKey]]:
    """Pairs of processed tiles (each once) that both see some pixels well (see :func:`_compared`)."""
    reach = math.ceil(2 * grid.overlap / grid.core)  # tiles farther apart than this share no pixel
    pairs = []
    for (row, col), tile in tiles.items():
        for d_row in range(reach + 1):
            for d_col in range(-reach, reach + 1):
                other = (row + d_row, col + d_col)
                if (d_row, d_col) > (0, 0) and other in tiles and _compared(tile, tiles[other], grid):
                    pairs.append(((row, col), other))
    return pairs


def _compared(a: Tile, b: Tile, grid: TileGrid) -> Window | None:
    """The pixels on which two tiles' views are compared, if any.

    A model sees least well near its read window's cut edges, so each tile is trusted only within its core
    grown by half the overlap (rounded up); views are compared where both are trusted. For side neighbours
    that is a band one overlap wide centred on their seam. An instance crossing the seam always reaches it.
    """
    margin = math.ceil(grid.overlap / 2)
    windows = [_intersection(_grown(t.core_window, margin), t.read_window) for t in (a, b)]
    return _intersection(*windows) if all(windows) else None


def _grown(window: Window, margin: int) -> Window:
    grow = 2 * margin
    return Window(window.col_off - margin, window.row_off - margin, window.width + grow, window.height + grow)


def _intersection(a: Window, b: Window) -> Window | None:
    (a_rows, a_cols), (b_rows, b_cols) = a.toslices(), b.toslices()
    top, bottom = max(a_rows.start, b_rows.start), min(a_rows.stop, b_rows.stop)
    left, right = max(a_cols.start, b_cols.start), min(a_cols.stop, b_cols.stop)
    return Window(left, top, right - left, bottom - top) if top < bottom and left < right else None


def _match_tiles(a: StagedTile, b: StagedTile, grid: TileGrid, thresholds: MatchThresholds) -> np.ndarray:
    """Local index pairs of matching instances of two tiles, compared where both see well."""
    compared = _compared(a.tile, b.tile, grid)
    views = []
    for staged in (a, b):
        staged_rows = _read_staged(staged.path).iterrows()
        over = [(i, row["label"], _staged_over(row, compared)) for i, row in staged_rows if _unprompted(row)]
        views.append([view for view in over if view[2].any()])
    pairs = match_masks([v[1:] for v in views[0]], [v[1:] for v in views[1]], thresholds)
    return np.array([(views[0][i][0], views[1][j][0]) for i, j in pairs], np.int64).reshape(-1, 2)


def _unprompted(row: pd.Series) -> bool:
    """Whether a staged instance is matched by overlap: it answers no vector prompt (those match by id)."""
    return pd.isna(row.get("prompt_id"))


def _objects(instances: pd.DataFrame, edges: np.ndarray, core: int, labels: Sequence[str]) -> pd.DataFrame:
    """Objects, indexed by id, from instances and their matches; sets ``instances['object']`` (0: none).

    An object whose members hold no core pixel (its tiles' cores never claimed it) is dropped.
    """
    count = len(instances)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(count, count))
    instances["group"] = connected_components(graph, directed=False)[1] if count else np.zeros(0, np.int64)
    widest = instances.sort_values(["seen", "score"], ascending=False).groupby("group").head(1).set_index("group")
    pieces = instances[instances["pixels"] > 0].groupby("group")
    objects = pieces[["pixels", "row_sum", "col_sum"]].sum()
    objects = objects.join(pieces[["first_pixel", "top", "left"]].min()).join(pieces[["bottom", "right"]].max())
    objects = objects.join(widest[["label", "score", "phrase", "prompt_id", "attributes"]])
    objects["code"] = objects["label"].map({label: i + 1 for i, label in enumerate(labels)})
    objects = objects.sort_values(["first_pixel", "code", "score", "pixels"], ascending=[True, True, False, False])
    objects["id"] = np.arange(1, len(objects) + 1)
    priority = objects.sort_values(["score", "id"], ascending=[False, True]).index
    objects.loc[priority, "rank"] = np.arange(len(objects))  # 0 paints last and wins
    objects["owner_row"] = (objects["row_sum"] / objects["pixels"] // core).astype(int)  # the centroid's tile
    objects["owner_col"] = (objects["col_sum"] / objects["pixels"] // core).astype(int)
    instances["object"] = instances["group"].map(objects["id"]).fillna(0).astype(np.int64)
    return objects.set_index("id", drop=False)


def _paint_orders(instances: pd.DataFrame, objects: pd.DataFrame) -> dict[TileKey, pd.DataFrame]:
    """Per tile, its staged instances (by local index) that belong to an object: id, code, score, rank."""
    belonging = instances[instances["object"] > 0]
    return {
        key: objects.loc[mine["object"], ["id", "code", "score", "rank"]].set_index(mine["local"].to_numpy())
        for key, mine in belonging.groupby(["tile_row", "tile_col"])
    }


def _paint_chunk(store: str, staged: StagedTile, paint: pd.DataFrame) -> None:
    """Write one chunk's ``instance``/``label``/``score`` from its tile's instances, cut to the core.

    Validity comes from the chunk's ``label`` (nodata stays nodata), so painting again gives the same chunk.
    """
    core = staged.tile.core_window
    where = core.toslices()
    valid = mosaic_array(store, "label")[where] != LABEL_NODATA
    instance = np.zeros(valid.shape, np.uint32)
    label = np.where(valid, LABEL_BACKGROUND, LABEL_NODATA).astype(np.uint8)
    score = np.where(valid, np.float32(0), np.float32(np.nan))
    instances = _read_staged(staged.path)
    for local, row in paint.sort_values("rank", ascending=False).iterrows():  # the highest priority last
        piece = _staged_over(instances.iloc[local], core) & valid
        instance[piece], label[piece], score[piece] = row["id"], row["code"], row["score"]
    for name, values in (("instance", instance), ("label", label), ("score", score)):
        mosaic_array(store, name)[where] = values


def _members(instances: pd.DataFrame) -> dict[int, list[tuple[TileKey, int]]]:
    """Each object's members that hold core pixels, as (tile key, local index)."""
    holding = instances[(instances["object"] > 0) & (instances["pixels"] > 0)]
    return {
        int(object_id): [((r, c), local) for r, c, local in group[["tile_row", "tile_col", "local"]].to_numpy()]
        for object_id, group in holding.groupby("object")
    }


def _box(objects: pd.DataFrame, object_id: int) -> Window:
    top, left, bottom, right = (int(objects.at[object_id, side]) for side in ("top", "left", "bottom", "right"))
    return Window(left, top, right - left, bottom - top)


def _polygonise(
    objects: list[tuple[int, Window, list]], tiles: dict[TileKey, StagedTile], georeference: Georeference
) -> list[tuple[int, shapely.Geometry, float]]:
    """(id, EPSG:4326 geometry, area m²) of objects, each assembled over its box from its members' core pieces."""
    staged: dict[TileKey, pd.DataFrame] = {}
    ids, polygons, areas = [], [], []
    for object_id, box, members in objects:
        mask = np.zeros((box.height, box.width), bool)
        for key, local in members:
            if key not in staged:
                staged[key] = _read_staged(tiles[key].path)
            in_core = np.zeros_like(mask)
            in_core[_inside(tiles[key].tile.core_window, box)] = True
            mask |= _staged_over(staged[key].iloc[local], box) & in_core
        ids.append(object_id)
        polygons.append(_polygon(mask, box.row_off, box.col_off))
        areas.append(float(georeference.area_sums(mask.view(np.uint8), 1, *box.toslices())[0]))
    return list(zip(ids, georeference.to_lonlat(np.array(polygons, dtype=object)), areas))


def _polygon(mask: np.ndarray, top: int, left: int) -> shapely.Geometry:
    """The polygon (a MultiPolygon if disjoint) of ``mask``'s pixels, placed at ``top``, ``left`` in scene pixels."""
    _, (shape,) = polygons(boundary_runs(np.pad(mask.astype(np.int64), 1), (top, left)))
    return shape


def _inside(window: Window, box: Window) -> tuple[slice, slice]:
    """The part of ``window`` inside ``box``, as slices of an array over ``box``."""
    top, left = max(window.row_off - box.row_off, 0), max(window.col_off - box.col_off, 0)
    bottom = min(window.row_off + window.height - box.row_off, box.height)
    right = min(window.col_off + window.width - box.col_off, box.width)
    return slice(top, max(bottom, top)), slice(left, max(right, left))


def _catalog_rows(objects: pd.DataFrame, mosaic: Mosaic, scene: Scene) -> gpd.GeoDataFrame:
    """Catalog rows in id order; ``object_id`` is ``scene:label:row:col`` of the first pixel (``:2``... if shared)."""
    rows, cols = np.divmod(objects["first_pixel"].to_numpy(np.int64), mosaic.shape[1])
    labels = objects["label"].to_numpy(object)
    first = pd.Series([f"{scene.scene_id}:{lab}:{r}:{c}" for lab, r, c in zip(labels, rows, cols)], dtype=object)
    repeat = first.groupby(first).cumcount().to_numpy() + 1  # overlapping instances may share a first pixel
    columns = {
        "object_id": [oid if k == 1 else f"{oid}:{k}" for oid, k in zip(first, repeat)],
        "label": labels,
        "phrase": objects["phrase"].to_numpy(object),
        "score": objects["score"].to_numpy(np.float32),
        "pixels": objects["pixels"].to_numpy(np.int64),
        "area_m2": objects["area"].to_numpy(np.float64),
    }
    for name in OPTIONAL_OBJECT_COLUMNS:  # only where the model gave them, so other catalogs keep their columns
        if objects[name].notna().any():
            columns[name] = [None if pd.isna(v) else str(v) for v in objects[name]]
    return gpd.GeoDataFrame(columns, geometry=objects["geometry"].to_numpy(), crs=4326)
