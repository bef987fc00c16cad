"""Regional mosaics: scenes of any grid composited onto one regional grid, newest first, objects once."""

import datetime as dt

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from conftest import NAIP_2010, NAIP_BANDS, REPO, SHARED_DATA, open_mosaic, write_job
from odc.geo.geom import Geometry
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.windows import Window

from geobatch.errors import JobSpecError
from geobatch.jobs import RegionSpec, load_job
from geobatch.ledger import job_fingerprint
from geobatch.pipeline import run_job
from geobatch.regions import make_region, region_grid
from geobatch.scenes import BandSource, SceneRef, open_scene
from geobatch.stitch import LABEL_NODATA

RGB_BYTE = SHARED_DATA / "samples" / "RGB.byte.tif"
PIECES = [SHARED_DATA / "samples" / "mosaic" / f"rgb{i}.tif" for i in range(1, 5)]
FAKE_NIR = {"nir": 1}  # the RGB samples have no NIR: their red band stands in (as in test_samples)


def region_of(path, name="region", crs=None, **fields):
    """A region block on the grid of the file at ``path`` (its CRS, pixel size and bounds)."""
    with rasterio.open(path) as src:
        resolution = [src.transform.a, -src.transform.e]
        return {"name": name, "crs": crs or src.crs.to_string(), "resolution": resolution, "bounds": list(src.bounds)}


def objects_of(summary):
    return gpd.read_parquet(summary.output / "catalog" / "objects")


@pytest.fixture(scope="module")
def pieces_and_whole(ray_session, tmp_path_factory):
    """RGB.byte run whole, and its four pieces run as four scenes into a region on RGB.byte's grid."""
    folder = tmp_path_factory.mktemp("pieces")
    whole = run_job(load_job(write_job(folder / "whole.yaml", output="whole", scenes=[str(RGB_BYTE)], bands=FAKE_NIR)))
    scenes = [{"uri": str(p), "acquired_at": f"2020-0{i}-01"} for i, p in enumerate(PIECES, start=1)]
    region = region_of(RGB_BYTE, "rgb")
    pieces = run_job(
        load_job(write_job(folder / "pieces.yaml", output="pieces", scenes=scenes, bands=FAKE_NIR, region=region))
    )
    return whole, pieces


def test_four_pieces_give_the_mask_of_the_whole_scene(pieces_and_whole):
    whole, pieces = pieces_and_whole
    assert not whole.failed and not pieces.failed
    mosaic = open_mosaic(pieces.output / "mosaics" / "rgb.zarr")
    expected = open_mosaic(whole.output / "mosaics" / "RGB.byte.zarr")
    assert np.array_equal(mosaic["label"].values, expected["label"].values)
    assert np.isin(mosaic["label"].values, [0, 1]).any() and (mosaic["label"].values == 1).any()
    assert mosaic.rio.crs == expected.rio.crs and mosaic.rio.transform() == expected.rio.transform()


def test_four_pieces_give_the_objects_of_the_whole_scene_once(pieces_and_whole):
    whole, pieces = pieces_and_whole
    got, expected = objects_of(pieces), objects_of(whole)
    assert (got.scene_id == "rgb").all() and (expected.scene_id == "RGB.byte").all()
    got.index = got.object_id.str.removeprefix("rgb:")
    expected.index = expected.object_id.str.removeprefix("RGB.byte:")
    assert len(got) == len(expected) > 0 and set(got.index) == set(expected.index)
    got = got.loc[expected.index]
    assert got.geometry.geom_equals(expected.geometry).all()
    assert np.allclose(got.area_m2, expected.area_m2) and (got.pixels.values == expected.pixels.values).all()
    # some objects cross the pieces' seams (pieces overlap by one pixel at column 399 and row 399)
    instance = open_mosaic(pieces.output / "mosaics" / "rgb.zarr")["instance"].values
    across_columns = (set(np.unique(instance[:, :399])) & set(np.unique(instance[:, 400:]))) - {0}
    across_rows = (set(np.unique(instance[:399])) & set(np.unique(instance[400:]))) - {0}
    assert across_columns and across_rows


def test_every_source_is_listed_with_the_region(pieces_and_whole):
    _, pieces = pieces_and_whole
    table = gpd.read_parquet(pieces.tables["scenes"]).set_index("scene_id")
    assert set(table.index) == {"rgb", "rgb1", "rgb2", "rgb3", "rgb4"}
    assert (table.status == "done").all()
    assert table.loc["rgb2", "reason"] == "composited into region 'rgb'"
    assert table.loc["rgb", "tiles_done"] > 0 and table.loc["rgb1", "tiles_done"] == 0
    # the region's objects carry its newest source's date
    assert (objects_of(pieces).acquired_at == table.loc["rgb4", "acquired_at"]).all()


def test_rerunning_a_region_job_resumes_it_and_infers_nothing(pieces_and_whole):
    _, pieces = pieces_and_whole
    again = run_job(load_job(pieces.output.parent / "pieces.yaml"))
    assert again.resumed and again.run_id == pieces.run_id and again.tiles_inferred == 0
    assert again.scenes == pieces.scenes and len(objects_of(again)) == len(objects_of(pieces))


