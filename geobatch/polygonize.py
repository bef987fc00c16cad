"""Exact polygons of the regions of an id raster, built from pixel edges (the loops are Numba kernels).

A region is the set of pixels holding one id; its polygons follow the pixel edges between it and any
other value (4-connectivity: pixels that touch only at a corner are not joined). This is what
``rasterio.features.shapes`` (GDAL's polygoniser) returns, 4-8x faster on dense masks, and it can
trace a region from boundary runs gathered in several pieces: the runs of a region cut by chunk seams
can be extracted per chunk and traced together, without its pixels ever being in one place.

Coordinates are pixel corners: ``(x, y) = (column, row)``, y pointing down. A run of edges is stored
with its region on its right-hand side, so exterior rings run clockwise on screen and holes
anticlockwise. Every ring starts at its top-left vertex and has no collinear vertices, so a region's
polygon is the same however its runs were cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numba
import numpy as np
import pyarrow as pa
import shapely

_STEP_X = np.array([1, 0, -1, 0])  # direction 0: +x (a pixel's top edge), 1: +y (right edge),
_STEP_Y = np.array([0, 1, 0, -1])  # 2: -x (bottom edge), 3: -y (left edge)
_RUN_DTYPES = (np.int64, np.int64, np.int64, np.int8, np.int64)  # the fields of Runs


@dataclass(frozen=True, slots=True)
class Runs:
    """Straight runs of region boundary: region id, start vertex, direction (0-3) and length in pixels."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    direction: np.ndarray
    length: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, keep: np.ndarray) -> Runs:
        return Runs(*(getattr(self, f.name)[keep] for f in fields(self)))

    def table(self) -> pa.Table:
        return pa.table({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def empty(cls, count: int) -> Runs:
        return cls(*(np.empty(count, dtype) for dtype in _RUN_DTYPES))

    @classmethod
    def concat(cls, parts: Sequence[Runs]) -> Runs:
        if not parts:
            return cls(*(np.zeros(0, np.int64) for _ in fields(cls)))
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def boundary_runs(padded: np.ndarray, origin: tuple[int, int] = (0, 0)) -> Runs:
    """The boundary runs of the non-zero pixels of ``padded[1:-1, 1:-1]``.

    The one-pixel frame around them says what lies beyond (zeros, or a neighbouring chunk's ids), so a
    region continuing past the frame gets no edge there. ``origin`` (row, column) of the first inner
    pixel places the runs in a larger raster.
    """
    padded = np.ascontiguousarray(padded)
    if padded.dtype.kind not in "iu":
        padded = padded.astype(np.int64)
    capacity = padded.size // 4  # more than enough but for a checkerboard (untouched pages cost no memory)
    while True:
        runs = Runs.empty(capacity)
        count = _scan_runs(padded, *origin, runs.ids, runs.x, runs.y, runs.direction, runs.length)
        if count <= capacity:
            return runs.select(np.s_[:count])
        capacity = count


def polygons(runs: Runs, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each region's id and its geometry (a Polygon, or a MultiPolygon for a region in several parts).

    ``transform`` takes an (n, 2) array of pixel-corner coordinates to the coordinates wanted (e.g. longitude
    and latitude); applied to the coordinate arrays, it costs much less than transforming the polygons.
    """
    if not len(runs):
        return np.zeros(0, np.int64), np.zeros(0, dtype=object)
    return _shapes(_ordered_rings(runs, transform))


@dataclass(frozen=True, slots=True)
class WkbPolygons:
    """Regions' ids, their geometries as WKB (an Arrow array) and their bounds (n x 4: xmin, ymin, xmax, ymax)."""

    ids: np.ndarray
    wkb: pa.Array
    bounds: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[WkbPolygons]) -> WkbPolygons:
        return cls(
            np.concatenate([p.ids for p in parts]),
            pa.concat_arrays([p.wkb for p in parts]),
            np.concatenate([p.bounds for p in parts]),
        )


def polygon_wkb(runs: Runs, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> WkbPolygons:
    """What :func:`polygons` makes, with the geometries as (little-endian) WKB written straight from the
    coordinate arrays: making the shapely objects, then their WKB, costs 20x more."""
    if not len(runs):
        return WkbPolygons(np.zeros(0, np.int64), pa.array([], pa.binary()), np.zeros((0, 4)))
    rings = _ordered_rings(runs, transform)
    if not rings.one_part_each:  # rare (instance rasters): through shapely
        ids, shapes = _shapes(rings)
        return WkbPolygons(ids, pa.array(shapely.to_wkb(shapes), pa.binary()), shapely.bounds(shapes))
    offsets, data, bounds = _write_wkb(np.ascontiguousarray(rings.coords, np.float64), *rings.offsets)
    wkb = pa.BinaryArray.from_buffers(pa.binary(), len(bounds), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return WkbPolygons(rings.ids[rings.exterior], wkb, bounds)


@dataclass(frozen=True, slots=True)
class _OrderedRings:
    """Closed rings by region, each region's exterior ring(s) first, with their coordinates before and after
    the transform, and the offsets of the rings and of the polygons (each exterior ring and the holes after it)
    into them, as ``shapely.from_ragged_array`` takes them."""

    ids: np.ndarray
    exterior: np.ndarray
    pixel_coords: np.ndarray
    coords: np.ndarray
    offsets: tuple[np.ndarray, np.ndarray]

    @property
    def one_part_each(self) -> bool:
        """Every region has one exterior ring: its holes follow it."""
        return np.count_nonzero(self.exterior) == len(np.unique(self.ids))


def _ordered_rings(runs: Runs, transform: Callable[[np.ndarray], np.ndarray] | None) -> _OrderedRings:
    ring_ids, x, y, counts = _rings(runs)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    twice_area = np.add.reduceat(x * _ring_next(y, starts, counts) - _ring_next(x, starts, counts) * y, starts)
    exterior = twice_area > 0  # clockwise on screen (y down)
    order = np.lexsort((~exterior, ring_ids))  # by region, its exterior ring(s) first
    pixel_coords, ring_offsets = _closed_rings(x, y, starts, counts, order)
    coords = pixel_coords if transform is None else transform(pixel_coords)
    exterior = exterior[order]
    polygon_offsets = np.append(np.flatnonzero(exterior), len(order))
    return _OrderedRings(ring_ids[order], exterior, pixel_coords, coords, (ring_offsets, polygon_offsets))


def _shapes(rings: _OrderedRings) -> tuple[np.ndarray, np.ndarray]:
    """The regions' ids and their geometries (a Polygon, or a MultiPolygon for a region in several parts)."""
    if rings.one_part_each:
        shapes = shapely.from_ragged_array(shapely.GeometryType.POLYGON, rings.coords, rings.offsets)
        return rings.ids[rings.exterior], shapes
    split = rings.offsets[0][1:-1]
    return _multipart(rings.ids, rings.exterior, np.split(rings.pixel_coords, split), np.split(rings.coords, split))


def _rings(runs: Runs) -> tuple[np.ndarray, ...]:
    """Link runs into closed rings; returns each ring's region id, its vertices in order, and vertex counts.

    Rings come by region, then by their first vertex, the top-left one (the smallest (y, x)).
    """
    end_x = runs.x + _STEP_X[runs.direction] * runs.length
    end_y = runs.y + _STEP_Y[runs.direction] * runs.length
    x0, y0 = min(runs.x.min(), end_x.min()), min(runs.y.min(), end_y.min())
    width = int(max(runs.x.max(), end_x.max()) - x0) + 1
    height = int(max(runs.y.max(), end_y.max()) - y0) + 1
    region = runs.ids - runs.ids.min()
    if (int(region.max()) + 1) * height * width >= 2**62:  # keys would overflow: number the regions densely
        region = np.unique(runs.ids, return_inverse=True)[1].astype(np.int64)
    start_key = (region * height + (runs.y - y0)) * width + (runs.x - x0)
    end_key = (region * height + (end_y - y0)) * width + (end_x - x0)
    del end_x, end_y, region  # the largest objects have millions of runs: free early
    order, counts = _link(start_key, end_key, runs.direction)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return runs.ids[order][first], runs.x[order], runs.y[order], counts


def _ring_next(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``values`` shifted by one vertex within each ring (the last vertex is followed by the first)."""
    shifted = np.roll(values, -1)
    shifted[starts + counts - 1] = values[starts]
    return shifted


def _closed_rings(x, y, starts, counts, order) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of the rings in ``order``, each closed by repeating its first vertex, and ring offsets."""
    closed_counts = counts[order] + 1
    offsets = np.concatenate(([0], np.cumsum(closed_counts)))
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], closed_counts)
    within[offsets[1:] - 1] = 0  # the closing vertex is the first one again
    index = np.repeat(starts[order], closed_counts) + within
    return np.column_stack((x[index], y[index])).astype(np.float64), offsets


def _multipart(ids: np.ndarray, exterior: np.ndarray, pixel_rings: list[np.ndarray], rings: list[np.ndarray]):
    """Regions with several parts: each hole goes to the smallest shell of its region that contains it
    (found in pixel coordinates; the polygons are made of ``rings``, the same rings transformed)."""
    regions, geometries = np.unique(ids), []
    for region in regions:
        members = np.flatnonzero(ids == region)
        shells = [i for i in members if exterior[i]]
        holes_of: list[list[np.ndarray]] = [[] for _ in shells]
        for hole in (i for i in members if not exterior[i]):
            holes_of[_owner(pixel_rings[hole], [pixel_rings[i] for i in shells])].append(rings[hole])
        parts = [shapely.Polygon(rings[shell], holes) for shell, holes in zip(shells, holes_of)]
        geometries.append(parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts))
    return regions, np.asarray(geometries, dtype=object)


def _owner(hole: np.ndarray, shells: list[np.ndarray]) -> int:
    """The smallest of ``shells`` containing a pixel centre just inside ``hole`` (left of its first edge)."""
    if len(shells) == 1:
        return 0
    (x0, y0), (x1, y1) = hole[0], hole[1]
    dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
    inside = shapely.Point(x0 + 0.5 * dx + 0.5 * dy, y0 + 0.5 * dy - 0.5 * dx)
    candidates = np.asarray([shapely.Polygon(shell) for shell in shells], dtype=object)
    containing = np.flatnonzero(shapely.contains(candidates, inside))
    return int(containing[np.argmin(shapely.area(candidates[containing]))])


@numba.njit(cache=True, nogil=True)
def _scan_runs(padded, row0, col0, ids, x, y, direction, length):
    """One row-major pass over the inner pixels: writes the runs while they fit, returns how many there are."""
    height, width = padded.shape[0] - 2, padded.shape[1] - 2
    n = 0
    right_start = np.full(width, -1, np.int64)  # per column: first row of the open run of right edges ...
    right_id = np.zeros(width, padded.dtype)  # ... and its id
    left_start = np.full(width, -1, np.int64)
    left_id = np.zeros(width, padded.dtype)
    for r in range(height + 1):
        top_start = bottom_start = -1
        top_id = bottom_id = padded[0, 0]
        for c in range(width + 1):
            inside = r < height and c < width
            v = padded[r + 1, c + 1] if inside else padded[0, 0] * 0
            if (
                inside
                and top_start < 0
                and bottom_start < 0
                and right_start[c] < 0
                and left_start[c] < 0
                and v == padded[r, c + 1] == padded[r + 2, c + 1] == padded[r + 1, c + 2] == padded[r + 1, c]
            ):
                continue  # inside a region or the background, with no run open: nothing to write or to close
            # horizontal runs: top (+x) and bottom (-x) edges
            top = inside and v != 0 and v != padded[r, c + 1]
            if top_start >= 0 and not (top and v == top_id):
                if n < len(ids):
                    ids[n], x[n], y[n], direction[n], length[n] = top_id, col0 + top_start, row0 + r, 0, c - top_start
                n += 1
                top_start = -1
            if top and top_start < 0:
                top_start, top_id = c, v
            bottom = inside and v != 0 and v != padded[r + 2, c + 1]
            if bottom_start >= 0 and not (bottom and v == bottom_id):
                if n < len(ids):
                    ids[n], x[n], y[n], direction[n], length[n] = bottom_id, col0 + c, row0 + r + 1, 2, c - bottom_start
                n += 1
                bottom_start = -1
            if bottom and bottom_start < 0:
                bottom_start, bottom_id = c, v
            if c == width:
                continue
            # vertical runs, one open per column: right (+y) and left (-y) edges
            right = inside and v != 0 and v != padded[r + 1, c + 2]
            if right_start[c] >= 0 and not (right and v == right_id[c]):
                if n < len(ids):
                    ids[n], x[n], y[n], direction[n], length[n] = (
                        right_id[c],
                        col0 + c + 1,
                        row0 + right_start[c],
                        1,
                        r - right_start[c],
                    )
                n += 1
                right_start[c] = -1
            if right and right_start[c] < 0:
                right_start[c], right_id[c] = r, v
            left = inside and v != 0 and v != padded[r + 1, c]
            if left_start[c] >= 0 and not (left and v == left_id[c]):
                if n < len(ids):
                    ids[n], x[n], y[n], direction[n], length[n] = left_id[c], col0 + c, row0 + r, 3, r - left_start[c]
                n += 1
                left_start[c] = -1
            if left and left_start[c] < 0:
                left_start[c], left_id[c] = r, v
    return n


@numba.njit(cache=True, nogil=True)
def _home(key, mask):
    """The first slot tried for ``key`` in a hash table of ``mask + 1`` slots (Fibonacci hashing)."""
    return np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)) & mask


