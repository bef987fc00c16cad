"""Vectorising: a scene mosaic's labelled regions become polygons, each object exactly once.

An object is a 4-connected region of one label. Work is split into blocks of 2 x 2 mosaic chunks (one
chunk of overview level 2 each) and run as a Dask graph, and the driver never holds pixels or more than
one block's polygons:

1. per block: 4-connected components of each label, their pixel counts, score and area sums, first
   pixels, and their boundary runs, framed by the labels just outside the block: an edge along the
   block's border is left out where the same label lies across it, so every run is one the object has.
   Components with no such edge (the labels around say so) are whole objects: their polygons and
   catalog rows are made and staged right there. The others, pieces of objects that cross the block's
   border, stage their runs; only they and the block's four border strips go back to the driver. The
   block's ``label`` and ``score`` are written to overview level 2;
2. on the driver: pieces that touch across a block seam are joined into objects (a sparse graph's
   connected components over the border strips: no pixels, no polygons), and the objects are put in
   tracing buckets;
3. per block: the ``instance`` array is written (the components again, each piece named by its object),
   and the staged runs of the block's pieces are renamed by object and sorted into their buckets;
4. per bucket: the runs of each object, gathered from every block it touches, are linked into rings
   (:mod:`geobatch.polygonize`) and their rows staged. Objects larger than a block have a bucket each and
   are traced one after another, the others are spread evenly; the driver writes the blocks' rows
   meanwhile.

Every polygon thus follows its object's pixel edges exactly and is the same for any tiling. An object's
id is its first pixel in row-major order (``row * width + col``, plus one in the ``instance`` array), so
ids are the same for any tile size and on every rerun, and a block can name its own objects.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import heapq
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import dask
import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyproj
import shapely
import zarr
from affine import Affine
from pyarrow import feather

from geobatch.catalog_rows import wkb_rows
from geobatch.polygonize import Runs, WkbPolygons, boundary_runs, polygon_wkb
from geobatch.stitch import Mosaic, coarsen, mosaic_array, write_overview_chunk
from geobatch.tiling import TileGrid, plan_tiles

if TYPE_CHECKING:  # the block tasks' workers need neither
    from geobatch.scenes import Scene

_AREA_SAMPLE_STEP = 32  # pixels between the points where a pixel's ground area is measured
_LONLAT_STEP = 32  # pixels between the grid nodes where longitude and latitude are exact (Georeference.lonlat)
_LONLAT_TOLERANCE = 1e-11  # degrees (about a micrometre) that interpolated longitudes and latitudes may be off
_CROSSING_PER_BUCKET = 512  # one trace task per this many seam-crossing objects
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
_RUNS_PER_TRACE = 250_000  # boundary runs linked at once by a trace (but a larger object's all at once)
_CROSSING_BUCKETS = 8  # trace tasks at least, to spread the work over the workers

BlockKey = tuple[int, int]  # a block of 2 x 2 mosaic chunks: (row, col) among blocks


@dataclass(frozen=True, slots=True)
class Georeference:
    """Takes polygons from scene pixel coordinates to EPSG:4326, and measures pixels on the ellipsoid.

    Ground areas come from a Lambert equal-area projection centred on the scene (equal-area projections
    keep ellipsoidal areas exactly), measured every few pixels and interpolated between: an object's area
    is the sum of its pixels' areas, so the areas of an object's pieces add up.
    """

    affine: Affine
    crs_wkt: str
    equal_area: str

    @classmethod
    def of(cls, scene: Scene) -> Georeference:
        lon, lat = scene.geobox.extent.centroid.to_crs("epsg:4326").coords[0]
        laea = f"+proj=laea +lat_0={lat} +lon_0={lon} +ellps=WGS84 +units=m"
        return cls(scene.geobox.affine, scene.geobox.crs.wkt, laea)

    def lonlat(self, xy: np.ndarray) -> np.ndarray:
        """Scene pixel coordinates (an n x 2 array of column, row) in EPSG:4326 (longitude, latitude).

        PROJ takes 150 ns a point, which was a quarter of vectorising a chunk. So the scene is cut into
        cells of ``_LONLAT_STEP`` pixels, and a point is interpolated (biquadratically) from the exact values
        at 3 x 3 nodes from its cell's corner where that is within ``_LONLAT_TOLERANCE`` of PROJ at the
        cell's centre, and transformed by PROJ in the other cells (too curved, across the antimeridian,
        off the CRS's domain). Which of the two a point gets, and its value, depend on its cell alone, so a
        vertex gets the same coordinates in every block, trace and tiling.
        """
        cell_of, used, within = _cells(xy, _LONLAT_STEP)
        offsets = np.array([*((c, r) for r in range(3) for c in range(3)), (0.5, 0.5)])
        values = self._exact_lonlat(((used[:, None, :] + offsets) * _LONLAT_STEP).reshape(-1, 2))
        values = values.reshape(len(used), 10, 2)
        found, exact = _interpolate(within, cell_of, values, _LONLAT_TOLERANCE)
        if exact.any():
            found[exact] = self._exact_lonlat(xy[exact])
        return found

    def _exact_lonlat(self, xy: np.ndarray) -> np.ndarray:
        transformer = _transformer(self.crs_wkt, "EPSG:4326")
        return np.column_stack(transformer.transform(*(self.affine @ (xy[:, 0], xy[:, 1]))))

    def to_lonlat(self, pixel_geometries: np.ndarray) -> np.ndarray:
        """Geometries in scene pixel coordinates, in EPSG:4326 (longitude, latitude)."""
        return shapely.transform(pixel_geometries, self.lonlat)

    def area_sums(self, ids: np.ndarray, count: int, rows: slice, cols: slice) -> np.ndarray:
        """The ground area in m² of the pixels of each id 1..``count`` of ``ids``, a window ``rows`` x ``cols``
        of the scene grid: pixel areas measured at samples every ``_AREA_SAMPLE_STEP`` pixels, interpolated
        bilinearly at each pixel and summed in one pass."""
        sample_rows, sample_cols = _samples(rows), _samples(cols)
        col, row = np.meshgrid(sample_cols, sample_rows)
        corners = [(col, row), (col + 1, row), (col + 1, row + 1), (col, row + 1)]
        transformer = _transformer(self.crs_wkt, self.equal_area)
        xs, ys = zip(*(transformer.transform(*(self.affine @ (c.ravel(), r.ravel()))) for c, r in corners))
        xs, ys = np.array(xs) - xs[0], np.array(ys) - ys[0]  # small numbers: exact differences
        shoelace = sum(xs[i] * ys[(i + 1) % 4] - xs[(i + 1) % 4] * ys[i] for i in range(4))
        sampled = np.abs(shoelace / 2).reshape(row.shape)
        sampled = np.pad(sampled, (0, 1), mode="edge")  # a window a pixel across has one sample: a next, at weight 0
        return _interpolated_sums(ids, count, sampled, *_between(rows, sample_rows), *_between(cols, sample_cols))


@numba.njit(cache=True, nogil=True)
def _cells(xy, step):
    """The cells of ``step`` pixels that hold the points ``xy``: the index of each point's cell among those used
    (numbered as met), the cells used (column, row) and where each point lies within its cell (0-1 each way)."""
    n = len(xy)
    cells = np.empty((n, 2), np.int64)
    within = np.empty((n, 2))
    for i in range(n):
        for k in range(2):
            scaled = xy[i, k] / step
            cells[i, k] = np.floor(scaled)
            within[i, k] = scaled - cells[i, k]
    low_col, low_row = (cells[:, 0].min(), cells[:, 1].min()) if n else (0, 0)
    width = cells[:, 0].max() - low_col + 1 if n else 0
    number = np.full(width * (cells[:, 1].max() - low_row + 1) if n else 0, -1, np.int32)
    cell_of = np.empty(n, np.int64)
    used = np.empty((n, 2), np.int64)
    count = 0
    for i in range(n):
        key = (cells[i, 1] - low_row) * width + cells[i, 0] - low_col
        if number[key] < 0:
            number[key] = count
            used[count] = cells[i]
            count += 1
        cell_of[i] = number[key]
    return cell_of, used[:count], within


@numba.njit(cache=True, nogil=True)
def _interpolate(within, cell_of, values, tolerance):
    """Biquadratic (Lagrange) interpolation of the points at ``within`` their cells (n x 2, in cells) from
    ``values``: per cell, the exact values at the 3 x 3 nodes from its corner and at its centre, where that
    is within ``tolerance`` at the centre. Returns the values and which points are left to transform."""
    usable = np.zeros(len(values), np.bool_)
    for k in range(len(values)):
        longitudes = values[k, :9, 0]
        if longitudes.max() - longitudes.min() < 180:  # not across the antimeridian; NaN (off the domain) fails
            lon, lat = _biquadratic(values[k], 0.5, 0.5)
            usable[k] = abs(lon - values[k, 9, 0]) <= tolerance and abs(lat - values[k, 9, 1]) <= tolerance
    found = np.empty_like(within)
    exact = np.zeros(len(within), np.bool_)
    for i in range(len(within)):
        if usable[cell_of[i]]:
            found[i, 0], found[i, 1] = _biquadratic(values[cell_of[i]], within[i, 0], within[i, 1])
        else:
            exact[i] = True
    return found, exact


@numba.njit(cache=True, nogil=True)
def _biquadratic(nodes, fx, fy):
    """Lagrange interpolation at (fx, fy) through ``nodes`` (3 x 3 values, row-major, at 0, 1 and 2 each way)."""
    wx = ((fx - 1) * (fx - 2) / 2, fx * (2 - fx), fx * (fx - 1) / 2)
    wy = ((fy - 1) * (fy - 2) / 2, fy * (2 - fy), fy * (fy - 1) / 2)
    lon = lat = 0.0
    for i in range(3):
        for j in range(3):
            lon += wy[i] * wx[j] * nodes[3 * i + j, 0]
            lat += wy[i] * wx[j] * nodes[3 * i + j, 1]
    return lon, lat


@functools.lru_cache(maxsize=16)
def _transformer(source: str, target: str) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(source, target, always_xy=True)


def _samples(span: slice) -> np.ndarray:
    return np.unique(np.append(np.arange(span.start, span.stop, _AREA_SAMPLE_STEP), span.stop - 1))


def _between(span: slice, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each index of ``span``: the sample at or before it (its index) and how far on to the next one (0-1)."""
    positions = np.arange(span.start, span.stop)
    if len(samples) == 1:  # a window one pixel across
        return np.zeros(len(positions), np.int64), np.zeros(len(positions))
    at = np.clip(np.searchsorted(samples, positions, side="right") - 1, 0, len(samples) - 2)
    return at, (positions - samples[at]) / (samples[at + 1] - samples[at])


