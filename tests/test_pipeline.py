"""End to end on a real NAIP scene: tiling must be invisible and every object must appear once."""

import json
import shutil
import warnings
from pathlib import Path

import dask
import duckdb
import duckdb_extension_spatial
import geopandas as gpd
import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import pytest
import rasterio
import rioxarray  # noqa: F401
import shapely
import xarray as xr
import zarr
from affine import Affine
from conftest import NAIP_2010, SHARED_DATA, SPECS, open_mosaic, write_job
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7
from scipy import ndimage

from geobatch import catalog
from geobatch import vectorize as vectorize_module
from geobatch.jobs import load_job
from geobatch.models.spectral import normalised_difference
from geobatch.pipeline import run_job
from geobatch.scenes import discover, open_scene
from geobatch.stitch import LABEL_NODATA, Mosaic

COMBOS = [(256, 32), (100, 0), (173, 17)]  # core, overlap: aligned and unaligned to the scene, with and without overlap


@pytest.fixture(scope="module")
def whole_scene():
    """The spectral water rule applied to the whole scene at once: the reference tiling must not change."""
    with rasterio.open(NAIP_2010) as src:
        data = src.read(masked=True)
    green, nir = data[1], data[3]
    valid = ~(np.ma.getmaskarray(green) | np.ma.getmaskarray(nir))
    water = (normalised_difference(green.data, nir.data) > 0) & valid
    return {"water": water, "valid": valid}


@pytest.fixture(scope="module", params=COMBOS, ids=[f"core{c}-overlap{o}" for c, o in COMBOS])
def run(request, ray_session, tmp_path_factory):
    core, overlap = request.param
    folder = tmp_path_factory.mktemp(f"run-{core}-{overlap}")
    spec = load_job(write_job(folder / "job.yaml", tiling={"core": core, "overlap": overlap}))
    summary = run_job(spec)
    return summary, spec.output / "mosaics" / f"{NAIP_2010.stem}.zarr", core


def test_stitched_mosaic_equals_the_model_on_the_whole_scene(run, whole_scene):
    summary, mosaic_path, _ = run
    assert not summary.failed
    label = open_mosaic(mosaic_path)["label"].values
    expected = np.where(whole_scene["valid"], whole_scene["water"].astype(np.uint8), LABEL_NODATA)
    assert np.array_equal(label, expected)


def test_objects_crossing_seams_appear_once(run, whole_scene):
    summary, mosaic_path, _ = run
    components, count = ndimage.label(whole_scene["water"])  # 4-connected, like the pipeline
    objects = gpd.read_parquet(summary.tables["objects"])
    assert len(objects) == count == summary.objects_per_label["water"]
    assert sorted(objects["pixels"]) == sorted(np.bincount(components.ravel())[1:])
    assert set(objects.geom_type) == {"Polygon"} and objects.is_valid.all()
    assert objects["object_id"].is_unique
    # the instance array numbers the same components, one id each
    instance = open_mosaic(mosaic_path)["instance"].values
    assert np.array_equal(instance > 0, whole_scene["water"])
    pairs = np.unique(np.stack([components[components > 0], instance[components > 0]]), axis=1)
    assert pairs.shape[1] == count and len(np.unique(pairs[1])) == count


def test_object_polygons_have_the_area_of_their_pixels(run):
    summary, _, _ = run
    objects = gpd.read_parquet(summary.tables["objects"])
    assert np.allclose(objects.to_crs(26914).area, objects["pixels"] * 25.0, rtol=1e-6)
    geod = pyproj.Geod(ellps="WGS84")  # area_m2 is the area on the ellipsoid
    geodesic = [abs(geod.geometry_area_perimeter(polygon)[0]) for polygon in objects.geometry]
    assert np.allclose(objects["area_m2"], geodesic, rtol=1e-6)


def test_object_ids_and_instances_do_not_depend_on_the_tiling(ray_session, tmp_path):
    outputs = []
    for core, overlap in [(128, 8), (300, 0)]:
        tiling = {"core": core, "overlap": overlap}
        spec = load_job(write_job(tmp_path / f"job{core}.yaml", output=f"out{core}", tiling=tiling))
        summary = run_job(spec)
        mosaic = open_mosaic(spec.output / "mosaics" / f"{NAIP_2010.stem}.zarr")
        objects = gpd.read_parquet(summary.tables["objects"]).sort_values("object_id")
        outputs.append((mosaic["instance"].values, mosaic["score"].values, objects))
    (inst_a, score_a, obj_a), (inst_b, score_b, obj_b) = outputs
    assert np.array_equal(inst_a, inst_b)
    assert np.array_equal(score_a, score_b, equal_nan=True)
    assert list(obj_a["object_id"]) == list(obj_b["object_id"])
    assert np.allclose(obj_a["score"], obj_b["score"])
    assert shapely.equals_exact(obj_a.geometry.normalize().to_numpy(), obj_b.geometry.normalize().to_numpy(), 0).all()