@numba.njit(cache=True, nogil=True)
def _starting_at(table, start_key, key, s, mask):
    """From slot ``s`` on, the next slot of ``table`` holding a run that starts at ``key`` (-1: none left)."""
    while table[s] != -1 and start_key[table[s]] != key:
        s = (s + 1) & mask
    return s if table[s] != -1 else -1


@numba.njit(cache=True, nogil=True)
def _successors(start_key, end_key, direction):
    """The run that follows each run along its region's boundary (the one starting where it ends), and the
    pairs of runs arriving at a pinch, a vertex where a region touches itself only at a corner: there, two
    runs leave, and the one turning right is taken, so that the diagonal pixels stay apart."""
    n = len(start_key)
    size = 1
    while size < 2 * n:
        size *= 2
    mask = size - 1
    # a hash table of the runs by start key, holding run indexes only (open addressing, the key read from
    # ``start_key``): 4 bytes a slot, where keys and values took 20 and the largest objects have millions of runs
    table = np.full(size, -1, np.int32)
    for i in range(n):
        s = _home(start_key[i], mask)
        while table[s] != -1:
            s = (s + 1) & mask
        table[s] = i
    successor = np.empty(n, np.int32)
    arrived = np.full(n, -1, np.int32)  # per pinch (named by its first run), the first run arriving there
    pairs = np.empty((n // 2, 2), np.int32)
    npairs = 0
    for i in range(n):
        s = _starting_at(table, start_key, end_key[i], _home(end_key[i], mask), mask)
        if s < 0:  # else a ring walk would never get back to its head
            raise ValueError("boundary runs that do not close into rings (some of a region's runs are missing)")
        first = table[s]
        other = _starting_at(table, start_key, end_key[i], (s + 1) & mask, mask)
        if other < 0:
            successor[i] = first
            continue
        second = table[other]
        successor[i] = first if direction[first] == (direction[i] + 1) % 4 else second
        pinch = min(first, second)
        if arrived[pinch] < 0:
            arrived[pinch] = i
        else:
            pairs[npairs, 0], pairs[npairs, 1] = arrived[pinch], i
            npairs += 1
    return successor, pairs[:npairs]


@numba.njit(cache=True, nogil=True)
def _link(start_key, end_key, direction):
    """Ring order of runs: for each ring (sorted by its head, the run of smallest start key), the runs that
    start a corner, from the head on. Returns those runs' indexes and each ring's count."""
    n = len(start_key)
    successor, pairs = _successors(start_key, end_key, direction)
    if len(pairs):  # a ring passing one pinch twice splits into two simple rings there
        ring = _cycles(successor)
        for p in range(len(pairs)):
            a, b = pairs[p, 0], pairs[p, 1]
            if ring[a] == ring[b]:
                successor[a], successor[b] = successor[b], successor[a]
    ring = _cycles(successor)
    rings = ring.max() + 1 if n else 0
    head = np.full(rings, -1, np.int64)
    for i in range(n):
        r = ring[i]
        if head[r] < 0 or start_key[i] < start_key[head[r]]:
            head[r] = i
    order = np.empty(n, np.int64)
    counts = np.zeros(rings, np.int64)
    kept = 0
    for k, r in enumerate(np.argsort(start_key[head])):
        i = head[r]
        previous = -1
        while True:
            if direction[i] != previous:
                order[kept] = i
                kept += 1
                counts[k] += 1
            previous = direction[i]
            i = successor[i]
            if i == head[r]:
                break
    return order[:kept], counts


@numba.njit(cache=True, nogil=True)
def _cycles(successor):
    ring = np.full(len(successor), -1, np.int32)
    rings = 0
    for start in range(len(successor)):
        if ring[start] >= 0:
            continue
        i = start
        while ring[i] < 0:
            ring[i] = rings
            i = successor[i]
        rings += 1
    return ring


@numba.njit(cache=True, nogil=True)
def _write_wkb(coords, ring_offsets, polygon_offsets):
    """Polygons as little-endian WKB, one after the other: their offsets (int32) and bytes; and their bounds."""
    polygons = len(polygon_offsets) - 1
    offsets = np.zeros(polygons + 1, np.int32)  # a batch's WKB is far below 2 GiB
    for p in range(polygons):
        rings = polygon_offsets[p + 1] - polygon_offsets[p]
        points = ring_offsets[polygon_offsets[p + 1]] - ring_offsets[polygon_offsets[p]]
        offsets[p + 1] = offsets[p] + 9 + 4 * rings + 16 * points
    data = np.empty(offsets[-1], np.uint8)
    values = coords.ravel().view(np.uint8)
    bounds = np.empty((polygons, 4))
    for p in range(polygons):
        at = offsets[p]
        data[at] = 1  # little-endian
        _put_uint32(data, at + 1, 3)  # Polygon
        _put_uint32(data, at + 5, polygon_offsets[p + 1] - polygon_offsets[p])
        at += 9
        for r in range(polygon_offsets[p], polygon_offsets[p + 1]):
            first, last = ring_offsets[r], ring_offsets[r + 1]
            _put_uint32(data, at, last - first)
            data[at + 4 : at + 4 + 16 * (last - first)] = values[16 * first : 16 * last]
            at += 4 + 16 * (last - first)
        shell = coords[ring_offsets[polygon_offsets[p]] : ring_offsets[polygon_offsets[p] + 1]]
        bounds[p] = shell[:, 0].min(), shell[:, 1].min(), shell[:, 0].max(), shell[:, 1].max()
    return offsets, data, bounds


@numba.njit(cache=True, nogil=True)
def _put_uint32(data, at, value):
    for i in range(4):
        data[at + i] = (value >> (8 * i)) & 255
