"""The catalog analysts query: partitioned GeoParquet, pruned queries equal to brute force, stats, SQL, exports."""

import json

import _duckdb
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from geobatch import catalog
from geobatch.cli import app

runner = CliRunner()
LABELS = ("water", "vegetation")


def random_objects(seed: int, count: int, run_id: str = "run1") -> gpd.GeoDataFrame:
    """Objects like the pipeline's: small boxes over a 2 x 2 degree area, several scenes, labels and months."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(-100, -98, count), rng.uniform(46, 48, count)
    size = rng.uniform(0.0005, 0.02, count)
    months = pd.to_datetime(rng.choice(["2020-05-03", "2020-06-17", "2021-06-01"], count), utc=True)
    frame = gpd.GeoDataFrame(
        {
            "object_id": [f"o{seed}-{i}" for i in range(count)],
            "label": rng.choice(LABELS, count),
            "phrase": "p",
            "score": rng.uniform(0.5, 1, count),
            "area_m2": rng.uniform(10, 1e6, count),
            "pixels": rng.integers(1, 1000, count),
            "scene_id": rng.choice(["s1", "s2", "s3"], count),
            "acquired_at": months,
            "run_id": run_id,
            "model": "spectral",
        },
        geometry=shapely.box(x, y, x + size, y + size),
        crs=4326,
    )
    frame.loc[frame.scene_id == "s3", "acquired_at"] = pd.NaT  # a scene without a date
    return frame


def write_catalog(folder, objects: gpd.GeoDataFrame) -> None:
    for scene_id, part in objects.groupby("scene_id"):
        catalog.write_scene_objects(folder, part, part.run_id.iloc[0], scene_id)


def brute_force(objects, bbox=None, label=None, since=None, until=None, min_score=None, min_area_m2=None):
    keep = np.ones(len(objects), bool)
    if bbox is not None:
        keep &= objects.intersects(shapely.box(*bbox)).to_numpy()
    if label is not None:
        keep &= (objects.label == label).to_numpy()
    if since is not None:
        keep &= (objects.acquired_at >= pd.Timestamp(since, tz="UTC")).fillna(False).to_numpy()
    if until is not None:
        keep &= (objects.acquired_at <= pd.Timestamp(until, tz="UTC")).fillna(False).to_numpy()
    if min_score is not None:
        keep &= (objects.score >= min_score).to_numpy()
    if min_area_m2 is not None:
        keep &= (objects.area_m2 >= min_area_m2).to_numpy()
    return set(objects.object_id[keep])


@pytest.fixture(scope="module")
def random_catalog(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalog")
    objects = random_objects(0, 3000)
    catalog.ROW_GROUP_ROWS, saved = 16, catalog.ROW_GROUP_ROWS  # many small row groups: pruning matters
    try:
        write_catalog(folder, objects)
    finally:
        catalog.ROW_GROUP_ROWS = saved
    return folder, objects


coordinate = st.floats(-100.5, -97.5)
latitude = st.floats(45.5, 48.5)
when = st.sampled_from([None, "2020-05-03", "2020-06-01", "2020-06-17T00:00:00", "2021-01-01"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    corners=st.tuples(coordinate, latitude, coordinate, latitude) | st.none(),
    label=st.sampled_from([None, *LABELS]),
    since=when,
    until=when,
    min_score=st.sampled_from([None, 0.7]),
    min_area_m2=st.sampled_from([None, 5e5]),
)
def test_queries_equal_a_brute_force_filter(random_catalog, corners, label, since, until, min_score, min_area_m2):
    folder, objects = random_catalog
    bbox = None
    if corners is not None:
        x0, y0, x1, y1 = corners
        bbox = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    until_instant = until + "T23:59:59.999999" if until and len(until) == 10 else until
    expected = brute_force(objects, bbox, label, since, until_instant, min_score, min_area_m2)
    cat = catalog.open(folder)
    found = cat.query(bbox=bbox, label=label, since=since, until=until, min_score=min_score, min_area_m2=min_area_m2)
    assert set(found.object_id) == expected
    assert found.object_id.is_unique


def test_small_regions_read_few_row_groups_and_label_and_dates_prune_folders(random_catalog):
    folder, _ = random_catalog
    cat = catalog.open(folder)
    found = cat.query(bbox=(-99.1, 47.0, -99.0, 47.1))
    assert len(found) and cat.last_query.row_groups_read < cat.last_query.row_groups / 4, cat.last_query
    cat.query(label="water", since="2020-06-01", until="2020-06-30")
    assert cat.last_query.files == 2  # water / 2020-06: scenes s1 and s2 only


def test_the_layout_is_label_month_and_run_scene_files(random_catalog):
    folder, _ = random_catalog
    files = sorted(p.relative_to(folder / "catalog" / "objects").as_posix() for p in catalog.open(folder).files())
    assert "water/2020-05/run1_s1.parquet" in files and "vegetation/undated/run1_s3.parquet" in files
    assert len(files) == 2 * (2 * 3 + 1)  # labels x (months x dated scenes + the undated scene)


def test_files_open_in_geopandas_pyogrio_and_duckdb(random_catalog):
    folder, objects = random_catalog
    path = next(iter(catalog.open(folder).files()))
    # pyogrio's GDAL has no Parquet driver; its ADBC driver reads GeoParquet with DuckDB's (the duckdb wheel).
    through_gdal = pyogrio.read_dataframe(f"ADBC:{path}", ADBC_DRIVER=_duckdb.__file__)
    direct = gpd.read_parquet(path)
    assert through_gdal.crs.to_epsg() == 4326
    assert shapely.equals(through_gdal.geometry.to_numpy(), direct.geometry.to_numpy()).all()
    region = (-99.5, 46.5, -99.0, 47.0)
    assert set(gpd.read_parquet(path, bbox=region).object_id) >= set(
        catalog.open(folder)
        .query(bbox=region)
        .pipe(lambda f: f[f.object_id.isin(gpd.read_parquet(path).object_id)])["object_id"]
    )
    with catalog.duckdb_connection(folder / "catalog") as duck:
        assert duck.sql("select count(*) from objects").fetchone()[0] == len(objects)
        area = duck.sql("select sum(ST_Area(geometry)) from objects").fetchone()[0]
    assert area == pytest.approx(shapely.area(objects.geometry.to_numpy()).sum(), rel=1e-9)


@pytest.mark.parametrize("fmt, read", [
    ("gpkg", lambda p: gpd.read_file(p)),
    ("fgb", lambda p: gpd.read_file(p)),
    ("parquet", gpd.read_parquet),
    ("geojson", lambda p: gpd.read_file(p)),
    ("csv", lambda p: pd.read_csv(p)),
])  # fmt: skip
def test_exports_open_in_their_own_readers(random_catalog, tmp_path, fmt, read):
    folder, objects = random_catalog
    bbox = (-99.5, 46.5, -98.5, 47.5)
    target = tmp_path / f"subset.{fmt}"
    result = runner.invoke(
        app, ["query", str(folder), "--bbox", ",".join(map(str, bbox)), "--format", fmt, "--to", str(target)]
    )
    assert result.exit_code == 0, result.output
    exported = read(target)
    assert set(exported.object_id) == brute_force(objects, bbox)
    if fmt == "csv":
        assert shapely.from_wkt(exported.wkt).tolist()


def test_stats_count_each_object_once_in_the_region_holding_its_point(random_catalog, tmp_path):
    folder, objects = random_catalog
    west, east = shapely.box(-101, 45, -99, 49), shapely.box(-99, 45, -97, 49)
    regions = gpd.GeoDataFrame({"name": ["west", "east"]}, geometry=[west, east], crs=4326)
    regions.to_file(tmp_path / "regions.gpkg")
    table = catalog.open(folder).stats(regions, by=["label"])
    points = objects.representative_point()
    for row in table.itertuples():
        inside = objects[(objects.label == row.label) & points.within(regions.geometry[row.region])]
        assert (row.count, row.area_m2) == (len(inside), pytest.approx(inside.area_m2.sum()))
    assert table["count"].sum() == len(objects)
    result = runner.invoke(app, ["stats", str(folder), "--regions", str(tmp_path / "regions.gpkg"), "--by", "label,month",
                                 "--to", str(tmp_path / "stats.parquet")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert gpd.read_parquet(tmp_path / "stats.parquet")["count"].sum() == len(objects)


def test_sql_runs_on_the_catalog_views(random_catalog):
    folder, objects = random_catalog
    statement = "select label, count(*) as n from objects where area_m2 >= 500000 group by label order by label"
    result = runner.invoke(app, ["sql", str(folder), statement, "--format", "csv"])
    assert result.exit_code == 0, result.output
    counted = pd.read_csv(pd.io.common.StringIO(result.stdout))
    expected = objects[objects.area_m2 >= 5e5].groupby("label").size()
    assert dict(zip(counted.label, counted.n)) == expected.to_dict()
    bad = runner.invoke(app, ["sql", str(folder), "select nothing from nowhere"])
    assert bad.exit_code == 2 and "sql:" in bad.stderr


def test_runs_add_their_own_files_and_compaction_keeps_every_row(tmp_path):
    first, second = random_objects(1, 500, "runA"), random_objects(2, 500, "runB")
    write_catalog(tmp_path, first)
    write_catalog(tmp_path, second)
    cat = catalog.open(tmp_path)
    before = cat.query()
    assert set(before.run_id) == {"runA", "runB"} and len(before) == 1000
    files_before = len(cat.files())
    written = cat.compact()
    assert written and len(cat.files()) < files_before
    after = cat.query()
    assert sorted(after.object_id) == sorted(before.object_id)
    assert set(cat.query(bbox=(-99.5, 46.5, -98.5, 47.5)).object_id) == brute_force(
        pd.concat([first, second]), (-99.5, 46.5, -98.5, 47.5)
    )


def test_rewriting_a_scene_of_a_run_replaces_its_files(tmp_path):
    objects = random_objects(3, 300)
    write_catalog(tmp_path, objects)
    write_catalog(tmp_path, objects[objects.label == "water"])  # a rerun that found only water
    assert set(catalog.open(tmp_path).query().label) == {"water"}


def test_a_scene_written_in_batches_streams_row_groups_with_exact_file_metadata(tmp_path):
    objects = random_objects(seed=5, count=10_000)
    objects["scene_id"], objects["acquired_at"] = "s1", pd.Timestamp("2020-05-03", tz="UTC")
    objects.loc[::7, "geometry"] = objects.geometry[::7].buffer(0.001).union(objects.geometry[::7].translate(0.1))
    batches = [catalog.geoparquet_table(objects.iloc[i : i + 1000]) for i in range(0, len(objects), 1000)]
    paths = catalog.write_scene_objects(tmp_path, iter(batches), "run1", "s1")
    assert {p.parent.parent.name for p in paths} == set(LABELS) and all(p.parent.name == "2020-05" for p in paths)
    back = pd.concat([gpd.read_parquet(p) for p in paths], ignore_index=True)
    assert sorted(back["object_id"]) == sorted(objects["object_id"])
    for path in paths:
        part = gpd.read_parquet(path)
        geo = json.loads(pq.read_schema(path).metadata[b"geo"])["columns"]["geometry"]
        assert np.allclose(geo["bbox"], part.total_bounds)
        assert geo["geometry_types"] == sorted(set(part.geom_type))
        metadata = pq.ParquetFile(path).metadata
        assert metadata.num_row_groups == -(-len(part) // catalog.ROW_GROUP_ROWS)  # whole groups as rows arrive
        columns = metadata.row_group(0).to_dict()["columns"]
        with_statistics = {c["path_in_schema"] for c in columns if c["statistics"] is not None}
        assert {"bbox.xmin", "bbox.ymax", "score", "area_m2"} <= with_statistics  # what queries prune by
        assert "geometry" not in with_statistics  # a WKB's minimum says nothing, and costs copies of the largest


def test_rows_of_large_objects_make_short_row_groups(tmp_path, monkeypatch):
    """A row group holds ROW_GROUP_ROWS rows, or fewer where they pass ROW_GROUP_BYTES: memory holds one."""
    objects = random_objects(seed=6, count=3_000)
    objects["geometry"] = objects.geometry.buffer(0.01, quad_segs=64)  # about 4 KiB of WKB each
    batches = [catalog.geoparquet_table(objects.iloc[i : i + 100]) for i in range(0, len(objects), 100)]
    monkeypatch.setattr(catalog, "ROW_GROUP_BYTES", 2**20)
    stream = catalog.GeoParquetStream(tmp_path / "large.parquet")
    for batch in batches:
        stream.write(batch)
    metadata = pq.ParquetFile(stream.close()).metadata
    assert metadata.num_rows == len(objects)
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    assert len(groups) > 1
    assert max(g.total_byte_size for g in groups) < 2 * 2**20
    back = gpd.read_parquet(tmp_path / "large.parquet")
    assert list(back["object_id"]) == [i for b in batches for i in b["object_id"].to_pylist()]  # order kept