def test_seam_crossing_objects_traced_a_few_runs_at_a_time_keep_their_polygons(run, tmp_path, monkeypatch):
    """A trace links at most ``_RUNS_PER_TRACE`` runs at once (an object with more, alone): memory, not
    results, depends on it. Vectorised again here with 50 runs per trace (in this process, Dask's
    synchronous scheduler), every polygon is the one the run stored."""
    summary, mosaic_path, core = run
    copy = shutil.copytree(mosaic_path, tmp_path / mosaic_path.name)
    monkeypatch.setattr(vectorize_module, "_RUNS_PER_TRACE", 50)
    spec = load_job(write_job(tmp_path / "job.yaml"))
    scene = open_scene(discover(spec)[0][0], ["green", "nir"])
    mosaic = Mosaic(scene.scene_id, str(copy), scene.shape, core, ("water",))
    with dask.config.set(scheduler="sync"):
        rows = pa.concat_tables(list(vectorize_module.vectorize(mosaic, scene)))
    again = dict(zip(rows["object_id"].to_pylist(), shapely.from_wkb(rows["geometry"].to_numpy(zero_copy_only=False))))
    stored = gpd.read_parquet(summary.tables["objects"])
    assert len(again) == len(stored)
    assert shapely.equals_exact(
        shapely.normalize(np.array([again[i] for i in stored["object_id"]])), stored.geometry.normalize().to_numpy(), 0
    ).all()


def test_a_failed_trace_fails_vectorising_rather_than_leaving_it_waiting(run, tmp_path, monkeypatch):
    """The caller takes each bucket's rows as soon as its trace stages them; a trace that fails instead
    ends the wait with its error (in this process, Dask's synchronous scheduler)."""
    _, mosaic_path, core = run
    copy = shutil.copytree(mosaic_path, tmp_path / mosaic_path.name)

    def failing_trace(plan, objects, bucket, after=None):
        raise RuntimeError(f"bucket {bucket} could not be traced")

    monkeypatch.setattr(vectorize_module, "_trace_crossing", failing_trace)
    spec = load_job(write_job(tmp_path / "job.yaml"))
    scene = open_scene(discover(spec)[0][0], ["green", "nir"])
    mosaic = Mosaic(scene.scene_id, str(copy), scene.shape, core, ("water",))
    with dask.config.set(scheduler="sync"), pytest.raises(RuntimeError, match=r"bucket \d+ could not be traced"):
        list(vectorize_module.vectorize(mosaic, scene))


@pytest.mark.parametrize(
    "crs, affine",
    [
        ("EPSG:26914", (5.0, 0, 485900.0, 0, -5.0, 5209245.0)),  # the NAIP scenes: interpolated
        ("EPSG:32601", (30.0, 0, 150000.0, 0, -30.0, 7500000.0)),  # across the antimeridian, coarse: cells transformed
        ("EPSG:4326", (0.001, 0, 179.5, 0, -0.001, 10.0)),  # degrees past 180
    ],
)
def test_vertices_in_longitude_latitude_are_proj_s_to_a_micrometre_whatever_batch_they_come_in(crs, affine):
    georeference = vectorize_module.Georeference(Affine(*affine), pyproj.CRS(crs).to_wkt(), "")
    rng = np.random.default_rng(0)
    vertices = rng.integers(0, 4000, (20_000, 2)).astype(float)
    found = georeference.lonlat(vertices)
    transformer = pyproj.Transformer.from_crs(crs, 4326, always_xy=True)
    exact = np.column_stack(transformer.transform(*(Affine(*affine) @ (vertices[:, 0], vertices[:, 1]))))
    assert np.abs(found - exact).max() <= 1e-11  # degrees: about a micrometre
    for batch in np.array_split(np.arange(len(vertices)), [1, 10, 5000]):  # chunks and traces hold other sets
        assert np.array_equal(georeference.lonlat(vertices[batch]), found[batch])