@numba.njit(cache=True, nogil=True)
def _interpolated_sums(ids, count, sampled, row_at, row_on, col_at, col_on):
    sums = np.zeros(count)
    for r in range(ids.shape[0]):
        i, fy = row_at[r], row_on[r]
        across = sampled[i] + fy * (sampled[i + 1] - sampled[i])  # the samples interpolated to this row
        for c in range(ids.shape[1]):
            if ids[r, c]:
                j = col_at[c]
                sums[ids[r, c] - 1] += across[j] + col_on[c] * (across[j + 1] - across[j])
    return sums


@dataclass(frozen=True, slots=True)
class MosaicPlan:
    """What every block task needs to know about the mosaic it vectorises."""

    path: str
    scene_id: str
    width: int
    labels: tuple[str, ...]
    georeference: Georeference
    staging: Path
    instance_dtype: np.dtype

    @property
    def codes(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.labels) + 1))


@dataclass(frozen=True, slots=True)
class Components:
    """A block's 4-connected components of each label; arrays are indexed by local id - 1."""

    local: np.ndarray  # local id per pixel, 0 for none
    codes: np.ndarray
    first: np.ndarray  # first pixel in row-major order, as a scene-wide index (row * width + col)
    pixels: np.ndarray

    @property
    def count(self) -> int:
        return len(self.codes)

    def sums(self, values: np.ndarray) -> np.ndarray:
        """The sum of ``values`` (one per pixel; NaN counts as 0) over each component."""
        return _component_sums(self.local, self.count, values)

    def framed(self, label: np.ndarray, halo: tuple) -> np.ndarray:
        """The local ids inside a one-pixel frame, as :func:`boundary_runs` takes them: a frame pixel holds the
        id of the pixel it touches where ``halo`` (the labels just outside the block: top, bottom, left,
        right; None at the mosaic's edge) has that pixel's label, so no edge is made where the object goes
        on, and 0 elsewhere."""
        sides = (np.zeros(0, label.dtype) if h is None else h for h in halo)
        frame = np.empty((label.shape[0] + 2, label.shape[1] + 2), self.local.dtype)  # huge pages: see _scratch
        _framed(frame, self.local, label, *(np.require(h, label.dtype, "C") for h in sides))
        return frame


