"""STAC ItemCollections built from the NAIP files drive discovery and runs."""

import datetime as dt
import json

import geopandas as gpd
import numpy as np
import pystac
import pytest
import rasterio
from conftest import NAIP_2010, SHARED_DATA, open_mosaic, write_job

from geobatch.jobs import load_job
from geobatch.pipeline import run_job
from geobatch.scenes import BandSource, discover

NAIP_FILES = sorted((SHARED_DATA / "naip").glob("*.tif"))[:3]
EO_BANDS = [{"name": f"B{i}", "common_name": c} for i, c in enumerate(("red", "green", "blue", "nir"), start=1)]


def naip_item(path, assets) -> pystac.Item:
    """An item for one NAIP file, dated by the date in its name, with the given assets."""
    with rasterio.open(path) as src:
        bounds = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    when = dt.datetime.strptime(path.stem.rsplit("_", 1)[-1], "%Y%m%d").replace(hour=17, tzinfo=dt.UTC)
    item = pystac.Item(path.stem, None, list(bounds), when, {})
    for key, asset in assets.items():
        item.add_asset(key, asset)
    return item


def image_asset(href, bands=EO_BANDS) -> pystac.Asset:
    return pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["data"], extra_fields={"eo:bands": bands})


def write_collection(path, items) -> str:
    path.write_text(json.dumps(pystac.ItemCollection(items).to_dict(transform_hrefs=False)))
    return str(path)


def split_bands(path, folder) -> dict[str, pystac.Asset]:
    """One single-band COG per band, described as STAC 1.1 ``bands`` with a reflectance scale."""
    assets = {}
    with rasterio.open(path) as src:
        profile = src.profile | {"count": 1, "photometric": "MINISBLACK"}
        for index, band in enumerate(EO_BANDS, start=1):
            target = folder / f"{path.stem}_{band['name']}.tif"
            with rasterio.open(target, "w", **profile) as dst:
                dst.write(src.read(index), 1)
            described = [{"name": band["name"], "eo:common_name": band["common_name"], "scale": 0.01}]
            assets[band["name"]] = pystac.Asset(
                target.name, media_type=pystac.MediaType.COG, roles=["data"], extra_fields={"bands": described}
            )
    return assets


def test_an_item_collection_names_scenes_dates_and_bands(tmp_path):
    stac = write_collection(tmp_path / "items.json", [naip_item(p, {"image": image_asset(str(p))}) for p in NAIP_FILES])
    refs, failures = discover(load_job(write_job(tmp_path / "job.yaml", scenes=[stac], bands={})))
    assert not failures
    assert [r.scene_id for r in refs] == [p.stem for p in NAIP_FILES]
    assert refs[1].acquired_at == dt.datetime(2010, 6, 29, 17, tzinfo=dt.UTC)
    assert refs[0].bands["nir"] == BandSource(str(NAIP_FILES[0]), 4)
    assert refs[0].file == str(NAIP_FILES[0])


def test_a_saved_api_search_with_relative_hrefs_and_extra_assets_is_understood(tmp_path):
    item = naip_item(NAIP_2010, {"image": image_asset(NAIP_2010.name)})
    item.add_asset("thumbnail", pystac.Asset("thumb.png", media_type=pystac.MediaType.PNG, roles=["thumbnail"]))
    search = pystac.ItemCollection([item]).to_dict(transform_hrefs=False)
    search |= {"numberMatched": 1, "numberReturned": 1, "links": [{"rel": "next", "href": "https://stac.example/x"}]}
    (SHARED := tmp_path / "naip").mkdir()
    (SHARED / NAIP_2010.name).symlink_to(NAIP_2010)
    (SHARED / "search.json").write_text(json.dumps(search))
    refs, failures = discover(load_job(write_job(tmp_path / "job.yaml", scenes=["naip/search.json"], bands={})))
    assert not failures
    assert refs[0].bands["green"] == BandSource(str(SHARED / NAIP_2010.name), 2)  # href relative to the file


def test_stac_problems_are_scene_failures_with_reasons(tmp_path):
    stac = write_collection(tmp_path / "items.json", [naip_item(NAIP_2010, {"image": image_asset(str(NAIP_2010))})])
    (tmp_path / "broken.json").write_text("{ not json")
    scenes = [{"uri": stac, "asset": "visual"}, "broken.json"]
    refs, failures = discover(load_job(write_job(tmp_path / "job.yaml", scenes=scenes, bands={})))
    assert not refs
    missing_asset, broken = (f.reason for f in failures)
    assert missing_asset == f"item '{NAIP_2010.stem}' has no asset 'visual'; it has ['image']"
    assert broken.startswith("not a readable STAC ItemCollection or Item: ")


def test_one_asset_per_band_runs_like_the_multiband_file(ray_session, tmp_path):
    items = [naip_item(NAIP_2010, split_bands(NAIP_2010, tmp_path))]
    stac = write_collection(tmp_path / "items.json", items)
    spec = load_job(write_job(tmp_path / "job.yaml", scenes=[stac], bands={}, output="from-stac"))
    summary = run_job(spec)
    assert [s.status for s in summary.scenes] == ["done"]
    reference = load_job(write_job(tmp_path / "ref.yaml", output="from-file"))
    run_job(reference)
    stac_label = open_mosaic(spec.output / "mosaics" / f"{NAIP_2010.stem}.zarr")["label"].values
    file_label = open_mosaic(reference.output / "mosaics" / f"{NAIP_2010.stem}.zarr")["label"].values
    assert np.array_equal(stac_label, file_label)  # NDWI ignores the common 0.01 reflectance scale
    objects = gpd.read_parquet(summary.tables["objects"])
    assert (objects.acquired_at == dt.datetime(2010, 6, 29, 17, tzinfo=dt.UTC)).all()


@pytest.mark.parametrize(
    "scene, message",
    [
        ({"uri": "a.json", "bands": {"nir": 4}}, "band indexes in a STAC entry need 'asset'"),
        ({"uri": "a.json", "asset": "image", "bands": {"nir": "B4"}}, "with 'asset' set they must be band indexes"),
    ],
)
def test_inconsistent_stac_band_references_are_job_errors(tmp_path, scene, message):
    from geobatch.errors import JobSpecError

    with pytest.raises(JobSpecError, match=message):
        load_job(write_job(tmp_path / "job.yaml", scenes=[scene]))
