import numpy as np
import pytest
import rasterio
from conftest import NAIP_2010, NAIP_BANDS, SHARED_DATA, write_job
from rasterio.enums import Resampling
from rasterio.windows import Window

from geobatch.errors import JobSpecError, MissingBand, SceneUnreadable
from geobatch.jobs import load_job
from geobatch.scenes import BandSource, SceneReader, SceneRef, discover, open_scene

SAMPLES = SHARED_DATA / "samples"


def ref(path, bands=None) -> SceneRef:
    sources = {name: BandSource(str(path), index) for name, index in (bands or {}).items()}
    return SceneRef(path.stem, str(path), None, sources, str(path))


def naip_copy(path, transform=lambda data: data, overviews=(2, 4), resampling=Resampling.average):
    """Write NAIP 2010 to ``path`` after ``transform`` of its pixels, tiled and with ``overviews`` like a COG."""
    with rasterio.open(NAIP_2010) as src:
        data, profile = transform(src.read()), src.profile
    profile.update(dtype=data.dtype.name, height=data.shape[1], width=data.shape[2], photometric="MINISBLACK")
    with rasterio.open(path, "w", **profile) as dst:  # MINISBLACK: band 4 is NIR, not alpha
        dst.write(data)
        if overviews:
            dst.build_overviews(list(overviews), resampling)
    return path


def test_open_naip_reads_grid_and_bands_without_pixels():
    scene = open_scene(ref(NAIP_2010, NAIP_BANDS), ("green", "nir"))
    with rasterio.open(NAIP_2010) as src:
        assert scene.shape == src.shape
        assert scene.geobox.affine == src.transform
        assert scene.geobox.crs.epsg == 26914
    assert scene.bands == {"green": BandSource(str(NAIP_2010), 2), "nir": BandSource(str(NAIP_2010), 4)}


def test_bands_come_from_colour_interpretation_when_the_job_names_none():
    scene = open_scene(ref(SAMPLES / "RGB.byte.tif"), ("red", "green"))
    assert {name: source.index for name, source in scene.bands.items()} == {"red": 1, "green": 2}


def test_a_missing_nir_band_is_a_clear_error_not_a_guess():
    path = SAMPLES / "RGB.byte.tif"
    with pytest.raises(MissingBand, match=r"RGB\.byte\.tif: the model needs band\(s\) \['nir'\].*'bands' field"):
        open_scene(ref(path), ("green", "nir"))
    with pytest.raises(MissingBand, match=r"band 'nir' is mapped to band 4 but the file has 3 band\(s\)"):
        open_scene(ref(path, NAIP_BANDS), ("green", "nir"))


@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing.tif", "file not found"),
        ("rotated.tif", "has a rotated or sheared geotransform .*; has no CRS"),
        ("float_nan.tif", "has no CRS"),
    ],
)
def test_unusable_files_are_rejected_with_the_reason(name, reason):
    with pytest.raises(SceneUnreadable, match=f"{name}: {reason}"):
        open_scene(ref(SAMPLES / name), ())


def test_window_read_equals_the_same_slice_of_a_whole_read():
    scene = open_scene(ref(NAIP_2010, NAIP_BANDS), ("green", "nir"))
    window = Window(300, 200, 123, 77)
    pixels = SceneReader().read(scene, window, ("green", "nir"))
    with rasterio.open(NAIP_2010) as src:
        whole = src.read([2, 4])
    rows, cols = window.toslices()
    assert pixels.bands["green"].dtype == np.float32
    assert np.array_equal(pixels.bands["green"], whole[0, rows, cols])
    assert np.array_equal(pixels.bands["nir"], whole[1, rows, cols])
    assert pixels.valid.shape == (77, 123)


def test_nodata_pixels_are_invalid(tmp_path):
    def punch_hole(data):
        data[3, 10:20, 30:40] = 0  # NIR missing there: those pixels cannot be judged
        return data

    path = naip_copy(tmp_path / "holes.tif", punch_hole)
    scene = open_scene(ref(path, NAIP_BANDS), ("green", "nir"))
    valid = SceneReader().read(scene, Window(0, 0, 64, 64), ("green", "nir")).valid
    with rasterio.open(path) as src:
        data = src.read(window=Window(0, 0, 64, 64))
    assert not valid[10:20, 30:40].any()
    assert np.array_equal(valid, (data[1] != 0) & (data[3] != 0))