def test_the_region_decides_the_run():
    spec = load_job(REPO / "jobs" / "example.yaml")
    region = RegionSpec(**region_of(NAIP_2010))
    with_region = spec.model_copy(update={"region": region})
    renamed = spec.model_copy(update={"region": region.model_copy(update={"name": "other"})})
    assert len({job_fingerprint(spec), job_fingerprint(with_region), job_fingerprint(renamed)}) == 3


def crop(source, target, window, **profile_changes):
    """Write ``window`` of ``source`` to ``target`` (on the same grid); returns ``target``."""
    with rasterio.open(source) as src:
        profile = src.profile | {
            "width": window.width,
            "height": window.height,
            "transform": src.window_transform(window),
        }
        profile.update(profile_changes)
        data = src.read(window=window)
    with rasterio.open(target, "w", **profile) as dst:
        dst.write(data)
    return target


def warp(source, target, crs):
    """``source`` warped to ``crs`` (nearest: the values stay NAIP's), nodata 0 around it."""
    with rasterio.open(source) as src:
        transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        profile = src.profile | {"crs": crs, "transform": transform, "width": width, "height": height, "nodata": 0}
        with rasterio.open(target, "w", **profile) as dst:
            for band in range(1, src.count + 1):
                reproject(rasterio.band(src, band), rasterio.band(dst, band), resampling=Resampling.nearest)
    return target


def test_scenes_in_two_crss_meet_without_a_seam_and_objects_across_it_appear_once(ray_session, tmp_path):
    """NAIP's west part stays in UTM 14, its east part is warped to UTM 13; the region is NAIP's own grid."""
    with rasterio.open(NAIP_2010) as src:
        height, width = src.shape
    seam = width // 2
    west = crop(NAIP_2010, tmp_path / "west.tif", Window(0, 0, seam + 4, height))
    east_utm14 = crop(NAIP_2010, tmp_path / "east14.tif", Window(seam - 4, 0, width - seam + 4, height))
    east = warp(east_utm14, tmp_path / "east.tif", "EPSG:32613")
    whole = run_job(load_job(write_job(tmp_path / "whole.yaml", output="whole")))
    scenes = [{"uri": str(west), "acquired_at": "2010-06-29"}, {"uri": str(east), "acquired_at": "2010-06-29"}]
    job = write_job(tmp_path / "region.yaml", output="region", scenes=scenes, region=region_of(NAIP_2010))
    region = run_job(load_job(job))
    assert not region.failed
    label = open_mosaic(region.output / "mosaics" / "region.zarr")["label"].values
    expected = open_mosaic(whole.output / "mosaics" / f"{NAIP_2010.stem}.zarr")["label"].values
    switch = seam + 4  # one date: the west scene (first in the job) wins the overlap, the east one fills from here
    assert (expected != LABEL_NODATA).all()
    # no gap at the seam or anywhere inside; the east scene's outer edge pixels may be lost to its two warps
    assert (label[1:-1, 1:-1] != LABEL_NODATA).all() and (label[:, switch - 16 : switch + 16] != LABEL_NODATA).all()
    assert np.array_equal(label[:, :switch], expected[:, :switch])  # the west scene, read not warped
    # the east scene was warped twice (nearest to UTM 13, bilinear back): ~97 % of its pixels keep their class
    assert (label[:, switch:] == expected[:, switch:]).mean() > 0.95
    with rasterio.open(NAIP_2010) as src:
        crs, x = src.crs, src.transform.c + switch * src.transform.a
        seam_line = shapely.LineString([(x, src.bounds.bottom), (x, src.bounds.top)])
    objects, reference = objects_of(region).to_crs(crs), objects_of(whole).to_crs(crs)
    crossing = reference[reference.intersects(seam_line) & (reference.pixels > 50)]
    assert len(crossing) > 0
    for geometry in crossing.geometry:
        overlapping = objects[objects.intersects(seam_line) & objects.intersects(geometry)]
        shares = overlapping.intersection(geometry).area / geometry.area
        assert shares.max() > 0.9 and (shares > 0.05).sum() == 1  # one object, not a west and an east half


