"""Catalog rows in Arrow, as the stages that find objects make them: GeoParquet 1.1 columns (WKB ``geometry``
in EPSG:4326 and a ``bbox`` covering struct), rows in Hilbert order.

Apart from :mod:`geobatch.catalog` so that vectorising's Ray workers import NumPy, Arrow and shapely only,
not the catalog's reading side (geopandas, pandas, DuckDB: half a second of every worker's start).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely

HILBERT_ORDER = 16  # rows are sorted along a Hilbert curve through 2**16 x 2**16 cells of their extent

log = logging.getLogger(__name__)


def geoparquet_rows(columns: pa.Table, geometries: np.ndarray) -> pa.Table:
    """Rows with their EPSG:4326 shapely ``geometries`` as GeoParquet rows in Arrow (see :func:`wkb_rows`)."""
    return wkb_rows(columns, pa.array(shapely.to_wkb(geometries), pa.binary()), shapely.bounds(geometries))


def wkb_rows(columns: pa.Table, wkb: pa.Array, bounds: np.ndarray) -> pa.Table:
    """Rows with their EPSG:4326 geometries, as WKB and bounds (xmin, ymin, xmax, ymax), as GeoParquet rows in
    Arrow: the ``geometry`` and a ``bbox`` struct column appended, rows Hilbert-sorted by their bounds' centres.

    Geometries without finite bounds are stored missing: missing or empty ones, and those that do not map into
    EPSG:4326 (e.g. corners off a geostationary disk).
    """
    located = np.isfinite(bounds).all(axis=1)
    if not located.all():
        unmapped = np.count_nonzero(~located & wkb.is_valid().to_numpy(zero_copy_only=False))
        if unmapped:
            log.warning(
                "%d geometries are empty or do not map to longitude/latitude; stored without geometry", unmapped
            )
        wkb = pc.if_else(pa.array(located), wkb, pa.scalar(None, wkb.type))
    order = spatial_order(bounds)
    located, bounds = located[order], bounds[order]
    boxes = [pa.array(bounds[:, i], mask=~located) for i in range(4)]
    bbox = pa.StructArray.from_arrays(boxes, names=["xmin", "ymin", "xmax", "ymax"], mask=pa.array(~located))
    geometry = wkb.take(pa.array(order))
    return columns.take(order).append_column("geometry", geometry).append_column("bbox", bbox).replace_schema_metadata()


def spatial_order(bounds: np.ndarray) -> np.ndarray:
    """Row order along a Hilbert curve over the bounds' centres (in their extent); rows without bounds go last."""
    located = np.isfinite(bounds).all(axis=1)
    key = np.full(len(bounds), np.iinfo(np.int64).max)
    if located.any():
        centres = (bounds[located, :2] + bounds[located, 2:]) / 2
        low, span = centres.min(axis=0), np.ptp(centres, axis=0)
        cells = (centres - low) / np.where(span > 0, span, 1) * (2**HILBERT_ORDER - 1)
        key[located] = _hilbert_distance(*cells.astype(np.int64).T)
    return np.argsort(key, kind="stable")


def _hilbert_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distances along the Hilbert curve through a 2**HILBERT_ORDER square grid of the cells (x, y)."""
    distance = np.zeros(len(x), np.int64)
    last = 2**HILBERT_ORDER - 1
    for level in range(HILBERT_ORDER - 1, -1, -1):
        s = 1 << level
        right, up = (x & s) > 0, (y & s) > 0
        distance += s * s * ((3 * right) ^ up)
        flip = ~up & right  # rotate the quadrant so that the curve's sub-square starts where it enters
        x, y = np.where(flip, last - x, x), np.where(flip, last - y, y)
        x, y = np.where(~up, y, x), np.where(~up, x, y)
    return distance
