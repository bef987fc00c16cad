import numpy as np
import pytest
import rasterio
from conftest import NAIP_2010, NAIP_BANDS, SHARED_DATA, write_job
from rasterio.windows import Window

from geobatch.errors import MissingBand, SceneUnreadable
from geobatch.jobs import load_job
from geobatch.scenes import SceneReader, SceneRef, discover, open_scene


def ref(path) -> SceneRef:
    return SceneRef(path.stem, str(path), None)


def test_open_naip_reads_grid_bands_and_nodata_without_pixels():
    scene = open_scene(ref(NAIP_2010), NAIP_BANDS, ("green", "nir"))
    with rasterio.open(NAIP_2010) as src:
        assert scene.shape == src.shape
        assert scene.geobox.affine == src.transform
        assert scene.geobox.crs.epsg == 26914
        assert scene.nodata == src.nodata == 0
    assert scene.band_map == NAIP_BANDS


def test_bands_come_from_colour_interpretation_when_the_job_names_none():
    scene = open_scene(ref(SHARED_DATA / "samples" / "RGB.byte.tif"), {}, ("red", "green"))
    assert scene.band_map == {"red": 1, "green": 2, "blue": 3}


def test_a_missing_nir_band_is_a_clear_error_not_a_guess():
    path = SHARED_DATA / "samples" / "RGB.byte.tif"
    with pytest.raises(MissingBand, match=r"RGB\.byte\.tif: the model needs band\(s\) \['nir'\].*'bands' field"):
        open_scene(ref(path), {}, ("green", "nir"))
    with pytest.raises(MissingBand, match=r"'bands\.nir' is 4 but the file has 3 band\(s\)"):
        open_scene(ref(path), NAIP_BANDS, ("green", "nir"))


@pytest.mark.parametrize(
    "name, reason", [("missing.tif", "file not found"), ("rotated.tif", "has no CRS"), ("float_nan.tif", "has no CRS")]
)
def test_unusable_files_are_rejected_with_the_reason(name, reason):
    path = SHARED_DATA / "samples" / name
    with pytest.raises(SceneUnreadable, match=f"{name}: {reason}"):
        open_scene(ref(path), {}, ())


def test_window_read_equals_the_same_slice_of_a_whole_read():
    scene = open_scene(ref(NAIP_2010), NAIP_BANDS, ("green", "nir"))
    window = Window(300, 200, 123, 77)
    pixels = SceneReader().read(scene, window, ("green", "nir"))
    with rasterio.open(NAIP_2010) as src:
        whole = src.read([2, 4])
    rows, cols = window.toslices()
    assert np.array_equal(pixels.bands["green"], whole[0, rows, cols])
    assert np.array_equal(pixels.bands["nir"], whole[1, rows, cols])
    assert pixels.valid.shape == (77, 123)


def test_nodata_pixels_are_invalid(tmp_path):
    path = tmp_path / "holes.tif"
    with rasterio.open(NAIP_2010) as src:
        data, profile = src.read(), src.profile
    data[3, 10:20, 30:40] = 0  # NIR missing there: those pixels cannot be judged
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    scene = open_scene(ref(path), NAIP_BANDS, ("green", "nir"))
    valid = SceneReader().read(scene, Window(0, 0, 64, 64), ("green", "nir")).valid
    assert not valid[10:20, 30:40].any()
    assert np.array_equal(valid, (data[1, :64, :64] != 0) & (data[3, :64, :64] != 0))


def test_a_corrupt_window_names_the_gdal_reason():
    path = SHARED_DATA / "samples" / "corrupt.tif"
    scene = open_scene(ref(path), {"green": 2, "nir": 3}, ("green", "nir"))
    reader = SceneReader()
    assert reader.read(scene, Window(0, 0, 256, 256), ("green", "nir")).valid.all()
    with pytest.raises(SceneUnreadable, match=r"corrupt\.tif: cannot read window .*IReadBlock failed"):
        reader.read(scene, Window(600, 600, 100, 100), ("green", "nir"))


def test_discover_expands_globs_and_records_what_matches_nothing(tmp_path, sample):
    a = sample("naip/m_4709963_se_14_1_20100629.tif")
    b = sample("naip/m_4709963_se_14_1_20150926.tif")
    spec = load_job(write_job(tmp_path / "job.yaml", scenes=["data/*.tif", str(a), "nothing/*.tif"]))
    refs, failures = discover(spec)
    assert [r.uri for r in refs] == [str(a), str(b)]  # sorted, and a file named twice is one scene
    assert [(f.uri, f.reason) for f in failures] == [(str(tmp_path / "nothing/*.tif"), "no file matches this pattern")]


def test_two_files_with_one_scene_id_are_not_merged(tmp_path):
    first, second = tmp_path / "a" / "x.tif", tmp_path / "b" / "x.tif"
    spec = load_job(write_job(tmp_path / "job.yaml", scenes=[str(first), str(second)]))
    refs, failures = discover(spec)
    assert [r.uri for r in refs] == [str(first)]
    assert "already used by" in failures[0].reason and failures[0].uri == str(second)
