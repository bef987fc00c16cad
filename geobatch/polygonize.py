"""Exact polygons of the regions of an id raster, built from pixel edges with NumPy.

A region is the set of pixels holding one id; its polygons follow the pixel edges between it and any
other value (4-connectivity: pixels that touch only at a corner are not joined). This is what
``rasterio.features.shapes`` (GDAL's polygoniser) returns, 2-3x faster on dense masks, and it can
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

import numpy as np
import shapely
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

_STEP_X = np.array([1, 0, -1, 0])  # direction 0: +x (a pixel's top edge), 1: +y (right edge),
_STEP_Y = np.array([0, 1, 0, -1])  # 2: -x (bottom edge), 3: -y (left edge)


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
    core = padded[1:-1, 1:-1]
    row0, col0 = origin
    parts = []
    for direction, neighbour in enumerate((padded[:-2, 1:-1], padded[1:-1, 2:], padded[2:, 1:-1], padded[1:-1, :-2])):
        edge = (core != neighbour) & (core != 0)
        horizontal = direction in (0, 2)
        ids, rows, cols, length = _runs_of(edge if horizontal else edge.T, core if horizontal else core.T)
        if not horizontal:
            rows, cols = cols, rows
        x, y = {  # where each run starts, walking with the region on its right
            0: (cols, rows),
            1: (cols + 1, rows),
            2: (cols + length, rows + 1),
            3: (cols, rows + length),
        }[direction]
        parts.append(Runs(ids.astype(np.int64), x + col0, y + row0, np.full(len(ids), direction, np.int8), length))
    return Runs.concat(parts)


def _runs_of(edge: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Maximal runs along rows of ``edge`` pixels with equal values: value, row, first column, length."""
    rows, cols = np.nonzero(edge)
    ids = values[rows, cols]
    starts = np.ones(len(rows), bool)
    starts[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1) | (ids[1:] != ids[:-1])
    first = np.flatnonzero(starts)
    length = np.diff(np.append(first, len(rows)))
    return ids[first], rows[first].astype(np.int64), cols[first].astype(np.int64), length.astype(np.int64)


def polygons(runs: Runs, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each region's id and its geometry (a Polygon, or a MultiPolygon for a region in several parts).

    ``transform`` takes an (n, 2) array of pixel-corner coordinates to the coordinates wanted (e.g. longitude
    and latitude); applied to the coordinate arrays, it costs much less than transforming the polygons.
    """
    if not len(runs):
        return np.zeros(0, np.int64), np.zeros(0, dtype=object)
    ring_ids, x, y, counts = _rings(runs)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    twice_area = np.add.reduceat(x * _ring_next(y, starts, counts) - _ring_next(x, starts, counts) * y, starts)
    exterior = twice_area > 0  # clockwise on screen (y down)
    order = np.lexsort((~exterior, ring_ids))  # by region, its exterior ring(s) first
    pixel_coords, ring_offsets = _closed_rings(x, y, starts, counts, order)
    coords = pixel_coords if transform is None else transform(pixel_coords)
    exterior, ring_ids = exterior[order], ring_ids[order]
    if np.count_nonzero(exterior) == len(np.unique(ring_ids)):  # one part each: holes follow their shell
        polygon_offsets = np.append(np.flatnonzero(exterior), len(order))
        shapes = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_offsets, polygon_offsets))
        return ring_ids[exterior], shapes
    split = ring_offsets[1:-1]
    return _multipart(ring_ids, exterior, np.split(pixel_coords, split), np.split(coords, split))


def _rings(runs: Runs) -> tuple[np.ndarray, ...]:
    """Link runs into closed rings; returns each ring's region id, its vertices in order, and vertex counts."""
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
    by_start = np.argsort(start_key)
    successor = _successors(start_key, end_key, by_start, runs.direction)
    del start_key, end_key, end_x, end_y, region  # the largest objects have millions of runs: free early
    ring, order = _ring_order(successor, by_start)
    del successor, by_start
    turns = _corners(runs.direction[order], ring[order])
    order = order[turns]  # collinear vertices (runs continued across a seam) dropped
    counts = np.bincount(ring[order])
    counts = counts[counts > 0]
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return runs.ids[order][first], runs.x[order], runs.y[order], counts


def _successors(start_key, end_key, by_start, direction) -> np.ndarray:
    """The run that follows each run along its region's boundary.

    Where a region touches itself only at a corner (a pinch: two runs leave the vertex), turn right, so
    that the diagonal pixels stay apart; then, where a ring passes one pinch twice, swap the two choices
    so that it splits into two simple rings (a shell and a hole, or two holes, touching at a point),
    which is how OGC (and GDAL) draw it.
    """
    sorted_keys = start_key[by_start]
    found = np.searchsorted(sorted_keys, end_key)
    other = np.minimum(found + 1, len(start_key) - 1)
    pinch = (other != found) & (sorted_keys[other] == end_key)
    del sorted_keys  # (memory: the largest objects have millions of runs)
    successor = by_start[found]
    arriving = np.flatnonzero(pinch)  # the two runs arriving at each pinch vertex
    turn = arriving[direction[successor[arriving]] != (direction[arriving] + 1) % 4]
    successor[turn] = by_start[other[turn]]
    del found, other
    if not len(arriving):
        return successor
    arriving = arriving[np.argsort(end_key[arriving], kind="stable")]
    a, b = arriving[0::2], arriving[1::2]
    ring = _cycles(successor)
    same = ring[a] == ring[b]
    a, b = a[same], b[same]
    successor[a], successor[b] = successor[b], successor[a].copy()
    return successor


def _cycles(successor: np.ndarray) -> np.ndarray:
    n = len(successor)
    index = np.int32 if n < 2**31 else np.int64
    graph = csr_matrix((np.ones(n, np.int8), successor.astype(index), np.arange(n + 1, dtype=index)), shape=(n, n))
    return connected_components(graph, directed=True, connection="weak")[1]


def _ring_order(successor: np.ndarray, by_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each run's ring, and the runs in ring order: rings one after the other, each from its top-left vertex.

    Pointer jumping (list ranking): log2(longest ring) passes of vectorised gathers; then each run goes
    straight to its place (no sort).
    """
    n = len(successor)
    ring = _cycles(successor)
    key_rank = np.empty(n, np.intp)
    key_rank[by_start] = np.arange(n)
    head_rank = np.full(ring.max() + 1, n, np.intp)
    np.minimum.at(head_rank, ring, key_rank)
    last = (key_rank == head_rank[ring])[successor]  # the run whose successor is its ring's head ends the ring
    del key_rank, head_rank
    link = np.where(last, np.arange(n), successor)
    to_end = (~last).astype(np.int32)
    while True:
        jumped = link[link]
        if np.array_equal(jumped, link):
            break
        to_end += to_end[link]
        link = jumped
    del link, jumped
    place = np.cumsum(np.bincount(ring))[ring] - 1 - to_end  # the ring's end, less the steps to it
    order = np.empty(n, np.intp)
    order[place] = np.arange(n)
    return ring, order


def _corners(direction: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Which vertices (in ring order) turn: a run that continues the previous one's direction starts none."""
    previous = np.roll(direction, 1)
    ring_start = np.ones(len(ring), bool)
    ring_start[1:] = ring[1:] != ring[:-1]
    starts = np.flatnonzero(ring_start)
    ends = np.append(starts[1:], len(ring)) - 1
    previous[starts] = direction[ends]
    return direction != previous


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
