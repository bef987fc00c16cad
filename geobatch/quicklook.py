"""Quicklook maps: a scene's imagery with its mask mosaic and its catalog polygons drawn over it, as PNG.

Cheap by construction: the grid is the mosaic's coarsest overview level at least ``size`` pixels wide
(or the mosaic itself when it is small), the imagery is read on that grid from the scene file's
overviews (GDAL picks the level), and polygons are burnt as outlines onto the same grid. Memory: a few
arrays of about ``size`` x ``size``. PNGs are written with zlib (no imaging library needed).
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import rioxarray  # noqa: F401 (the .rio accessor)
import shapely
import xarray as xr
import zarr
from affine import Affine
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioError
from rasterio.features import rasterize
from rasterio.windows import from_bounds

from geobatch.access import Access, gdal_path

log = logging.getLogger(__name__)

# label colours (RGB): the i-th prompt gets the i-th colour; outlines are drawn in yellow
PALETTE = np.array(
    [[31, 119, 180], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75], [227, 119, 194], [23, 190, 207]],
    dtype=np.uint8,
)
OUTLINE = np.array([255, 221, 0], dtype=np.uint8)
NODATA = np.array([60, 60, 60], dtype=np.uint8)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an ``(height, width, 3)`` uint8 array as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)  # filter 0

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
    path = Path(path)
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


def mosaic_level(mosaic: str | Path, size: int) -> xr.Dataset:
    """The coarsest level of ``mosaic`` whose longer side is still at least ``size`` (else the finest)."""
    groups = [None, *zarr.open_group(str(mosaic), mode="r").attrs.get("overviews", {}).get("groups", [])]
    chosen = None
    for group in groups:
        level = xr.open_zarr(mosaic, group=group, decode_coords="all", consolidated=False)
        if chosen is None or max(level.sizes["y"], level.sizes["x"]) >= size:
            chosen = level
    return chosen


def quicklook(
    path: str | Path,
    image_uri: str,
    mosaic: str | Path | None,
    outlines: gpd.GeoSeries | None,
    labels: list[str],
    size: int = 768,
    access: Access | None = None,
) -> Path:
    """Write a PNG of the scene at ``image_uri`` with the mosaic's labels (tinted) and the objects'
    ``outlines`` (lines) over it. Without a mosaic the grid is the file's, shrunk to about ``size`` pixels. Imagery
    that cannot be read (corrupt blocks) is drawn grey."""
    with (access or Access()).env(), rasterio.open(gdal_path(image_uri)) as src:
        if mosaic is not None:
            level = mosaic_level(mosaic, size)
            crs, transform = level.rio.crs, level.rio.transform()
            shape = (level.sizes["y"], level.sizes["x"])
            label = level["label"].values  # the chosen level is about size x size
        else:
            scale = max(src.width, src.height) / size
            shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
            crs, transform = src.crs, src.transform @ Affine.scale(src.width / shape[1], src.height / shape[0])
            label = None
        try:
            image = _imagery(src, transform, shape)
        except RasterioError as exc:  # corrupt blocks: the labels and outlines still tell what happened
            log.warning("quicklook of %s without imagery: %s", image_uri, exc)
            image = np.full((*shape, 3), 128, np.uint8)
    picture = image.copy()
    if label is not None:
        for index, name in enumerate(labels, start=1):
            where = label == index
            picture[where] = (0.45 * picture[where] + 0.55 * PALETTE[(index - 1) % len(PALETTE)]).astype(np.uint8)
        picture[label == 255] = (0.5 * picture[label == 255] + 0.5 * NODATA).astype(np.uint8)
    if outlines is not None and len(outlines):
        shapes = outlines.to_crs(crs.to_wkt() if crs else None).to_numpy()
        shapes = [s for s in shapes if s is not None and not shapely.is_empty(s)]
        if shapes:
            edges = rasterize(((s, 1) for s in shapes), out_shape=shape, transform=transform, all_touched=True)
            picture[edges.astype(bool)] = OUTLINE
    return write_png(path, picture)


def _imagery(src: rasterio.DatasetReader, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """The file's red/green/blue (by colour interpretation, else bands 1-3, or band 1 as grey) on the grid
    ``transform`` x ``shape``, stretched between the 2nd and 98th percentiles, as uint8 RGB."""
    interp = list(src.colorinterp)
    wanted = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(c in interp for c in wanted):
        indexes = [interp.index(c) + 1 for c in wanted]
    else:
        indexes = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
    left, top = transform @ (0, 0)
    right, bottom = transform @ (shape[1], shape[0])
    window = from_bounds(min(left, right), min(top, bottom), max(left, right), max(top, bottom), src.transform)
    bands = src.read(indexes, window=window, out_shape=(3, *shape), resampling=Resampling.average, masked=True,
                     boundless=True, fill_value=0)  # fmt: skip
    data = bands.astype("float32").filled(np.nan)
    finite = data[np.isfinite(data)]
    low, high = np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0)
    scaled = np.clip((data - low) / max(high - low, 1e-9) * 255, 0, 255)
    return np.nan_to_num(scaled, nan=0).astype(np.uint8).transpose(1, 2, 0)
