"""Stitching: tile cores into one georeferenced Zarr v3 mosaic per scene.

The mosaic's chunks are the tile cores, so each chunk is written by exactly one tile and writers never
contend or read-modify-write. The layout (arrays, coordinates, CRS, fill values) is declared once with
xarray + Dask from lazy templates; the chunks themselves are written as tiles finish, wherever they run.
Chunks never written read back as their fill value, so a failed tile is nodata, never an empty mask.

Arrays, all on the scene grid (``y``, ``x``):
- ``label`` (uint8): 0 background, ``i`` the ``i``-th prompt's label, 255 nodata / not processed;
  where prompts overlap the earlier prompt in the job wins;
- ``score`` (float32): the model's confidence for the pixel's label, NaN where nodata;
- ``instance`` (uint64): the object id, its first pixel's ``row * width + col + 1`` (see ``vectorize``), 0 where no object.

Finished mosaics also hold coarser levels for viewers, ``overviews/2``, ``overviews/4``... (``add_overviews``).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr

from geobatch.models.base import TileResult
from geobatch.scenes import Scene
from geobatch.tiling import Tile, TileGrid

LABEL_BACKGROUND = 0
LABEL_NODATA = 255
MAX_LABELS = LABEL_NODATA - 1

_ARRAYS = {  # name -> (dtype, fill value)
    "label": (np.uint8, LABEL_NODATA),
    "score": (np.float32, np.nan),
    "instance": (np.uint64, 0),
}


@dataclass(frozen=True, slots=True)
class Mosaic:
    """Where a scene's mosaic lives and how to read its label codes."""

    scene_id: str
    path: str
    shape: tuple[int, int]
    chunk: int
    labels: tuple[str, ...]  # label code i + 1 -> labels[i]

    def code(self, label: str) -> int:
        return self.labels.index(label) + 1


def create_mosaic(
    scene: Scene, grid: TileGrid, labels: Sequence[str], path: Path, keep_existing: bool = False
) -> Mosaic:
    """Declare an empty mosaic for ``scene`` at ``path``; writes no pixel chunk.

    A mosaic already at ``path`` is replaced, or with ``keep_existing`` kept with the chunks written so far.
    """
    if len(labels) > MAX_LABELS:
        raise ValueError(f"a mosaic holds at most {MAX_LABELS} labels, got {len(labels)}")
    mosaic = Mosaic(scene.scene_id, str(path), scene.shape, grid.core, tuple(labels))
    if keep_existing and Path(path).exists():
        return mosaic
    shutil.rmtree(path, ignore_errors=True)
    height, width = scene.shape
    affine = scene.geobox.affine
    coords = {
        "y": affine.f + affine.e * (np.arange(height) + 0.5),
        "x": affine.c + affine.a * (np.arange(width) + 0.5),
    }
    variables = {
        name: (("y", "x"), da.full(scene.shape, fill, dtype=dtype, chunks=grid.core))
        for name, (dtype, fill) in _ARRAYS.items()
    }
    dataset = xr.Dataset(variables, coords=coords)
    dataset = dataset.rio.write_crs(scene.geobox.crs.wkt).rio.write_transform(affine)
    for name, (_, fill) in _ARRAYS.items():
        dataset[name].encoding.update({"fill_value": fill, "chunks": (grid.core, grid.core)})
    codes = [LABEL_BACKGROUND, *range(1, len(labels) + 1), LABEL_NODATA]
    dataset["label"].attrs.update(flag_values=codes, flag_meanings=" ".join(["background", *labels, "nodata"]))
    dataset.attrs.update(scene_id=scene.scene_id, source=scene.uri)
    dataset.to_zarr(path, mode="w", compute=False, zarr_format=3, consolidated=False)
    return mosaic


def compose(mosaic: Mosaic, result: TileResult, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label and score rasters over a tile's read window from the model's instances."""
    label = np.zeros(valid.shape, np.uint8)
    score = np.zeros(valid.shape, np.float32)
    for name in reversed(mosaic.labels):  # reversed, so that earlier prompts paint last and win
        for instance in result.instances.get(name, []):
            label[instance.mask] = mosaic.code(name)
            source = instance.score if instance.score_map is None else instance.score_map[instance.mask]
            score[instance.mask] = source
    label[~valid] = LABEL_NODATA
    score[~valid] = np.nan
    return label, score


def write_tile(mosaic: Mosaic, tile: Tile, result: TileResult, valid: np.ndarray) -> int:
    """Write the core of one tile's result into its own chunk; returns the number of labelled pixels."""
    label, score = compose(mosaic, result, valid)
    core = tile.core_in_read
    rows, cols = tile.core_window.toslices()
    group = zarr.open_group(mosaic.path, mode="r+")
    group["label"][rows, cols] = label[core]
    group["score"][rows, cols] = score[core]
    core_label = label[core]
    return int(np.count_nonzero((core_label != LABEL_BACKGROUND) & (core_label != LABEL_NODATA)))


def add_overviews(mosaic: Mosaic) -> list[int]:
    """Write coarser copies of a finished mosaic for viewers, and return their factors (2, 4, 8...).

    Level ``f`` is the group ``overviews/f``: a dataset like the mosaic (same arrays, CRS, chunking) on a
    grid ``f`` times coarser. ``label`` and ``instance`` take the first pixel of each block (a class or an
    id cannot be averaged), ``score`` the mean of the block's valid pixels. Each level is computed from
    the one before, and levels stop once the whole scene fits in one chunk. Runs on the current Dask
    scheduler.
    """
    factors = []
    level = xr.open_zarr(mosaic.path, decode_coords="all", consolidated=False)
    factor = 1
    while max(level.sizes["y"], level.sizes["x"]) > mosaic.chunk:
        factor *= 2
        level = _coarser(level)
        for name in _ARRAYS:
            level[name].encoding = {"fill_value": _ARRAYS[name][1], "chunks": (mosaic.chunk, mosaic.chunk)}
        level = level.chunk(mosaic.chunk)
        level.to_zarr(mosaic.path, group=f"overviews/{factor}", mode="w", zarr_format=3, consolidated=False)
        level = xr.open_zarr(mosaic.path, group=f"overviews/{factor}", decode_coords="all", consolidated=False)
        factors.append(factor)
    zarr.open_group(mosaic.path, mode="r+").attrs["overviews"] = {
        "groups": [f"overviews/{f}" for f in factors],
        "factors": factors,
        "resampling": {"label": "nearest", "instance": "nearest", "score": "mean"},
    }
    return factors


def _coarser(level: xr.Dataset) -> xr.Dataset:
    """The dataset on a grid twice as coarse (a partial block at the right or bottom edge counts whole)."""
    transform = level.rio.transform() @ level.rio.transform().scale(2)
    coarse = level[["label", "instance"]].isel(y=slice(0, None, 2), x=slice(0, None, 2))
    score = level["score"].coarsen(y=2, x=2, boundary="pad").mean()
    coarse["score"] = score.assign_coords(y=coarse.y, x=coarse.x)
    height, width = coarse.sizes["y"], coarse.sizes["x"]
    coarse = coarse.assign_coords(
        y=transform.f + transform.e * (np.arange(height) + 0.5), x=transform.c + transform.a * (np.arange(width) + 0.5)
    )
    for name in coarse.data_vars:
        coarse[name].attrs = level[name].attrs
    return coarse.rio.write_crs(level.rio.crs).rio.write_transform(transform)