def test_mosaic_is_georeferenced_for_xarray_and_rioxarray(run):
    _, mosaic_path, _ = run
    mosaic = open_mosaic(mosaic_path)
    with rasterio.open(NAIP_2010) as src:
        assert mosaic.rio.crs == src.crs
        assert mosaic["label"].rio.transform() == src.transform
        assert mosaic.rio.shape == src.shape
    assert mosaic["label"].attrs["flag_meanings"] == "background water nodata"


def test_a_target_resolution_georeferences_the_mosaic_and_the_objects(ray_session, tmp_path):
    native = run_job(load_job(write_job(tmp_path / "native.yaml", output="native", tiling={"core": 512})))
    spec = load_job(write_job(tmp_path / "job.yaml", resolution=10.0, tiling={"core": 512}))
    summary = run_job(spec)
    mosaic = open_mosaic(spec.output / "mosaics" / f"{NAIP_2010.stem}.zarr")
    with rasterio.open(NAIP_2010) as src:
        assert mosaic.rio.shape == (src.height // 2, src.width // 2)
        assert mosaic["label"].rio.transform() == src.transform @ src.transform.scale(2)
    fine, coarse = (gpd.read_parquet(s.tables["objects"]) for s in (native, summary))
    assert len(coarse) < len(fine)  # the smallest ponds vanish at 10 m
    # Water keeps its area at half the resolution (a wrong pixel size would scale it by 4 or 1/4) ...
    assert coarse.area_m2.sum() / fine.area_m2.sum() == pytest.approx(1, abs=0.1)
    # ... and its place: each large pond meets coarse water of about its area (some merge with neighbours).
    big = fine[fine.area_m2 > 50_000]
    matched = gpd.sjoin(big, coarse, predicate="intersects")
    ratio = matched.groupby(level=0)["area_m2_right"].sum() / big["area_m2"]
    assert len(ratio) == len(big) and ratio.median() == pytest.approx(1, abs=0.05)


def test_finished_mosaics_carry_overviews_down_to_one_chunk(run):
    _, mosaic_path, core = run
    base = open_mosaic(mosaic_path)
    factors = zarr.open_group(mosaic_path, mode="r").attrs["overviews"]["factors"]
    assert factors == [2**k for k in range(1, len(factors) + 1)]
    previous = base
    for factor in factors:
        level = xr.open_zarr(mosaic_path, group=f"overviews/{factor}", decode_coords="all", consolidated=False)
        assert level.rio.crs == base.rio.crs
        assert level.rio.transform() == base.rio.transform() @ base.rio.transform().scale(factor)
        for name in ("label", "instance"):
            assert np.array_equal(level[name].values, base[name].values[::factor, ::factor]), name
        score = previous["score"].values
        padded = np.pad(score, ((0, score.shape[0] % 2), (0, score.shape[1] % 2)), constant_values=np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-nodata blocks: mean of nothing is NaN
            expected = np.nanmean(padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2), axis=(1, 3))
        assert np.allclose(level["score"].values, expected, equal_nan=True)
        previous = level
    assert max(previous.sizes.values()) <= core < max(base.sizes.values()) or not factors


def test_mosaic_chunks_are_the_tile_cores(run):
    summary, mosaic_path, core = run
    mosaic = open_mosaic(mosaic_path)
    for name in ("label", "score", "instance"):
        assert mosaic[name].encoding["chunks"] == (core, core)
    tiles = gpd.read_parquet(summary.tables["tiles"])
    assert len(tiles) == len(range(0, mosaic.sizes["y"], core)) * len(range(0, mosaic.sizes["x"], core))
    assert (tiles["status"] == "done").all()


def geoparquet_validator() -> jsonschema.protocols.Validator:
    """The official GeoParquet 1.1.0 schema. It refers to PROJJSON's schema by URL, which cannot be
    fetched offline: that one reference accepts anything here, and the CRS is checked with pyproj instead."""
    schema = json.loads((SPECS / "geoparquet-1.1.0.schema.json").read_text())
    projjson = "https://proj.org/schemas/v0.7/projjson.schema.json"
    registry = Registry().with_resource(projjson, Resource.from_contents({}, default_specification=DRAFT7))
    return jsonschema.Draft7Validator(schema, registry=registry)


def test_catalog_is_valid_geoparquet_1_1(run):
    summary, _, _ = run
    validator = geoparquet_validator()
    files = [*Path(summary.tables["objects"]).rglob("*.parquet"), summary.tables["scenes"], summary.tables["tiles"]]
    for path in files:
        geo = json.loads(pq.read_schema(path).metadata[b"geo"])
        validator.validate(geo)
        assert pyproj.CRS.from_json_dict(geo["columns"]["geometry"]["crs"]) == pyproj.CRS.from_epsg(4326)
        assert geo["version"] == "1.1.0"
        assert geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    columns = set(pq.read_schema(files[0]).names)
    wanted = {"object_id", "label", "score", "area_m2", "scene_id", "acquired_at", "run_id", "model", "bbox"}
    assert wanted <= columns


def test_region_queries_agree_across_geopandas_duckdb_and_the_query_api(run):
    summary, _, _ = run
    path = summary.tables["objects"]
    everything = gpd.read_parquet(path)
    minx, miny, maxx, maxy = everything.total_bounds
    region = (minx, miny, (minx + maxx) / 2, (miny + maxy) / 2)
    exact = everything[everything.intersects(shapely.box(*region))]
    assert 0 < len(exact) < len(everything)
    assert set(catalog.open(summary.output).query(bbox=region)["object_id"]) == set(exact["object_id"])
    candidates = gpd.read_parquet(path, bbox=region)
    assert set(exact["object_id"]) <= set(candidates["object_id"])
    sql = f"""select count(*) from read_parquet('{path}/*/*/*.parquet')
              where bbox.xmin <= {region[2]} and bbox.xmax >= {region[0]}
                and bbox.ymin <= {region[3]} and bbox.ymax >= {region[1]}"""
    assert duckdb.sql(sql).fetchone()[0] == len(candidates)


def spatial_duckdb() -> duckdb.DuckDBPyConnection:
    """DuckDB with the spatial extension loaded from its pip package (nothing is downloaded)."""
    package = Path(duckdb_extension_spatial.__file__).parent
    (extension,) = package.rglob("spatial.duckdb_extension")
    con = duckdb.connect()
    con.execute(f"LOAD '{extension}'")
    return con


def test_duckdb_spatial_reads_the_geometries(run):
    summary, _, _ = run
    path = summary.tables["objects"]
    utm_area = "ST_Area(ST_Transform(geometry, 'EPSG:4326', 'EPSG:26914', always_xy := true))"
    total = (
        spatial_duckdb().sql(f"select count(*), sum({utm_area}) from read_parquet('{path}/*/*/*.parquet')").fetchone()
    )
    objects = gpd.read_parquet(path)
    assert total[0] == len(objects)
    assert total[1] == pytest.approx(objects["pixels"].sum() * 25.0, rel=1e-6)


def test_failed_tiles_are_recorded_and_left_as_nodata_never_as_empty_mask(ray_session, tmp_path):
    corrupt = str(SHARED_DATA / "samples" / "corrupt.tif")
    spec = load_job(write_job(tmp_path / "job.yaml", scenes=[corrupt], bands={"green": 2, "nir": 3}))
    summary = run_job(spec)
    (scene,) = summary.scenes
    assert summary.failed and scene.status == "partial" and scene.tiles_failed > 0
    tiles = gpd.read_parquet(summary.tables["tiles"])
    failed = tiles[tiles["status"] == "failed"]
    assert len(failed) == scene.tiles_failed
    assert failed["reason"].str.contains("IReadBlock failed").all()
    label = open_mosaic(scene.mosaic)["label"]
    core = 256
    for row, col in zip(failed["row"], failed["col"]):
        block = label[row * core : (row + 1) * core, col * core : (col + 1) * core].values
        assert (block == LABEL_NODATA).all()
    done = tiles[tiles["status"] == "done"].iloc[0]
    assert label[done["row"] * core, done["col"] * core].values != LABEL_NODATA


def test_a_crs_without_epsg_code_runs_and_never_stores_infinite_coordinates(ray_session, tmp_path):
    goes = str(SHARED_DATA / "samples" / "goes.tif")  # geostationary projection; its corners are off the disk
    summary = run_job(load_job(write_job(tmp_path / "job.yaml", scenes=[goes], bands={"green": 2, "nir": 3})))
    assert not summary.failed
    for table in ("objects", "scenes", "tiles"):
        frame = gpd.read_parquet(summary.tables[table])
        located = frame.geometry.dropna().to_numpy()
        assert np.isfinite(shapely.bounds(located)).all(), table
    assert gpd.read_parquet(summary.tables["scenes"]).geometry.isna().all()  # its extent has no lon/lat footprint