def test_an_alpha_band_masks_pixels():
    scene = open_scene(ref(SAMPLES / "RGBA.byte.tif"), ("red", "green"))
    valid = SceneReader().read(scene, Window(0, 0, 791, 718), ("red", "green")).valid
    with rasterio.open(SAMPLES / "RGBA.byte.tif") as src:
        alpha = src.read(4)
    assert 0 < valid.sum() < valid.size
    assert np.array_equal(valid, alpha > 0)


def test_a_corrupt_window_names_the_gdal_reason():
    path = SAMPLES / "corrupt.tif"
    scene = open_scene(ref(path, {"green": 2, "nir": 3}), ("green", "nir"))
    reader = SceneReader()
    assert reader.read(scene, Window(0, 0, 256, 256), ("green", "nir")).valid.all()
    with pytest.raises(SceneUnreadable, match=r"corrupt\.tif: cannot read window .*IReadBlock failed"):
        reader.read(scene, Window(600, 600, 100, 100), ("green", "nir"))


def test_a_target_resolution_reads_block_averages_on_a_coarser_grid(tmp_path):
    path = naip_copy(tmp_path / "plain.tif", overviews=())
    scene = open_scene(ref(path, NAIP_BANDS), ("green", "nir"), resolution=10.0)
    with rasterio.open(path) as src:
        assert scene.shape == (src.height // 2, src.width // 2)
        assert scene.geobox.affine == src.transform @ src.transform.scale(2)
        green = src.read(2, window=Window(200, 100, 128, 64)).astype(np.float64)
    pixels = SceneReader().read(scene, Window(100, 50, 64, 32), ("green",))
    block_means = green.reshape(32, 2, 64, 2).mean(axis=(1, 3))
    assert np.abs(pixels.bands["green"] - block_means).max() <= 0.5  # GDAL rounds averages to uint8


def test_a_target_resolution_matching_an_overview_reads_the_overview(tmp_path):
    path = naip_copy(tmp_path / "even.tif", lambda d: d[:, :722, :], overviews=(2,), resampling=Resampling.nearest)
    with rasterio.open(path, overview_level=0) as overview:
        expected = overview.read(2, window=Window(30, 20, 64, 64))
    scene = open_scene(ref(path, NAIP_BANDS), ("green",), resolution=10.0)
    green = SceneReader().read(scene, Window(30, 20, 64, 64), ("green",)).bands["green"]
    assert np.array_equal(green, expected)  # nearest-neighbour overview pixels, not averages of 2x2 blocks


def test_a_target_resolution_in_metres_applies_to_a_scene_in_degrees():
    landsat = SHARED_DATA / "landsat" / "pucallpa_2020.tif"  # EPSG:4326, about 8.4 degrees south
    scene = open_scene(ref(landsat, {"red": 3}), ("red",), resolution=100.0)
    step_x, step_y = scene.geobox.resolution.xy
    assert step_y == pytest.approx(-100 / 111_320)
    assert step_x == pytest.approx(100 / (111_320 * np.cos(np.radians(8.4))), rel=0.01)


def test_bands_in_files_of_different_resolutions_share_the_finest_grid(tmp_path):
    with rasterio.open(NAIP_2010) as src:
        profile, green, nir = src.profile, src.read(2), src.read(4, out_shape=(src.height // 2, src.width // 2))
        transform, nir_5m = src.transform, src.read(4, window=Window(0, 0, 404, 304)).astype(np.float32)
    profile.update(count=1)
    with rasterio.open(tmp_path / "green.tif", "w", **profile) as dst:
        dst.write(green, 1)
    profile.update(width=nir.shape[1], height=nir.shape[0], transform=transform @ transform.scale(2))
    with rasterio.open(tmp_path / "nir.tif", "w", **profile) as dst:
        dst.write(nir, 1)
    sources = {"green": BandSource(str(tmp_path / "green.tif"), 1), "nir": BandSource(str(tmp_path / "nir.tif"), 1)}
    scene = open_scene(SceneRef("split", "split", None, sources, None), ("green", "nir"))
    assert scene.shape == green.shape and scene.geobox.affine == transform
    pixels = SceneReader().read(scene, Window(0, 0, 400, 300), ("green", "nir"))
    assert np.array_equal(pixels.bands["green"], green[:300, :400])
    # Resampled onto the 5 m grid in the right place: closer to the true 5 m NIR than a 2-pixel shift of it.
    error = np.abs(pixels.bands["nir"] - nir_5m[:300, :400]).mean()
    shifted = np.abs(pixels.bands["nir"] - nir_5m[2:302, 2:402]).mean()
    assert error < 0.6 * shifted


def test_16_bit_scenes_are_stretched_for_display_models_from_an_overview(tmp_path):
    rng = np.random.default_rng(0)
    path = naip_copy(tmp_path / "naip16.tif", lambda d: d.astype(np.uint16) * 257 + rng.integers(0, 257, d.shape))
    scene = open_scene(ref(path, NAIP_BANDS), ("green",), values="display")
    with rasterio.open(path) as src:
        full = src.read(2, masked=True).compressed()
    low, high = np.percentile(full, [2, 98])
    value_map = scene.values["green"]
    assert value_map.apply(np.array([low, high])) == pytest.approx([0, 255], abs=255 * 0.02)
    pixels = SceneReader().read(scene, Window(0, 0, 256, 256), ("green",)).bands["green"]
    assert pixels.min() >= 0 and pixels.max() <= 255


def test_8_bit_scenes_reach_display_models_unchanged_and_physical_models_scaled(tmp_path):
    assert open_scene(ref(NAIP_2010, NAIP_BANDS), ("green",), values="display").values["green"].apply(
        np.array([7])
    ) == pytest.approx([7])
    path = naip_copy(tmp_path / "scaled.tif")
    with rasterio.open(path, "r+") as dst:
        dst.scales, dst.offsets = [0.01] * 4, [-0.1] * 4
    scaled = open_scene(ref(path, NAIP_BANDS), ("nir",)).values["nir"]
    assert scaled.apply(np.array([110])) == pytest.approx([1.0])


def test_the_acquisition_time_comes_from_the_entry_then_the_file_tag_then_the_job(tmp_path):
    tagged = SAMPLES / "all-nodata.tif"  # TIFFTAG_DATETIME 2022:01:17 10:43:43
    scenes = [str(tagged), {"uri": str(SAMPLES / "cogeo.tif"), "acquired_at": "2020-05-01T10:00:00"}, str(NAIP_2010)]
    spec = load_job(write_job(tmp_path / "job.yaml", scenes=scenes, bands={"red": 1}, acquired_at="2019-01-01"))
    refs, _ = discover(spec)
    times = [open_scene(ref, ("red",)).acquired_at.isoformat() for ref in refs]
    assert times == ["2022-01-17T10:43:43+00:00", "2020-05-01T10:00:00+00:00", "2019-01-01T00:00:00+00:00"]


def test_discover_expands_globs_and_records_what_matches_nothing(tmp_path, sample):
    a = sample("naip/m_4709963_se_14_1_20100629.tif")
    b = sample("naip/m_4709963_se_14_1_20150926.tif")
    spec = load_job(write_job(tmp_path / "job.yaml", scenes=["data/*.tif", str(a), "nothing/*.tif"]))
    refs, failures = discover(spec)
    assert [r.uri for r in refs] == [str(a), str(b)]  # sorted, and a file named twice is one scene
    assert [(f.uri, f.reason) for f in failures] == [(str(tmp_path / "nothing/*.tif"), "no file matches this pattern")]


def test_a_scene_entry_band_map_overrides_the_job_one(tmp_path):
    landsat = SHARED_DATA / "landsat" / "pucallpa_2020.tif"
    scenes = [str(NAIP_2010), {"uri": str(landsat), "bands": {"swir1": 1, "nir": 2, "red": 3, "green": 4}}]
    refs, _ = discover(load_job(write_job(tmp_path / "job.yaml", scenes=scenes)))
    assert refs[0].bands["nir"] == BandSource(str(NAIP_2010), 4)
    assert refs[1].bands["nir"] == BandSource(str(landsat), 2) and refs[1].bands["green"].index == 4


def test_asset_keys_in_a_plain_file_entry_are_rejected(tmp_path):
    with pytest.raises(JobSpecError, match=r"field 'scenes\.0'.*apply only to STAC entries"):
        load_job(write_job(tmp_path / "job.yaml", scenes=[{"uri": "a.tif", "bands": {"nir": "B08"}}]))


def test_two_files_with_one_scene_id_are_not_merged(tmp_path):
    first, second = tmp_path / "a" / "x.tif", tmp_path / "b" / "x.tif"
    spec = load_job(write_job(tmp_path / "job.yaml", scenes=[str(first), str(second)]))
    refs, failures = discover(spec)
    assert [r.uri for r in refs] == [str(first)]
    assert "already used by" in failures[0].reason and failures[0].uri == str(second)