def test_the_newest_scene_wins_where_scenes_overlap(ray_session, tmp_path):
    """A 'flooded' copy of part of NAIP (green high, NIR low: water everywhere) against the original."""
    with rasterio.open(NAIP_2010) as src:
        height, width = src.shape
    part = Window(width // 4, height // 4, width // 2, height // 2)
    flooded = crop(NAIP_2010, tmp_path / "flooded.tif", part)
    with rasterio.open(flooded, "r+") as dst:
        dst.write(np.full((part.height, part.width), 200, np.uint8), NAIP_BANDS["green"])
        dst.write(np.full((part.height, part.width), 10, np.uint8), NAIP_BANDS["nir"])
    rows, cols = part.toslices()
    labels = {}
    for flood_date in ("2011-01-01", "2009-01-01"):
        scenes = [
            {"uri": str(NAIP_2010), "acquired_at": "2010-06-29"},
            {"uri": str(flooded), "acquired_at": flood_date},
        ]
        job = write_job(tmp_path / f"{flood_date}.yaml", output=flood_date, scenes=scenes, region=region_of(NAIP_2010))
        summary = run_job(load_job(job))
        assert not summary.failed
        labels[flood_date] = open_mosaic(summary.output / "mosaics" / "region.zarr")["label"].values
        assert (objects_of(summary).acquired_at.dt.strftime("%Y-%m-%d") == max(flood_date, "2010-06-29")).all()
    newer, older = labels["2011-01-01"], labels["2009-01-01"]
    assert (newer[rows, cols] == 1).all()  # the flooded scene is newer: its pixels win
    assert (older[rows, cols] == 0).mean() > 0.3  # the original is newer: its own classes (half of it dry land)
    outside = np.ones(newer.shape, bool)
    outside[rows, cols] = False
    assert np.array_equal(newer[outside], older[outside])  # elsewhere only the original has data


def test_a_scene_outside_the_region_is_reported_not_failed(ray_session, tmp_path):
    region = region_of(NAIP_2010) | {"bounds": [0, 0, 1000, 1000]}  # UTM 14 false origin: far from NAIP
    summary = run_job(load_job(write_job(tmp_path / "job.yaml", region=region)))
    outcomes = {s.scene_id: s for s in summary.scenes}
    assert outcomes[NAIP_2010.stem].status == "skipped" and "outside region" in outcomes[NAIP_2010.stem].reason
    assert outcomes["region"].status == "skipped" and not summary.failed


@pytest.mark.parametrize(
    "region, field_name",
    [
        ({"crs": "EPSG:999999"}, "region.crs"),
        ({"bounds": [10, 0, 0, 10]}, "region.bounds"),
        ({"bounds": [0, 0, 10]}, "region.bounds"),
        ({"resolution": 0}, "region.resolution"),
        ({"name": "../up"}, "region.name"),
        ({"overlap": "best"}, "region.overlap"),
        ({"bounds_crs": "not a crs"}, "region.bounds_crs"),
    ],
)
def test_a_bad_region_field_is_named(tmp_path, region, field_name):
    block = {"name": "r", "crs": "EPSG:32614", "resolution": 10, "bounds": [0, 0, 100, 100]} | region
    with pytest.raises(JobSpecError) as caught:
        load_job(write_job(tmp_path / "job.yaml", region=block))
    assert f"field '{field_name}" in str(caught.value) and "\n" not in str(caught.value)


def open_pieces(*dates):
    """The four RGB.byte pieces as opened scenes, dated ``dates`` (None: undated)."""
    refs = [SceneRef(p.stem, str(p), date, {"nir": BandSource(str(p), 1)}, str(p)) for p, date in zip(PIECES, dates)]
    return [open_scene(ref, ["green", "nir"]) for ref in refs]


def test_sources_are_ordered_newest_first_undated_last_equal_dates_in_job_order():
    day = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    scenes = open_pieces(None, day, day + dt.timedelta(days=1), day)
    region = make_region(RegionSpec(**region_of(RGB_BYTE)), scenes)
    assert [s.scene.scene_id for s in region.sources] == ["rgb3", "rgb2", "rgb4", "rgb1"]
    assert region.acquired_at == day + dt.timedelta(days=1)


def test_a_tile_carries_only_the_sources_reaching_it():
    region = make_region(RegionSpec(**region_of(RGB_BYTE)), open_pieces(None, None, None, None))
    assert [s.scene.scene_id for s in region.reaching(Window(0, 0, 100, 100)).sources] == ["rgb1"]
    assert len(region.reaching(Window(350, 350, 100, 100)).sources) == 4


def test_region_bounds_may_be_given_in_another_crs():
    spec = RegionSpec(name="r", crs="EPSG:32618", resolution=300, bounds=[-77, 24, -76, 25], bounds_crs="EPSG:4326")
    grid = region_grid(spec)
    corners = Geometry(shapely.box(-77, 24, -76, 25), "EPSG:4326").to_crs("EPSG:32618")
    assert grid.extent.contains(corners) and grid.resolution.xy == (300, -300)
    assert grid.extent.area < corners.area * 1.5  # covers the box, not the world


def test_a_snapped_region_puts_pixel_edges_on_multiples_of_the_resolution():
    spec = RegionSpec(name="r", crs="EPSG:32618", resolution=30, bounds=[101985.3, 2611485.7, 339315.2, 2826915.9])
    loose, snapped = region_grid(spec), region_grid(spec.model_copy(update={"snap": True}))
    assert (loose.affine.c, loose.affine.f) == (101985.3, 2826915.9)
    assert (snapped.affine.c, snapped.affine.f) == (101970, 2826930)
    assert snapped.extent.contains(loose.extent)
