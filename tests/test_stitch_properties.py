"""Property: for any scene size, tile size and overlap, stitching is invisible and every object appears once."""

import numpy as np
import rasterio
import xarray as xr
import zarr
from conftest import NAIP_2010, open_mosaic, write_job
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window
from scipy import ndimage

from geobatch import catalog
from geobatch.jobs import load_job
from geobatch.models.spectral import normalised_difference
from geobatch.pipeline import run_job
from geobatch.stitch import LABEL_NODATA


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    height=st.integers(40, 300),
    width=st.integers(40, 300),
    top=st.integers(0, 400),
    left=st.integers(0, 600),
    core=st.integers(16, 160),
    overlap=st.integers(0, 24),
)
def test_any_tiling_gives_the_whole_scene_answer(
    ray_session, tmp_path_factory, height, width, top, left, core, overlap
):
    folder = tmp_path_factory.mktemp("property")
    scene = folder / "crop.tif"
    window = Window(left, top, width, height)
    with rasterio.open(NAIP_2010) as src:
        data = src.read(window=window, masked=True)
        profile = src.profile | {"height": height, "width": width, "transform": src.window_transform(window)}
    with rasterio.open(scene, "w", **(profile | {"tiled": False, "photometric": "MINISBLACK"})) as dst:
        dst.write(data.filled(0))
    valid = ~np.ma.getmaskarray(data[[1, 3]]).any(axis=0)
    water = (normalised_difference(data[1].data, data[3].data) > 0) & valid
    spec = load_job(write_job(folder / "job.yaml", scenes=[str(scene)], tiling={"core": core, "overlap": overlap}))
    summary = run_job(spec)
    assert not summary.failed
    mosaic_path = spec.output / "mosaics" / "crop.zarr"
    mosaic = open_mosaic(mosaic_path)
    label = mosaic["label"].values
    assert np.array_equal(label, np.where(valid, water.astype(np.uint8), LABEL_NODATA))
    for factor in zarr.open_group(mosaic_path, mode="r").attrs["overviews"]["factors"]:  # chunk by chunk, any core
        level = xr.open_zarr(mosaic_path, group=f"overviews/{factor}", consolidated=False)
        assert np.array_equal(level["label"].values, label[::factor, ::factor])
        assert np.array_equal(level["instance"].values, mosaic["instance"].values[::factor, ::factor])
    components, count = ndimage.label(water)  # 4-connected, like the pipeline
    objects = catalog.open(spec.output).query()
    assert len(objects) == count and objects.object_id.is_unique
    assert sorted(objects["pixels"]) == sorted(np.bincount(components.ravel())[1:])
