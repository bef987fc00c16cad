"""Every sample file either runs or is rejected with the reason expected for it, and nodata is never labelled."""

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import NAIP_2010, SHARED_DATA, open_mosaic, write_job

from geobatch.jobs import load_job
from geobatch.pipeline import run_job
from geobatch.stitch import LABEL_NODATA

SAMPLES = SHARED_DATA / "samples"
FAKE_NIR = {"nir": 1}  # RGB samples have no NIR; their red band stands in so that they can run

# file -> (band map of its entry, expected scene status, expected text in the reason)
EXPECTED = {
    "RGB.byte.tif": (FAKE_NIR, "done", None),
    "RGBA.byte.tif": (FAKE_NIR, "done", None),
    "all-nodata.tif": ({}, "skipped", "no valid pixels: all 10 tiles are nodata"),  # NIR named by its description
    "cogeo.tif": (FAKE_NIR, "done", None),
    "corrupt.tif": (FAKE_NIR, "partial", "IReadBlock failed"),
    "float_nan.tif": ({}, "failed", "has no CRS"),
    "goes.tif": (FAKE_NIR, "done", None),  # geostationary: a CRS with no EPSG code
    "rgb1_fake_nir_epsg3857.tif": ({}, "failed", "the model needs band(s) ['green', 'nir']"),
    "rotated.tif": ({}, "failed", "rotated or sheared geotransform"),
    "shade.tif": ({}, "failed", "the model needs band(s) ['green', 'nir']"),
    "world.rgb.tif": (FAKE_NIR, "done", None),
    "rgb1.tif": (FAKE_NIR, "done", None),  # mosaic/rgb1..4: pieces of RGB.byte with nodata edges
    "rgb2.tif": (FAKE_NIR, "done", None),
    "rgb3.tif": (FAKE_NIR, "done", None),
    "rgb4.tif": (FAKE_NIR, "done", None),
}


@pytest.fixture(scope="module")
def samples_run(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    files = sorted(SAMPLES.glob("*.tif")) + sorted(SAMPLES.glob("mosaic/*.tif"))
    assert sorted(f.name for f in files) == sorted(EXPECTED)  # a new sample must get an expectation
    scenes = [{"uri": str(f), "bands": EXPECTED[f.name][0]} for f in files]
    spec = load_job(write_job(folder / "job.yaml", scenes=scenes, bands={}))
    return run_job(spec), {f.stem: f for f in files}


def test_every_sample_runs_or_is_rejected_with_its_reason(samples_run):
    summary, files = samples_run
    outcomes = {s.scene_id: s for s in summary.scenes}
    for stem, path in files.items():
        _, status, reason = EXPECTED[path.name]
        assert outcomes[stem].status == status, (path.name, outcomes[stem].reason)
        if reason:
            assert reason in outcomes[stem].reason, path.name
    assert summary.failed  # the job says that something was lost


def test_the_scene_table_records_each_outcome_with_its_reason(samples_run):
    summary, files = samples_run
    table = gpd.read_parquet(summary.tables["scenes"]).set_index("scene_id")
    assert set(table.index) == set(files)
    assert table.loc["all-nodata", "tiles_skipped"] == 10 and table.loc["all-nodata", "tiles_done"] == 0
    assert "IReadBlock failed" in table.loc["corrupt", "reason"]
    assert table.loc["corrupt", "tiles_failed"] > 0 and table.loc["corrupt", "tiles_done"] > 0


@pytest.mark.parametrize("stem", ["RGB.byte", "RGBA.byte", "cogeo", "corrupt", "goes", "world.rgb", "rgb1"])
def test_nodata_masked_and_unread_pixels_are_never_labelled(samples_run, stem):
    summary, files = samples_run
    scene = next(s for s in summary.scenes if s.scene_id == stem)
    label = open_mosaic(scene.mosaic)["label"].values
    with rasterio.open(files[stem]) as src:
        valid = (src.read_masks([1, 2]) > 0).all(axis=0)  # nodata, internal mask or alpha of NIR and green
    assert not np.isin(label[~valid], [0, 1]).any()  # invalid pixels hold nodata, never a class
    if stem != "corrupt":
        assert np.isin(label[valid], [0, 1]).all()  # every readable valid pixel got an answer


def test_failed_tiles_of_a_corrupt_file_leave_nodata_not_an_empty_mask(samples_run):
    summary, _ = samples_run
    tiles = gpd.read_parquet(summary.tables["tiles"])
    failed = tiles[(tiles.scene_id == "corrupt") & (tiles.status == "failed")]
    assert len(failed) and failed.reason.str.contains("IReadBlock failed").all()
    label = open_mosaic(next(s.mosaic for s in summary.scenes if s.scene_id == "corrupt"))["label"].values
    for row, col in zip(failed.row, failed.col):
        assert (label[row * 256 : (row + 1) * 256, col * 256 : (col + 1) * 256] == LABEL_NODATA).all()


def test_a_16_bit_scene_gives_the_water_mask_of_the_8_bit_one(ray_session, tmp_path):
    """16-bit = 8-bit x 257 plus the finer detail a 16-bit sensor records (uniform below one 8-bit step)."""
    with rasterio.open(NAIP_2010) as src:
        data, profile = src.read(), src.profile
    rng = np.random.default_rng(1)
    deep = data.astype(np.uint16) * 257 + rng.integers(0, 257, data.shape, dtype=np.uint16) * (data > 0)
    profile.update(dtype="uint16", photometric="MINISBLACK")
    with rasterio.open(tmp_path / "naip16.tif", "w", **profile) as dst:
        dst.write(deep)
    masks = {}
    for name, path in (("8", NAIP_2010), ("16", tmp_path / "naip16.tif")):
        spec = load_job(write_job(tmp_path / f"job{name}.yaml", output=f"out{name}", scenes=[str(path)]))
        assert not run_job(spec).failed
        masks[name] = open_mosaic(spec.output / "mosaics" / f"{path.stem}.zarr")["label"].values
    assert np.array_equal(masks["8"] == LABEL_NODATA, masks["16"] == LABEL_NODATA)
    differing = (masks["8"] != masks["16"]).mean()
    assert differing < 0.005, differing  # stated tolerance: under 0.5 % of pixels, all at NDWI ~ 0