@dataclass(frozen=True, slots=True)
class BorderPieces:
    """The components of one block that go on across its border (arrays in ``ids`` order), and its border
    strips: the local ids of the pieces along each side (0 where nothing goes on across)."""

    ids: np.ndarray  # local ids
    codes: np.ndarray
    pixels: np.ndarray
    score_sums: np.ndarray
    areas: np.ndarray
    first: np.ndarray
    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray

    @classmethod
    def of(cls, components: Components, score_sums, areas, frame: np.ndarray) -> BorderPieces:
        strips = frame[0, 1:-1], frame[-1, 1:-1], frame[1:-1, 0], frame[1:-1, -1]
        ids = np.unique(np.concatenate(strips))
        ids = ids[ids > 0]
        at = ids - 1
        return cls(
            ids, components.codes[at], components.pixels[at], score_sums[at], areas[at], components.first[at],
            *(strip.copy() for strip in strips),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ObjectTable:
    """Objects joined from border pieces, indexed by object id (first pixel + 1)."""

    ids: np.ndarray
    codes: np.ndarray
    pixels: np.ndarray
    score_sums: np.ndarray
    areas: np.ndarray
    bucket: np.ndarray  # the bucket that traces it (step 4)

    def subset(self, ids: np.ndarray) -> ObjectTable:
        at = np.searchsorted(self.ids, np.unique(ids))
        return ObjectTable(*(getattr(self, name)[at] for name in ObjectTable.__slots__))

    def rows(self, plan: MosaicPlan, shapes: WkbPolygons) -> pa.Table:
        at = np.searchsorted(self.ids, shapes.ids)
        return _rows(plan, shapes.ids - 1, self.codes[at], self.pixels[at], self.score_sums[at], self.areas[at], shapes)


def vectorize(mosaic: Mosaic, scene: Scene, overview: bool = False) -> Iterator[pa.Table]:
    """Every labelled object of ``mosaic`` as catalog rows, a block at a time; writes its ``instance`` array.

    With ``overview``, also writes the mosaic's overview level 2 (declared by ``stitch.create_mosaic``)
    from the pixels steps 1 and 3 hold anyway.

    Arrow batches with ``object_id``, ``label``, ``score`` (mean pixel score), ``pixels``, ``area_m2``
    (ellipsoidal), ``geometry`` (WKB, EPSG:4326) and ``bbox``; each batch Hilbert-sorted, batches in
    row-major block order, then the seam-crossing objects by bucket, each as soon as it is traced (the traces
    run while the blocks' batches are taken).
    Runs on the current Dask scheduler; each task opens the store by path itself. Staged files live beside
    the mosaic until the last batch is taken.
    """
    staging = Path(mosaic.path).with_name(f"{mosaic.scene_id}.vectors.partial")
    shutil.rmtree(staging, ignore_errors=True)
    for folder in ("pieces", "runs", "crossing"):
        (staging / folder).mkdir(parents=True)
    georeference = Georeference.of(scene)
    plan = MosaicPlan(
        mosaic.path, mosaic.scene_id, mosaic.shape[1], mosaic.labels, georeference, staging, mosaic.instance_dtype
    )
    blocks = _block_slices(mosaic)
    overview_of = mosaic if overview else None
    try:
        found = dask.compute(*[dask.delayed(_pieces)(plan, key, where, overview_of) for key, where in blocks.items()])
        border = dict(zip(blocks, found))
        large = 4 * mosaic.chunk**2  # more pixels than a block
        objects, object_of = _join(border, large)
        buckets = int(objects.bucket.max(initial=-1)) + 1
        work = {key: PieceObjects(border[key].ids, object_of[key], objects.subset(object_of[key])) for key in blocks}
        dask.compute(
            *[dask.delayed(_instances)(plan, key, where, work[key], overview_of) for key, where in blocks.items()]
        )
        traced, after = [], None
        for bucket in range(buckets):
            members = objects.subset(objects.ids[objects.bucket == bucket])
            alone = len(members.ids) == 1 and members.pixels[0] > large  # the large objects, one at a time
            traced.append(dask.delayed(_trace_crossing)(plan, members, bucket, after if alone else None))
            after = traced[-1] if alone else after
        with ThreadPoolExecutor(1) as background:  # the workers trace while the caller takes the blocks' rows
            tracing = background.submit(dask.compute, *traced)
            for key in blocks:
                yield feather.read_table(_staged_rows(staging, key))
            for bucket in range(buckets):  # then each bucket's, in order, as soon as it is traced
                yield feather.read_table(_traced(staging, bucket, tracing))
            tracing.result()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def compile_kernels() -> None:
    """Compile the Numba kernels that every block task runs into Numba's cache (beside the sources), so that
    each worker loads them rather than compiling them on its first block (seconds); set-up runs it."""
    label = np.array([[1, 1, 0], [0, 2, 2]], np.uint8)
    window = (slice(0, 2), slice(0, 3))
    components = _components(label, (1, 2), window, 3)
    components.sums(np.zeros((2, 3), np.float32))
    coarsen("score", np.zeros((2, 3), np.float32))  # overviews
    equal_area = "+proj=laea +lat_0=0 +lon_0=0 +ellps=WGS84 +units=m"
    georeference = Georeference(Affine.identity(), pyproj.CRS("EPSG:4326").to_wkt(), equal_area)
    for ids in (components.local, label):  # blocks' components, instance models' masks (uint8)
        georeference.area_sums(ids, 2, *window)
    halo = (np.full(3, 3, np.uint8), None, np.full(2, 3, np.uint8), None)  # a label the block has not: closed
    for framed in (components.framed(label, halo), np.pad(label.astype(np.int64), 1)):  # blocks, instance masks
        polygon_wkb(boundary_runs(framed), georeference.lonlat)


def _block_slices(mosaic: Mosaic) -> dict[BlockKey, tuple[slice, slice]]:
    """Each block's position (row, col) and its pixel slices: 2 x 2 mosaic chunks (fewer at the mosaic's
    right and bottom edges), the part of the mosaic that makes a chunk of overview level 2."""
    tiles = plan_tiles(mosaic.scene_id, mosaic.shape, TileGrid(2 * mosaic.chunk, overlap=0))
    return {(tile.row, tile.col): tile.core_window.toslices() for tile in tiles}


def _components(label: np.ndarray, codes: tuple[int, ...], where: tuple[slice, slice], width: int) -> Components:
    """4-connected components of each code, numbered 1..n in the order of their first pixel."""
    local, piece_codes, first, pixels = _label_components(np.ascontiguousarray(label), max(codes), *_scratch(label))
    rows, cols = np.divmod(first, label.shape[1])
    return Components(local, piece_codes, (where[0].start + rows) * width + where[1].start + cols, pixels)


def _scratch(label: np.ndarray) -> tuple[np.ndarray, ...]:
    """The arrays that :func:`_label_components` fills, a block's size each. NumPy allocates them: it asks for
    huge pages, where Numba's own allocations took a fault per 4 KiB page (a third of labelling a block)."""
    return np.empty(label.size + 1, np.int32), np.empty(label.size + 1, np.int64), np.zeros(label.shape, np.int32)


@numba.njit(cache=True, nogil=True)
def _label_components(label, codes, parent, start, local):
    """Union-find labelling of the pixels of values 1..``codes``: local ids (numbered by first pixel), and each
    component's value, first pixel (flat index) and pixel count. Two passes over the pixels, no sort.

    A union makes the larger root a child of the smaller, so a provisional label's parent is always smaller
    and a component's root is the label made at its first pixel: one pass over the labels in order then
    numbers the components by first pixel and names every label's component.
    """
    height, width = label.shape  # parent: provisional labels' union-find forest; start: where each was made
    provisional = 0
    for r in range(height):
        for c in range(width):
            v = label[r, c]
            if v < 1 or v > codes:
                continue
            left = local[r, c - 1] if c > 0 and label[r, c - 1] == v else 0
            up = local[r - 1, c] if r > 0 and label[r - 1, c] == v else 0
            if left and up:
                a, b = _root(parent, left), _root(parent, up)
                parent[max(a, b)] = min(a, b)
                local[r, c] = min(a, b)
            elif left or up:
                local[r, c] = left if left else up
            else:
                provisional += 1
                parent[provisional], start[provisional] = provisional, r * width + c
                local[r, c] = provisional
    final = np.zeros(provisional + 1, np.int32)
    firsts = np.empty(provisional, np.int64)
    values = np.empty(provisional, np.int64)
    count = 0
    for p in range(1, provisional + 1):
        if parent[p] == p:
            firsts[count], values[count] = start[p], label[start[p] // width, start[p] % width]
            count += 1
            final[p] = count
        else:
            final[p] = final[parent[p]]  # named already: the parent is smaller
    pixels = np.zeros(count, np.int64)
    for r in range(height):
        for c in range(width):
            if local[r, c]:
                local[r, c] = final[local[r, c]]
                pixels[local[r, c] - 1] += 1
    return local, values[:count], firsts[:count], pixels


@numba.njit(cache=True, nogil=True)
def _root(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = parent[i]
    return i


@numba.njit(cache=True, nogil=True)
def _framed(frame, local, label, top, bottom, left, right):
    height, width = local.shape
    frame[0], frame[-1], frame[:, 0], frame[:, -1] = 0, 0, 0, 0
    frame[1:-1, 1:-1] = local
    for c in range(width):
        if len(top) and top[c] == label[0, c]:
            frame[0, c + 1] = local[0, c]
        if len(bottom) and bottom[c] == label[-1, c]:
            frame[-1, c + 1] = local[-1, c]
    for r in range(height):
        if len(left) and left[r] == label[r, 0]:
            frame[r + 1, 0] = local[r, 0]
        if len(right) and right[r] == label[r, -1]:
            frame[r + 1, -1] = local[r, -1]


@numba.njit(cache=True, nogil=True)
def _component_sums(local, count, values):
    sums = np.zeros(count)
    for r in range(local.shape[0]):
        for c in range(local.shape[1]):
            if local[r, c] and not np.isnan(values[r, c]):
                sums[local[r, c] - 1] += values[r, c]
    return sums


def _pieces(plan: MosaicPlan, key: BlockKey, where: tuple[slice, slice], overview: Mosaic | None) -> BorderPieces:
    """Step 1 for one block: stage its whole objects as catalog rows and its border pieces' runs; return its
    border pieces. Writes the block's ``label`` and ``score`` to overview level 2 if asked."""
    _heap(keep=True)
    label, score = (mosaic_array(plan.path, name)[where] for name in ("label", "score"))
    if overview is not None:
        write_overview_chunk(overview, 2, key, {"label": label, "score": score})
    components = _components(label, plan.codes, where, plan.width)
    score_sums = components.sums(score)
    areas = plan.georeference.area_sums(components.local, components.count, *where)
    frame = components.framed(label, _label_halo(mosaic_array(plan.path, "label"), where))
    pieces = BorderPieces.of(components, score_sums, areas, frame)
    runs = boundary_runs(frame, (where[0].start, where[1].start))
    del frame
    crossing = np.zeros(components.count + 1, bool)
    crossing[pieces.ids] = True
    crossing = crossing[runs.ids]
    shapes = _polygons(plan, runs.select(~crossing))
    at = shapes.ids - 1
    rows = _rows(
        plan, components.first[at], components.codes[at], components.pixels[at], score_sums[at], areas[at], shapes
    )
    _stage(rows, _staged_rows(plan.staging, key))
    _stage(runs.select(crossing).table(), _staged_pieces(plan.staging, key))
    return pieces


def _label_halo(label: zarr.Array, where: tuple[slice, slice]) -> tuple:
    """The labels just outside the window ``where`` of ``label``: the rows above and below it, the columns left
    and right of it (None at the mosaic's edge)."""
    (rows, cols), (height, width) = where, label.shape
    return (
        label[rows.start - 1, cols] if rows.start > 0 else None,
        label[rows.stop, cols] if rows.stop < height else None,
        label[rows, cols.start - 1] if cols.start > 0 else None,
        label[rows, cols.stop] if cols.stop < width else None,
    )


def _rows(plan: MosaicPlan, first, codes, pixels, score_sums, areas, shapes: WkbPolygons) -> pa.Table:
    """Catalog rows of whole objects (Arrow, Hilbert-sorted): ids from first pixels, ``shapes`` in
    longitude/latitude (see :func:`_polygons`)."""
    rows, cols = np.divmod(first, plan.width)
    labels = pa.array(plan.labels, pa.string()).take(np.asarray(codes, np.int64) - 1)
    object_ids = pc.binary_join_element_wise(
        plan.scene_id, labels, pa.array(rows).cast(pa.string()), pa.array(cols).cast(pa.string()), ":"
    )
    columns = pa.table(
        {
            "object_id": object_ids,
            "label": labels,
            "score": (np.asarray(score_sums) / np.maximum(pixels, 1)).astype(np.float32),
            "pixels": np.asarray(pixels, np.int64),
            "area_m2": np.asarray(areas, np.float64),
        }
    )
    return wkb_rows(columns, shapes.wkb, shapes.bounds)


def _polygons(plan: MosaicPlan, runs: Runs) -> WkbPolygons:
    """The objects' ids and polygons, in longitude/latitude, from their boundary runs."""
    return polygon_wkb(runs, plan.georeference.lonlat)


def _join(blocks: dict[BlockKey, BorderPieces], large: int) -> tuple[ObjectTable, dict[BlockKey, np.ndarray]]:
    """Step 2: join border pieces that touch across seams into objects, and bucket them for tracing (objects
    of more than ``large`` pixels alone: see :func:`_crossing_buckets`).

    Returns the objects and, per block, the object id of each of its border pieces.
    """
    from scipy.sparse import coo_matrix  # on the driver only: a tenth of a block task worker's imports
    from scipy.sparse.csgraph import connected_components

    bases, total = {}, 0
    for key, pieces in blocks.items():
        bases[key] = total
        total += len(pieces.ids)
    edges = [_seam_edges(blocks, bases, key) for key in blocks]
    src, dst = (np.concatenate([e[i] for e in edges]) if edges else np.zeros(0, np.int64) for i in (0, 1))
    graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(total, total))
    _, component = connected_components(graph, directed=False)
    count = int(component.max(initial=-1)) + 1
    first = np.full(count, np.iinfo(np.int64).max)
    np.minimum.at(first, component, _concat(blocks, "first"))
    codes = np.empty(count, np.int64)
    codes[component] = _concat(blocks, "codes")  # an object's pieces share their label

    def summed(field: str) -> np.ndarray:
        return np.bincount(component, _concat(blocks, field), minlength=count)

    pixels = summed("pixels").astype(np.int64)  # sums of counts: exact in float64 below 2**53
    order = np.argsort(first)
    table = ObjectTable(
        first[order] + 1, codes[order], pixels[order], summed("score_sums")[order], summed("areas")[order],
        _crossing_buckets(pixels[order], large),
    )  # fmt: skip
    object_of = {key: first[component[base : base + len(blocks[key].ids)]] + 1 for key, base in bases.items()}
    return table, object_of


def _crossing_buckets(pixels: np.ndarray, large: int) -> np.ndarray:
    """A tracing bucket for each object.

    Each object of more than ``large`` pixels has a bucket of its own, numbered first, largest first:
    they are traced one after the other (see :func:`vectorize`), so that no two are in memory at once. The
    others are spread so that the buckets' pixels are about equal (largest first, each to the least-filled
    bucket), over at least ``_CROSSING_BUCKETS`` buckets and one per ``_CROSSING_PER_BUCKET`` objects.
    """
    bucket = np.empty(len(pixels), np.int64)
    big = np.flatnonzero(pixels > large)
    bucket[big[np.argsort(-pixels[big], kind="stable")]] = np.arange(len(big))
    small = np.flatnonzero(pixels <= large)
    buckets = max(min(len(small), _CROSSING_BUCKETS), -(-len(small) // _CROSSING_PER_BUCKET))
    filled = [(0, b) for b in range(len(big), len(big) + buckets)]
    for i in small[np.argsort(-pixels[small], kind="stable")]:
        total, b = heapq.heappop(filled)
        bucket[i] = b
        heapq.heappush(filled, (total + int(pixels[i]), b))
    return bucket


def _seam_edges(blocks, bases, key) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of global piece indices joined across the right and bottom seams of block ``key`` (the strips
    hold a piece's id only where the same label lies across, so any two there touch)."""
    i, j = key
    here = blocks[key]
    pairs = []
    for neighbour, mine, theirs in (((i, j + 1), here.right, "left"), ((i + 1, j), here.bottom, "top")):
        if neighbour not in blocks:
            continue
        other = getattr(blocks[neighbour], theirs)
        touching = mine > 0
        a = bases[key] + np.searchsorted(here.ids, mine[touching])
        b = bases[neighbour] + np.searchsorted(blocks[neighbour].ids, other[touching])
        pairs.append((a, b))
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def _concat(blocks: dict[BlockKey, BorderPieces], field: str) -> np.ndarray:
    arrays = [getattr(p, field) for p in blocks.values()]
    return np.concatenate(arrays).astype(np.float64 if field in ("score_sums", "areas") else np.int64)


@dataclass(frozen=True, slots=True)
class PieceObjects:
    """What step 3 needs for one block: its border pieces' object ids and those objects."""

    ids: np.ndarray  # local ids of the block's border pieces ...
    object_ids: np.ndarray  # ... and their object ids
    objects: ObjectTable


def _instances(
    plan: MosaicPlan, key: BlockKey, where: tuple[slice, slice], pieces: PieceObjects, overview: Mosaic | None
) -> None:
    """Step 3 for one block: write its ``instance`` array (and overview level 2 of it, if asked), and sort its
    border pieces' staged runs into their objects' tracing buckets."""
    _heap(keep=True)
    label = mosaic_array(plan.path, "label")[where]
    components = _components(label, plan.codes, where, plan.width)  # again: cheaper than staging its ids
    object_of_local = np.concatenate(([0], components.first + 1))
    object_of_local[pieces.ids] = pieces.object_ids
    instance = object_of_local.astype(plan.instance_dtype)[components.local]
    mosaic_array(plan.path, "instance")[where] = instance  # whole chunks: aligned writes
    if overview is not None:
        write_overview_chunk(overview, 2, key, {"instance": instance})
    del label, instance, components
    staged = _staged_runs([_staged_pieces(plan.staging, key)])
    runs = dataclasses.replace(staged, ids=object_of_local[staged.ids])
    bucket_of = pieces.objects.bucket[np.searchsorted(pieces.objects.ids, runs.ids)]
    for bucket in np.unique(bucket_of):
        folder = plan.staging / "runs" / str(bucket)
        folder.mkdir(exist_ok=True)
        _stage(runs.select(bucket_of == bucket).table(), folder / f"{key[0]}_{key[1]}.arrow")


def _stage(table: pa.Table, path: Path) -> None:
    """Stage a task's output for the driver or a later task: uncompressed Arrow IPC, read back without
    decoding (these files live only until the scene's catalog is written; LZ4 saved a fifth of their bytes
    for five times the CPU of writing and reading them)."""
    feather.write_feather(table, path, compression="uncompressed")


def _staged_rows(staging: Path, key: BlockKey) -> Path:
    return staging / f"{key[0]}_{key[1]}.arrow"


def _staged_pieces(staging: Path, key: BlockKey) -> Path:
    return staging / "pieces" / f"{key[0]}_{key[1]}.arrow"


def _trace_crossing(plan: MosaicPlan, objects: ObjectTable, bucket: int, after: None = None) -> None:
    """Step 4: link the staged runs of one bucket's seam-crossing objects into their polygons; stage the rows.

    Objects are traced a group at a time, a group being one object or objects of at most
    ``_RUNS_PER_TRACE`` runs in all: linking holds about 60 bytes per run, beside the runs' 33. ``after``
    is the result of the trace this one waits for (a Dask dependency).
    """
    _heap(keep=False)  # traces hold the peak: memory counts more than page faults
    folder = plan.staging / "runs" / str(bucket)
    runs = _staged_runs(sorted(folder.glob("*.arrow")) if folder.is_dir() else [])
    cuts = []
    if len(runs) > _RUNS_PER_TRACE and len(objects.ids) > 1:  # in groups: each object's runs together
        order = np.argsort(runs.ids, kind="stable")
        for name in Runs.__slots__:  # in place, a field at a time: a copy of all of them is 33 bytes a run
            getattr(runs, name)[:] = getattr(runs, name)[order]
        del order
        starts = np.flatnonzero(np.diff(runs.ids, prepend=-1))  # each object's first run
        cuts = starts[np.flatnonzero(np.diff(starts // _RUNS_PER_TRACE, prepend=-1))][1:]
    traced = [_polygons(plan, runs.select(np.s_[a:b])) for a, b in zip([0, *cuts], [*cuts, len(runs)])]
    del runs
    partial = plan.staging / "crossing" / f"{bucket}.partial"
    _stage(objects.rows(plan, WkbPolygons.concat(traced)), partial)
    partial.rename(partial.with_suffix(".arrow"))  # whole, for the caller waiting for it
    _heap(keep=False)


def _traced(staging: Path, bucket: int, tracing: Future) -> Path:
    """The rows staged by bucket ``bucket``'s trace, once they are (or the error of ``tracing``, the traces'
    computation, if it ends first)."""
    path = staging / "crossing" / f"{bucket}.arrow"
    while not path.exists() and not tracing.done():
        time.sleep(0.02)
    if tracing.done():
        tracing.result()  # a trace's error, if any
    return path


def _staged_runs(files: list[Path]) -> Runs:
    """The runs staged in ``files``, copied into one set of arrays from the files memory-mapped one at a
    time, so that memory holds each run once."""
    runs = Runs.empty(sum(feather.read_table(f, memory_map=True).num_rows for f in files))
    at = 0
    for f in files:
        table = feather.read_table(f, memory_map=True)
        for name in Runs.__slots__:
            getattr(runs, name)[at : at + len(table)] = table[name].to_numpy()
        at += len(table)
    return runs


def _heap(keep: bool) -> None:
    """How the worker's heap treats large arrays from now on (glibc; one malloc arena per worker, see
    ``pipeline.WORKER_ENVIRONMENT``).

    ``keep``: arrays up to 256 MiB, NumPy's and Arrow's, come from the heap, which keeps up to 512 MiB free
    for the next task.
    Mapped afresh for every block, a block's arrays (16-32 MiB) took a page fault per 4 KiB: 40 % of
    writing its ``instance``. Otherwise (traces, which hold the peak): large arrays are mapped and unmapped
    again (glibc's defaults), and what the heap and Arrow's pool keep is handed back now.
    """
    mmap, trim = (256 * 2**20, 512 * 2**20) if keep else (128 * 2**10, 128 * 2**10)
    pa.set_memory_pool(pa.system_memory_pool())  # Arrow's buffers too (mimalloc took a fault a page: 1.2 ms a chunk)
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        libc = _libc()
        libc.mallopt(_M_MMAP_THRESHOLD, mmap)
        libc.mallopt(_M_TRIM_THRESHOLD, trim)
        if not keep:
            pa.default_memory_pool().release_unused()
            libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")
