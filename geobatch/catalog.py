"""The catalog: GeoParquet 1.1 datasets of objects, scenes and tiles, and the queries analysts run on them.

Layout under a job's output folder (every file GeoParquet 1.1, EPSG:4326 WKB, ``bbox`` covering column,
zstd, rows Hilbert-sorted into row groups of ``ROW_GROUP_ROWS``, or fewer of ``ROW_GROUP_BYTES``)::

    catalog/objects/<label>/<YYYY-MM>/<run_id>_<scene_id>.parquet   one file per scene, label and month
    catalog/scenes/<run_id>.parquet                                  one row per scene of the run
    catalog/tiles/<run_id>.parquet                                   one row per tile of the run
    catalog/superseded/<label>/<YYYY-MM>/<run_id>_<scene_id>.parquet objects of scenes processed again since

Partitions are plain folders (not ``label=...`` hive keys) and every file keeps all its columns, so any
reader sees whole rows: ``read_parquet('catalog/objects/**/*.parquet')`` in DuckDB, a folder or a file
in geopandas, a file in GDAL. Each run adds its own files (named by its ``run_id``); rerunning a run
rewrites them. :func:`open` gives a :class:`Catalog` whose queries prune folders by label and month,
then row groups by their ``bbox`` statistics, and refine the rest exactly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import glob
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pyproj
import shapely

from geobatch.catalog_rows import geoparquet_rows, spatial_order

if TYPE_CHECKING:
    import duckdb

OBJECT_COLUMNS = (
    "object_id", "label", "phrase", "score", "area_m2", "pixels", "scene_id", "acquired_at", "run_id", "model",
)  # fmt: skip
OPTIONAL_OBJECT_COLUMNS = ("prompt_id", "attributes")  # objects of vector prompts; model measures (JSON text)
TABLES = ("objects", "scenes", "tiles")
ROW_GROUP_ROWS = 4096  # small enough that a region query reads few rows beyond its answer
ROW_GROUP_BYTES = 16 * 2**20  # and fewer rows where they are large: memory holds one row group
UNDATED = "undated"
_ARROW_STRINGS = {
    pa.string(): pd.StringDtype("pyarrow"),
    pa.large_string(): pd.StringDtype("pyarrow"),
}.get  # the month folder of objects from scenes without an acquisition time

log = logging.getLogger(__name__)


def write_geoparquet(frame: gpd.GeoDataFrame, path: str | Path, row_group_size: int | None = None) -> Path:
    """Write ``frame`` to ``path`` as GeoParquet 1.1 (EPSG:4326, bbox covering, zstd), Hilbert-sorted.

    Written beside its final name and moved into place, so readers never see half a file.
    """
    stream = GeoParquetStream(path, row_group_size)
    stream.write(geoparquet_table(frame))
    return stream.close()


def geoparquet_table(frame: gpd.GeoDataFrame) -> pa.Table:
    """``frame`` as GeoParquet rows in Arrow (see :func:`catalog_rows.geoparquet_rows`)."""
    frame = frame.to_crs(4326)
    columns = pa.Table.from_pandas(pd.DataFrame(frame.drop(columns=frame.geometry.name)), preserve_index=False)
    return geoparquet_rows(columns, frame.geometry.to_numpy())


class GeoParquetStream:
    """One GeoParquet 1.1 file written from Arrow batches of rows, a row group at a time.

    Rows are stored in the order they come (producers sort them: a mosaic's chunks arrive in row-major
    order, each Hilbert-sorted), so memory holds at most one row group. The file-level ``geo`` metadata
    (bounding box, geometry types) is known only at the end: it goes into the Parquet footer at close,
    and the Arrow schema is not stored (it would carry a stale copy).
    """

    def __init__(self, path: str | Path, row_group_size: int | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.row_group_size = row_group_size or ROW_GROUP_ROWS
        self._buffer: list[pa.Table] = []
        self._writer: pq.ParquetWriter | None = None
        self._bounds = np.array([np.inf, np.inf, -np.inf, -np.inf])
        self._types: set[str] = set()

    def write(self, table: pa.Table) -> None:
        """Append rows with WKB ``geometry`` and a ``bbox`` struct column (see :func:`geoparquet_table`)."""
        self._buffer.append(table)
        if sum(t.nbytes for t in self._buffer) >= ROW_GROUP_BYTES:  # a few large objects: a short row group
            self._flush(everything=True)
        elif sum(len(t) for t in self._buffer) >= self.row_group_size:
            self._flush()

    def close(self) -> Path:
        """Finish the file and move it into place; returns its path."""
        self._flush(everything=True)
        if self._writer is None:
            raise ValueError(f"{self.path}: nothing was written, not even an empty table")
        self._writer.add_key_value_metadata({"geo": json.dumps(self._geo())})
        self._writer.close()
        os.replace(self.partial, self.path)
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps what the rows used otherwise
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.partial.unlink(missing_ok=True)

    def _flush(self, everything: bool = False) -> None:
        """Write the buffered rows as whole row groups (and the rest too with ``everything``)."""
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer, promote_options="permissive")
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # dictionaries for repeated strings only: unique ids and WKB gain nothing from one but its cost
            # (a fifth of the time writing objects took)
            repeated = [f.name for f in table.schema if pa.types.is_string(f.type) and f.name != "object_id"]
            # statistics for every column but the WKB: its minimum and maximum say nothing, and computing them
            # copied the largest values several times (85 MiB more to write an object of 21 MiB)
            self._writer = pq.ParquetWriter(
                self.partial, table.schema, compression="zstd", store_schema=False, use_dictionary=repeated,
                write_statistics=[leaf for leaf in _leaf_columns(table.schema) if leaf != "geometry"],
            )  # fmt: skip
        whole = len(table) if everything else len(table) - len(table) % self.row_group_size
        if whole:
            rows = table.slice(0, whole)
            rows = rows if rows.schema == self._writer.schema else rows.cast(self._writer.schema)
            self._track(rows)
            self._writer.write_table(rows, row_group_size=self.row_group_size)
        self._buffer = [table.slice(whole)] if whole < len(table) else []

    def _track(self, rows: pa.Table) -> None:
        """Keep the file's bounding box and the geometry types seen (from each WKB's type code)."""
        boxes = rows.column("bbox")
        low = [pc.min(pc.struct_field(boxes, name)).as_py() for name in ("xmin", "ymin")]
        high = [pc.max(pc.struct_field(boxes, name)).as_py() for name in ("xmax", "ymax")]
        for i, value in enumerate([*low, *high]):
            if value is not None:
                self._bounds[i] = min(self._bounds[i], value) if i < 2 else max(self._bounds[i], value)
        codes = pc.unique(pc.binary_slice(rows.column("geometry"), 0, 5)).to_pylist()  # no copy of the WKB
        self._types |= {_WKB_TYPES[_wkb_type(header)] for header in codes if header is not None}

    def _geo(self) -> dict:
        column = {
            "encoding": "WKB",
            "crs": _WGS84.to_json_dict(),
            "geometry_types": sorted(self._types),
            "covering": {"bbox": {name: ["bbox", name] for name in ("xmin", "ymin", "xmax", "ymax")}},
        }
        if np.isfinite(self._bounds).all():
            column["bbox"] = self._bounds.tolist()
        return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}


def _leaf_columns(schema: pa.Schema) -> list[str]:
    """The Parquet column paths of ``schema``'s fields (a struct's fields as ``name.field``)."""
    return [
        f"{field.name}.{child.name}" if pa.types.is_struct(field.type) else field.name
        for field in schema
        for child in (field.type if pa.types.is_struct(field.type) else [field])
    ]


_WGS84 = pyproj.CRS.from_epsg(4326)
_WKB_TYPES = {1: "Point", 2: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString", 6: "MultiPolygon",
              7: "GeometryCollection"}  # fmt: skip


def _wkb_type(header: bytes) -> int:
    """The 2D geometry type of a WKB value from its byte order and type code (ISO Z/M codes add 1000s)."""
    return int.from_bytes(header[1:5], "little" if header[0] == 1 else "big") % 1000


def scene_object_columns(
    rows: pa.Table, scene_id: str, acquired_at: dt.datetime | None, run_id: str, model: str, phrases: dict[str, str]
) -> pa.Table:
    """A scene's object rows (``object_id``, ``label``, ``score``, ``pixels``, ``area_m2``, ``geometry``,
    ``bbox``, and ``phrase`` where the model gave one) with the catalog's other columns, in its column order;
    the optional columns (``OPTIONAL_OBJECT_COLUMNS``) are kept where the rows have them.

    Rows without a phrase get their prompt's text (``phrases``: label -> text).
    """
    n = len(rows)
    known = pc.index_in(rows.column("label").cast(pa.string()), value_set=pa.array(list(phrases), pa.string()))
    prompt_text = pc.take(pa.array(list(phrases.values()), pa.string()), known)  # null for a label without one
    columns = {
        "scene_id": pa.repeat(pa.scalar(scene_id, pa.string()), n),
        "phrase": pc.coalesce(rows.column("phrase").cast(pa.string()), prompt_text)
        if "phrase" in rows.column_names
        else prompt_text,
        "acquired_at": pa.repeat(pa.scalar(acquired_at, pa.timestamp("us", tz="UTC")), n),
        "run_id": pa.repeat(pa.scalar(run_id, pa.string()), n),
        "model": pa.repeat(pa.scalar(model, pa.string()), n),
    }
    optional = [name for name in OPTIONAL_OBJECT_COLUMNS if name in rows.column_names]
    names = (*OBJECT_COLUMNS, *optional, "geometry", "bbox")
    return pa.table({name: columns[name] if name in columns else rows.column(name) for name in names})


def write_scene_objects(
    output: str | Path, objects: gpd.GeoDataFrame | Iterable[pa.Table], run_id: str, scene_id: str
) -> list[Path]:
    """Write one scene's objects of one run into the label / month folders, replacing that pair's files.

    ``objects`` is a GeoDataFrame, or Arrow batches of catalog rows in the order to store them (a
    mosaic's chunks): each label / month file is then streamed, and memory holds a row group per file.
    """
    root = Path(output) / "catalog" / "objects"
    for stale in run_object_files(output, run_id, scene_id):
        stale.unlink()
    streams: dict[tuple[str, str], GeoParquetStream] = {}
    try:
        for batch in [geoparquet_table(objects)] if isinstance(objects, gpd.GeoDataFrame) else objects:
            months = pc.fill_null(pc.strftime(batch.column("acquired_at"), "%Y-%m"), UNDATED)
            keys = pa.table({"label": batch.column("label"), "month": months})
            pairs = keys.group_by(["label", "month"]).aggregate([]).to_pylist()
            for pair in pairs:
                label, month = pair["label"], pair["month"]
                if (label, month) not in streams:
                    streams[label, month] = GeoParquetStream(root / label / month / f"{run_id}_{scene_id}.parquet")
                rows = batch
                if len(pairs) > 1:  # a mosaic's batch is one label and month: written without a copy
                    rows = batch.filter(pc.and_(pc.equal(keys.column("label"), label), pc.equal(months, month)))
                streams[label, month].write(rows)
        return [streams[key].close() for key in sorted(streams)]
    except BaseException:
        for stream in streams.values():
            stream.abort()
        raise


def run_object_files(output: str | Path, run_id: str, scene_id: str = "*") -> list[Path]:
    """The object files a run wrote (for one scene, or all)."""
    return sorted((Path(output) / "catalog" / "objects").glob(f"*/*/{run_id}_{scene_id}.parquet"))


def supersede_scene_objects(output: str | Path, scene_id: str, run_id: str) -> list[Path]:
    """Move a scene's object files written by runs other than ``run_id`` out of the catalog, into
    ``catalog/superseded/<label>/<month>/``: the scene is being processed again (its file changed), and
    queries must never see its old objects beside the new ones. Returns the files' new paths."""
    root = Path(output) / "catalog"
    moved = []
    for path in sorted((root / "objects").glob(f"*/*/*_{glob.escape(scene_id)}.parquet")):
        run, _, scene = path.stem.partition("_")  # run ids hold no "_"; scene ids may
        if scene != scene_id or run == run_id:
            continue
        target = root / "superseded" / path.relative_to(root / "objects")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved.append(target)
        log.info("superseded %s (run %s) by run %s", path, run, run_id)
    return moved


def write_run_table(output: str | Path, table: str, frame: gpd.GeoDataFrame, run_id: str) -> Path:
    """Write the ``scenes`` or ``tiles`` table of one run."""
    if table not in ("scenes", "tiles"):
        raise ValueError(f"'{table}' is not a per-run table; choose from ['scenes', 'tiles']")
    return write_geoparquet(frame, Path(output) / "catalog" / table / f"{run_id}.parquet")


def open(path: str | Path) -> Catalog:  # shadows the builtin on purpose: the entry point, like rasterio.open
    """The catalog under ``path``: a job's output folder or its ``catalog`` folder."""
    path = Path(path)
    root = path / "catalog" if (path / "catalog").is_dir() else path
    if not (root / "objects").is_dir() and not (root / "scenes").is_dir():
        raise FileNotFoundError(f"no catalog at {path}; run a job with this output first")
    return Catalog(root)


@dataclass
class QueryStats:
    """How much a query read: files and row groups considered, and read."""

    files: int = 0
    files_read: int = 0
    row_groups: int = 0
    row_groups_read: int = 0


@dataclass
class Catalog:
    """Queries over one catalog folder.

    The list of files and their row groups' bounding boxes are read once and kept, so repeated queries
    stay warm; open the catalog again to see files written since.
    """

    root: Path
    last_query: QueryStats = field(default_factory=QueryStats)
    _metadata: dict[Path, pq.ParquetFile] = field(default_factory=dict, repr=False)
    _boxes: dict[Path, np.ndarray] = field(default_factory=dict, repr=False)
    _listing: dict[str, list[Path]] = field(default_factory=dict, repr=False)

    def files(self, table: str = "objects", label: str | None = None, since=None, until=None) -> list[Path]:
        """The table's files, objects pruned by their label and month folders."""
        if table != "objects":
            return sorted((self.root / table).glob("*.parquet"))
        first, last = _month(since), _month(until)
        found = []
        for folder, paths in self._folders().items():
            folder_label, month = folder.split("/")
            if label is not None and folder_label != label:
                continue
            if month == UNDATED and (first or last):
                continue
            if month != UNDATED and ((first and month < first) or (last and month > last)):
                continue
            found += paths
        return found

    def _folders(self) -> dict[str, list[Path]]:
        """``label/month`` -> its files, listed once."""
        if not self._listing:
            for folder in sorted((self.root / "objects").glob("*/*")):
                self._listing[f"{folder.parent.name}/{folder.name}"] = sorted(folder.glob("*.parquet"))
        return self._listing

    def query(
        self,
        bbox: Sequence[float] | None = None,
        geometry: shapely.Geometry | None = None,
        label: str | None = None,
        since: str | dt.datetime | None = None,
        until: str | dt.datetime | None = None,
        min_score: float | None = None,
        min_area_m2: float | None = None,
        table: str = "objects",
    ) -> gpd.GeoDataFrame:
        """Rows of ``table`` that intersect ``bbox`` (lon/lat) and ``geometry`` and pass the filters.

        ``since`` / ``until`` bound ``acquired_at`` (inclusive; a date means the whole day). Pruning: folders
        by label and month, row groups by ``bbox`` statistics; then the rows are filtered and the
        geometries tested exactly. ``last_query`` tells how much was read.
        """
        if table not in TABLES:
            raise ValueError(f"unknown catalog table '{table}'; choose from {list(TABLES)}")
        region = _region(bbox, geometry)
        start, end = _instant(since), _instant(until, end_of_day=True)
        files = self.files(table, label, start, end)
        plan, total = self._plan(files, region)
        self.last_query = QueryStats(len(files), len(plan), total, sum(len(groups) for groups in plan.values()))
        filters = (region, label, start, end, min_score, min_area_m2)
        with _gc_paused():
            with ThreadPoolExecutor(os.cpu_count()) as pool:  # Arrow releases the GIL: files in parallel
                tables = [t for t in pool.map(lambda item: self._read(*item, *filters), plan.items()) if t.num_rows]
            return self._assemble(tables, files, region)

    def _assemble(self, tables: list[pa.Table], files: list[Path], region) -> gpd.GeoDataFrame:
        """One GeoDataFrame from the files' filtered rows, geometries decoded and tested exactly."""
        if not tables:
            return self._empty(files)
        rows = pa.concat_tables(tables, promote_options="permissive")
        geometries = shapely.from_wkb(rows["geometry"].to_numpy(zero_copy_only=False))
        if region is not None:  # the exact test, only where a row's box is not wholly inside a box region
            keep = _inside(rows, region)
            keep[~keep] = shapely.intersects(geometries[~keep], region)
            rows, geometries = rows.filter(keep), geometries[keep]
        frame = rows.drop_columns([c for c in ("bbox", "geometry") if c in rows.column_names])
        found = gpd.GeoDataFrame(frame.to_pandas(types_mapper=_ARROW_STRINGS), geometry=geometries, crs=4326)
        if "acquired_at" in found and not isinstance(found["acquired_at"].dtype, pd.DatetimeTZDtype):
            found["acquired_at"] = pd.to_datetime(found["acquired_at"], utc=True)  # a part had only nulls
        return found

    def _plan(self, files: list[Path], region: shapely.Geometry | None) -> tuple[dict[Path, np.ndarray], int]:
        """The row groups to read per file: those whose ``bbox`` statistics meet the region's bounds."""
        boxes = [self._row_group_boxes(path) for path in files]
        owner = np.repeat(np.arange(len(files)), [len(b) for b in boxes])
        group = np.concatenate([np.arange(len(b)) for b in boxes]) if boxes else np.zeros(0, int)
        if region is not None and len(owner):
            stacked = np.concatenate(boxes)
            xmin, ymin, xmax, ymax = region.bounds
            apart = (stacked[:, 0] > xmax) | (stacked[:, 2] < xmin) | (stacked[:, 1] > ymax) | (stacked[:, 3] < ymin)
            owner, group = owner[~apart], group[~apart]  # unknown (NaN) bounds never compare as apart: read
        plan = {files[f]: group[owner == f] for f in np.unique(owner)}
        return plan, sum(len(b) for b in boxes)

    def _read(self, path, groups, region, label, start, end, min_score, min_area_m2) -> pa.Table:
        """The rows of a file's row ``groups`` that pass the filters (still encoded)."""
        rows = self._file(path).read_row_groups(groups.tolist())
        keep = _row_filter(rows, region, label, start, end, min_score, min_area_m2)
        return rows if keep is None else rows.filter(keep)

    def _row_group_boxes(self, path: Path) -> np.ndarray:
        """xmin, ymin, xmax, ymax of each row group, from the ``bbox`` column statistics (NaN if absent)."""
        if path not in self._boxes:
            metadata = self._file(path).metadata
            self._boxes[path] = np.array([_bbox_stats(metadata.row_group(g)) for g in range(metadata.num_row_groups)])
        return self._boxes[path].reshape(-1, 4)

    def _file(self, path: Path) -> pq.ParquetFile:
        if path not in self._metadata:
            self._metadata[path] = pq.ParquetFile(path)
        return self._metadata[path]

    def _empty(self, files: list[Path]) -> gpd.GeoDataFrame:
        schema = self._file(files[0]).schema_arrow if files else None
        columns = [c for c in (schema.names if schema else [*OBJECT_COLUMNS, "geometry"]) if c != "bbox"]
        return gpd.GeoDataFrame(columns=columns, geometry="geometry", crs=4326)

    def stats(self, regions: gpd.GeoDataFrame, by: Sequence[str] = ("label",)) -> gpd.GeoDataFrame:
        """Object count and area per region polygon (and per ``by``: ``label``, ``month``, ``scene_id``...).

        An object counts in the regions that contain its representative point, so it is never counted
        twice when regions tile the land (admin boundaries).
        """
        regions = regions.to_crs(4326).reset_index(drop=True)
        found = self.query(bbox=regions.total_bounds)
        found["month"] = _months(found["acquired_at"])
        points = gpd.GeoDataFrame(found.drop(columns="geometry"), geometry=found.representative_point(), crs=4326)
        joined = gpd.sjoin(points, regions[["geometry"]], predicate="within").rename(columns={"index_right": "region"})
        keys = ["region", *by]
        table = joined.groupby(keys).agg(count=("object_id", "size"), area_m2=("area_m2", "sum")).reset_index()
        attributes = regions.drop(columns="geometry")
        table = table.merge(attributes, left_on="region", right_index=True, how="left")
        return gpd.GeoDataFrame(table, geometry=regions.geometry.loc[table["region"]].to_numpy(), crs=4326)

    def compact(self, rows_per_file: int = 1_000_000) -> list[Path]:
        """Rewrite each month folder's small object files (every run's) as files of up to ``rows_per_file``.

        Rows keep their ``run_id``; the new files are named ``compact_<n>`` and replace the old ones.
        """
        written = []
        for folder in sorted((self.root / "objects").glob("*/*")):
            small = sorted(folder.glob("*.parquet"))
            if len(small) < 2:
                continue
            merged = gpd.GeoDataFrame(pd.concat([gpd.read_parquet(p) for p in small], ignore_index=True), crs=4326)
            merged = merged.iloc[spatial_order(shapely.bounds(merged.geometry.to_numpy()))]
            targets = [
                write_geoparquet(merged.iloc[i : i + rows_per_file], folder / f"compact_{i // rows_per_file}.tmp")
                for i in range(0, len(merged), rows_per_file)
            ]
            for path in small:
                path.unlink()
                self._metadata.pop(path, None)
                self._boxes.pop(path, None)
            for target in targets:
                final = target.with_suffix(".parquet")
                target.rename(final)
                written.append(final)
        self._listing.clear()
        return written


@contextlib.contextmanager
def duckdb_connection(root: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """DuckDB with the catalog's tables as views (``objects``, ``scenes``, ``tiles``), in memory.

    The spatial extension is loaded from its pip package (``duckdb-extension-spatial``) when installed,
    never downloaded; without it the ``bbox`` columns still answer region filters.
    """
    import duckdb

    connection = duckdb.connect()
    try:
        _load_spatial(connection)
        patterns = {"objects": root / "objects" / "*" / "*" / "*.parquet"}
        patterns |= {table: root / table / "*.parquet" for table in ("scenes", "tiles")}
        for table, pattern in patterns.items():
            if any(root.glob(str(pattern.relative_to(root)))):
                source = str(pattern).replace("'", "''")
                connection.execute(
                    f"create view {table} as select * from read_parquet('{source}', union_by_name = true)"
                )
        yield connection
    finally:
        connection.close()


def _load_spatial(connection) -> None:
    try:
        import duckdb_extension_spatial
    except ImportError:
        return
    for extension in Path(duckdb_extension_spatial.__file__).parent.rglob("spatial.duckdb_extension"):
        connection.execute(f"load '{extension}'")
        return


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a query builds its many objects (it made queries 1.5x slower)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _region(bbox: Sequence[float] | None, geometry: shapely.Geometry | None) -> shapely.Geometry | None:
    shapes = [shapely.box(*bbox)] if bbox is not None else []
    shapes += [geometry] if geometry is not None else []
    if not shapes:
        return None
    return shapes[0] if len(shapes) == 1 else shapely.intersection(*shapes)


def _bbox_stats(group: pq.RowGroupMetaData) -> tuple[float, float, float, float]:
    found = {}
    for index in range(group.num_columns):
        column = group.column(index)
        name = column.path_in_schema
        if name.startswith("bbox.") and column.statistics is not None and column.statistics.has_min_max:
            found[name.removeprefix("bbox.")] = column.statistics
    if len(found) < 4:
        return (np.nan,) * 4
    return found["xmin"].min, found["ymin"].min, found["xmax"].max, found["ymax"].max


def _inside(rows: pa.Table, region: shapely.Geometry | None) -> np.ndarray:
    """Rows whose bbox lies wholly inside ``region`` when it is a box: they intersect it for sure."""
    if region is None or "bbox" not in rows.column_names or not shapely.equals(region, shapely.box(*region.bounds)):
        return np.zeros(rows.num_rows, bool)
    xmin, ymin, xmax, ymax = region.bounds
    box = {name: pc.struct_field(rows["bbox"], name).to_numpy() for name in ("xmin", "ymin", "xmax", "ymax")}
    return (box["xmin"] >= xmin) & (box["xmax"] <= xmax) & (box["ymin"] >= ymin) & (box["ymax"] <= ymax)


def _row_filter(rows: pa.Table, region, label, start, end, min_score, min_area_m2) -> pa.ChunkedArray | None:
    """The rows worth decoding: bbox overlap and the attribute filters, evaluated on Arrow columns."""
    conditions = []
    if region is not None and "bbox" in rows.column_names:
        xmin, ymin, xmax, ymax = region.bounds
        box = rows["bbox"]
        conditions += [
            pc.less_equal(pc.struct_field(box, "xmin"), xmax),
            pc.greater_equal(pc.struct_field(box, "xmax"), xmin),
            pc.less_equal(pc.struct_field(box, "ymin"), ymax),
            pc.greater_equal(pc.struct_field(box, "ymax"), ymin),
        ]
    if label is not None and "label" in rows.column_names:
        conditions.append(pc.equal(rows["label"], label))
    if start is not None and "acquired_at" in rows.column_names:
        conditions.append(pc.greater_equal(rows["acquired_at"], pa.scalar(start, rows["acquired_at"].type)))
    if end is not None and "acquired_at" in rows.column_names:
        conditions.append(pc.less_equal(rows["acquired_at"], pa.scalar(end, rows["acquired_at"].type)))
    if min_score is not None:
        conditions.append(pc.greater_equal(rows["score"], min_score))
    if min_area_m2 is not None:
        conditions.append(pc.greater_equal(rows["area_m2"], min_area_m2))
    if not conditions:
        return None
    keep = conditions[0]
    for condition in conditions[1:]:
        keep = pc.and_kleene(keep, condition)
    return pc.fill_null(keep, False)


def _instant(value: str | dt.datetime | None, end_of_day: bool = False) -> dt.datetime | None:
    """A query bound as a UTC time; a bare date means its first (or, for ``until``, last) instant."""
    if value is None:
        return None
    if isinstance(value, str):
        parsed = dt.datetime.fromisoformat(value)
        if end_of_day and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            parsed += dt.timedelta(days=1, microseconds=-1)
        value = parsed
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _months(acquired_at: pd.Series) -> pd.Series:
    """The month folder of each acquisition time: ``YYYY-MM``, or ``undated``."""
    return pd.to_datetime(acquired_at, utc=True).dt.strftime("%Y-%m").fillna(UNDATED)


def _month(value: dt.datetime | None) -> str | None:
    return f"{value:%Y-%m}" if value else None


def read_table(output: str | Path, table: str) -> gpd.GeoDataFrame:
    """A whole catalog table (every run), for small tables and tests."""
    files = open(output).files(table)
    if not files:
        raise FileNotFoundError(f"no '{table}' files in the catalog at {output}")
    return gpd.GeoDataFrame(pd.concat([gpd.read_parquet(p) for p in files], ignore_index=True), crs=4326)
