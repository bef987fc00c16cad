"""The catalog: GeoParquet 1.1 tables of objects, scenes and tiles, and region queries over them.

Layout under a job's output folder::

    catalog/objects.parquet   one row per object (OBJECT_COLUMNS), Hilbert-sorted, bbox covering column
    catalog/scenes.parquet    one row per scene: status, reason, footprint
    catalog/tiles.parquet     one row per tile: status, reason, core footprint

Each file is written beside its final name and moved into place, so readers never see half a file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import shapely

OBJECT_COLUMNS = (
    "object_id", "label", "phrase", "score", "area_m2", "pixels", "scene_id", "acquired_at", "run_id", "model",
)  # fmt: skip
TABLES = ("objects", "scenes", "tiles")

log = logging.getLogger(__name__)


def table_path(output: str | Path, table: str) -> Path:
    return Path(output) / "catalog" / f"{table}.parquet"


def write_table(output: str | Path, table: str, frame: gpd.GeoDataFrame) -> Path:
    """Write one catalog table as GeoParquet 1.1 (EPSG:4326, bbox covering, spatially sorted)."""
    if table not in TABLES:
        raise ValueError(f"unknown catalog table '{table}'; choose from {list(TABLES)}")
    return write_geoparquet(frame, table_path(output, table))


def write_geoparquet(frame: gpd.GeoDataFrame, path: str | Path) -> Path:
    """Write ``frame`` to ``path`` as GeoParquet 1.1 in EPSG:4326 with a bbox covering, Hilbert-sorted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = _finite(frame.to_crs(4326))
    frame = frame.iloc[_spatial_order(frame)]
    partial = path.with_name(path.name + ".partial")
    frame.to_parquet(partial, index=False, schema_version="1.1.0", write_covering_bbox=True, row_group_size=65536)
    os.replace(partial, path)
    return path


def combine_parts(output: str | Path, table: str, parts: Sequence[Path]) -> Path:
    """One catalog table from GeoParquet parts with the same columns, streamed one part at a time.

    Each part keeps its own order (Hilbert-sorted per scene) and becomes row groups of the table; the
    ``geo`` metadata is merged (bounding box, geometry types), so memory is one part, not the table.
    """
    path = table_path(output, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    schemas = [pq.read_schema(part) for part in parts]
    geo = _merged_geo([json.loads(schema.metadata[b"geo"]) for schema in schemas])
    schema = schemas[0].with_metadata({**schemas[0].metadata, b"geo": json.dumps(geo).encode()})
    partial = path.with_name(path.name + ".partial")
    with pq.ParquetWriter(partial, schema) as writer:
        for part in parts:
            writer.write_table(pq.read_table(part).cast(schema), row_group_size=65536)
    os.replace(partial, path)
    return path


def _merged_geo(documents: list[dict]) -> dict:
    merged = documents[0]
    for name, column in merged["columns"].items():
        described = [d["columns"][name] for d in documents]
        boxes = [c["bbox"] for c in described if c.get("bbox")]
        if boxes:
            column["bbox"] = [*np.min(boxes, axis=0)[:2], *np.max(boxes, axis=0)[2:]]
        column["geometry_types"] = sorted({t for c in described for t in c["geometry_types"]})
    return merged


def _finite(frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Geometries that do not map into EPSG:4326 (e.g. corners off a geostationary disk) become missing."""
    finite = np.isfinite(shapely.bounds(frame.geometry.to_numpy())).all(axis=1) | frame.geometry.isna().to_numpy()
    if finite.all():
        return frame
    log.warning("%d geometries do not map to longitude/latitude; stored without geometry", (~finite).sum())
    return frame.set_geometry(frame.geometry.where(finite, None))


def _spatial_order(frame: gpd.GeoDataFrame) -> np.ndarray:
    """Row order along a Hilbert curve over the geometries' centres; rows without geometry go last."""
    has_geometry = ~(frame.geometry.isna() | frame.geometry.is_empty).to_numpy()
    key = np.full(len(frame), np.iinfo(np.int64).max)
    if has_geometry.any():
        located = frame[has_geometry]
        key[has_geometry] = located.hilbert_distance(total_bounds=located.total_bounds)
    return np.argsort(key, kind="stable")


def query(
    output: str | Path, bbox: Sequence[float], label: str | None = None, table: str = "objects"
) -> gpd.GeoDataFrame:
    """Rows of a catalog table whose geometry intersects ``bbox`` (minx, miny, maxx, maxy in EPSG:4326).

    The bbox covering column lets the Parquet reader skip row groups outside the region; the exact
    geometry test follows on what is left.
    """
    path = table_path(output, table)
    if not path.exists():
        raise FileNotFoundError(f"no catalog table at {path}; run a job with this output first")
    filters = [("label", "==", label)] if label is not None else None
    frame = gpd.read_parquet(path, bbox=tuple(bbox), filters=filters)
    return frame[frame.intersects(shapely.box(*bbox))].reset_index(drop=True)
