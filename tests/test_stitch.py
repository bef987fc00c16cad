import numpy as np
import xarray as xr
import zarr
from affine import Affine
from odc.geo.geobox import GeoBox

from geobatch.models.base import Instance, TileResult
from geobatch.scenes import Scene
from geobatch.stitch import LABEL_NODATA, Mosaic, compose, create_mosaic, overview_factors
from geobatch.tiling import TileGrid


def instance(mask, score=0.7, score_map=None) -> Instance:
    return Instance(np.asarray(mask, bool), score, "p", score_map)


def utm_scene(scene_id: str, height: int, width: int) -> Scene:
    """A scene's grid alone (10 m UTM pixels), for declaring mosaics: no file is read."""
    geobox = GeoBox((height, width), Affine(10, 0, 500_000, 0, -10, 5_000_000), "EPSG:32633")
    return Scene(scene_id, "unused.tif", None, geobox, {}, {})


def test_earlier_prompt_wins_overlaps_and_nodata_wins_over_everything():
    mosaic = Mosaic("s", "unused", (2, 3), 256, ("water", "vegetation"))
    result = TileResult(
        "t",
        {
            "water": [instance([[1, 1, 0], [0, 0, 0]], score=0.9)],
            "vegetation": [instance([[0, 1, 1], [0, 0, 1]], score_map=np.full((2, 3), 0.6, np.float32))],
        },
    )
    valid = np.array([[1, 1, 1], [1, 1, 0]], bool)
    label, score = compose(mosaic, result, valid)
    assert label.tolist() == [[1, 1, 2], [0, 0, LABEL_NODATA]]
    assert np.allclose(score[0], [0.9, 0.9, 0.6]) and score[1, 0] == 0 and np.isnan(score[1, 2])


def test_a_tile_with_no_instances_is_background_where_valid():
    mosaic = Mosaic("s", "unused", (2, 2), 256, ("water",))
    label, score = compose(mosaic, TileResult("t", {"water": []}), np.array([[1, 0], [1, 1]], bool))
    assert label.tolist() == [[0, LABEL_NODATA], [0, 0]]
    assert np.isnan(score[0, 1]) and (score[[0, 1, 1], [0, 0, 1]] == 0).all()


def test_instance_ids_take_uint32_up_to_2_to_the_32_pixels_and_uint64_beyond_in_every_level(tmp_path):
    """An id is at most a pixel index + 1; the coarser levels hold the full-resolution ids."""
    for side, dtype in ((65_535, np.uint32), (65_537, np.uint64)):
        mosaic = create_mosaic(
            utm_scene(f"s{side}", side, side), TileGrid(8192, 0), ["water"], tmp_path / f"{side}.zarr"
        )
        factors = overview_factors(mosaic)
        assert mosaic.instance_dtype == dtype
        for group in [None, *(f"overviews/{f}" for f in factors)]:
            level = xr.open_zarr(mosaic.path, group=group, consolidated=False)
            assert level["instance"].dtype == dtype, group


def test_a_kept_mosaic_started_without_overview_levels_gets_them_declared(tmp_path):
    """Mosaics are declared with their levels; one kept from a version that declared them only when
    finishing the scene gets them when reopened, chunks written so far kept."""
    scene = utm_scene("s", 3000, 2000)
    mosaic = create_mosaic(scene, TileGrid(1024, 0), ["water"], tmp_path / "s.zarr")
    group = zarr.open_group(mosaic.path, mode="r+")
    group["label"][:1024, :1024] = 1
    del group.attrs["overviews"], group["overviews"]
    create_mosaic(scene, TileGrid(1024, 0), ["water"], tmp_path / "s.zarr", keep_existing=True)
    assert zarr.open_group(mosaic.path, mode="r").attrs["overviews"]["factors"] == overview_factors(mosaic) == [2, 4]
    for factor in (2, 4):
        assert xr.open_zarr(mosaic.path, group=f"overviews/{factor}", consolidated=False).sizes["y"] == -(
            -3000 // factor
        )
    assert (xr.open_zarr(mosaic.path, consolidated=False)["label"][:1024, :1024] == 1).all()
