"""Stitching: tile cores into one georeferenced Zarr v3 mosaic per scene.

The mosaic's chunks are the tile cores, so each chunk is written by exactly one tile and writers never
contend or read-modify-write. The layout (arrays, coordinates, CRS, fill values) is declared once with
xarray + Dask from lazy templates; the chunks themselves are written as tiles finish, wherever they run.
Chunks never written read back as their fill value, so a failed tile is nodata, never an empty mask.

Arrays, all on the scene grid (``y``, ``x``):
- ``label`` (uint8): 0 background, ``i`` the ``i``-th prompt's label, 255 nodata / not processed;
  where prompts overlap the earlier prompt in the job wins (for instance models: the higher score);
- ``score`` (float32): the model's confidence for the pixel's label, NaN where nodata;
- ``instance`` (uint32, or uint64 for mosaics of 2³² pixels or more: ``Mosaic.instance_dtype``): the object
  id, 0 where no object: the object's first pixel ``row * width + col + 1`` (see ``vectorize``), or for
  instance models 1..n in first-pixel order (see ``instances``).

Finished mosaics also hold coarser levels for viewers, ``overviews/2``, ``overviews/4``... (``add_overviews``).

For instance models (``Mosaic.objects == "instances"``) a tile cannot paint its core: its instances
overlap and are cut by its read window, and must first be merged with the neighbours' (``instances``).
Such a tile writes its chunk as background / nodata only and stages its instances, whole over its read
window, in ``<scene_id>.tile_instances/r{row}c{col}.parquet`` beside the mosaic (:func:`stage_instances`;
beside, because Zarr readers warn about foreign files inside a store). They are kept with the mosaic, so a
resumed run that retries failed tiles can merge them again.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import dask
import numba
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from affine import Affine

from geobatch.models.base import ObjectKind, TileResult
from geobatch.tiling import Tile, TileGrid

if TYPE_CHECKING:  # not imported by the workers that write and read chunks
    import xarray as xr
    from dask.delayed import Delayed

    from geobatch.scenes import Scene

LABEL_BACKGROUND = 0
LABEL_NODATA = 255
MAX_LABELS = LABEL_NODATA - 1

_FILL_VALUES = {"label": LABEL_NODATA, "score": np.nan, "instance": 0}


@dataclass(frozen=True, slots=True)
class Mosaic:
    """Where a scene's mosaic lives and how to read its label codes."""

    scene_id: str
    path: str
    shape: tuple[int, int]
    chunk: int
    labels: tuple[str, ...]  # label code i + 1 -> labels[i]
    objects: ObjectKind = "components"  # how tiles write: painted cores, or staged instances

    def code(self, label: str) -> int:
        return self.labels.index(label) + 1

    @property
    def instance_dtype(self) -> np.dtype:
        """uint32 where every id (at most a pixel index + 1) fits, else uint64: for a mosaic of up to
        65 536 x 65 536 pixels, half the bytes to build, encode and read again for the overviews."""
        return np.dtype(np.uint32 if self.shape[0] * self.shape[1] < 2**32 else np.uint64)

    @property
    def staged_folder(self) -> Path:
        """Where the tiles of an instance model stage their instances."""
        return Path(self.path).parent / f"{self.scene_id}.tile_instances"

    def staged_instances(self, row: int, col: int) -> Path:
        """The file where tile ``(row, col)`` stages its instances."""
        return self.staged_folder / f"r{row}c{col}.parquet"


def create_mosaic(
    scene: Scene,
    grid: TileGrid,
    labels: Sequence[str],
    path: Path,
    keep_existing: bool = False,
    objects: ObjectKind = "components",
) -> Mosaic:
    """Declare an empty mosaic for ``scene`` at ``path``, with its overview levels; writes no pixel chunk.

    A mosaic already at ``path`` is replaced, or with ``keep_existing`` kept with the chunks written so far
    (and the instances staged so far).
    """
    if len(labels) > MAX_LABELS:
        raise ValueError(f"a mosaic holds at most {MAX_LABELS} labels, got {len(labels)}")
    mosaic = Mosaic(scene.scene_id, str(path), scene.shape, grid.core, tuple(labels), objects)
    if keep_existing and Path(path).exists():
        if "overviews" not in zarr.open_group(str(path), mode="r").attrs:  # started by a version that declared
            declare_overviews(mosaic)  # them only when finishing
        return mosaic
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(mosaic.staged_folder, ignore_errors=True)
    dataset = _declare(scene.shape, grid.core, scene.geobox.affine, scene.geobox.crs.wkt, mosaic.instance_dtype)
    codes = [LABEL_BACKGROUND, *range(1, len(labels) + 1), LABEL_NODATA]
    dataset["label"].attrs.update(flag_values=codes, flag_meanings=" ".join(["background", *labels, "nodata"]))
    dataset.attrs.update(scene_id=scene.scene_id, source=scene.uri)
    dataset.to_zarr(path, mode="w", compute=False, zarr_format=3, consolidated=False)
    declare_overviews(mosaic)  # now: finishing the scene only fills them
    return mosaic


def _declare(shape: tuple[int, int], chunk: int, affine: Affine, crs_wkt: str, instance: np.dtype) -> xr.Dataset:
    """A lazy dataset of the mosaic's arrays, all fill values, on a grid (coordinates, CRS, chunking);
    ``instance`` is the dtype of the ``instance`` array."""
    da, xr = _declaring_libraries()
    height, width = shape
    coords = {
        "y": affine.f + affine.e * (np.arange(height) + 0.5),
        "x": affine.c + affine.a * (np.arange(width) + 0.5),
    }
    dtypes = {"label": np.uint8, "score": np.float32, "instance": instance}
    variables = {
        name: (("y", "x"), da.full(shape, fill, dtype=dtypes[name], chunks=chunk))
        for name, fill in _FILL_VALUES.items()
    }
    dataset = xr.Dataset(variables, coords=coords).rio.write_crs(crs_wkt).rio.write_transform(affine)
    for name, fill in _FILL_VALUES.items():
        dataset[name].encoding.update({"fill_value": fill, "chunks": (chunk, chunk)})
    return dataset


def _declaring_libraries():
    """dask.array and xarray (with rioxarray's ``.rio``), imported only where mosaics are declared, on the
    driver: they were half a second of CPU that every Ray worker spent starting up."""
    import dask.array
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray

    return dask.array, xarray


def mosaic_array(path: str, name: str) -> zarr.Array:
    """Array ``name`` (``label``, ``overviews/2/score``...) of the mosaic at ``path``, for reads and for writes
    of whole chunks, each stored as given.

    Opened once per process and kept while its metadata file is unchanged: opening the group and the array
    read two JSON files, about 2 ms a task for each block's few arrays. Zarr by default checks that a chunk
    is not all fill value before storing it, comparing every pixel with ``np.array_equal`` against a full
    copy of the fill value: a third of the cost of writing a chunk. The pipeline writes only chunks that
    tiles cover (and their coarser levels), which rarely hold nothing.
    """
    metadata = os.stat(Path(path, name, "zarr.json"))
    return _opened_array(path, name, (metadata.st_ino, metadata.st_mtime_ns, metadata.st_size))


@functools.lru_cache(maxsize=64)
def _opened_array(path: str, name: str, version: tuple[int, int, int]) -> zarr.Array:
    return zarr.open_array(str(Path(path, name)), mode="r+").with_config({"write_empty_chunks": True})


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
    """Write the core of one tile's result into its own chunk; returns the number of labelled pixels.

    For instance models the instances are staged and the chunk gets background / nodata only.
    """
    label, score = compose(mosaic, result, valid)
    core = tile.core_in_read
    core_label, core_score = label[core], score[core]
    labelled = int(np.count_nonzero((core_label != LABEL_BACKGROUND) & (core_label != LABEL_NODATA)))
    if mosaic.objects == "instances":  # painted once merged with the neighbours' instances
        stage_instances(mosaic, tile, result)
        core_label = np.where(core_label == LABEL_NODATA, LABEL_NODATA, LABEL_BACKGROUND).astype(np.uint8)
        core_score = np.where(np.isnan(core_score), np.float32(np.nan), np.float32(0))
    rows, cols = tile.core_window.toslices()
    mosaic_array(mosaic.path, "label")[rows, cols] = core_label
    mosaic_array(mosaic.path, "score")[rows, cols] = core_score
    return labelled


STAGED_SCHEMA = pa.schema(
    [
        ("label", pa.string()),
        ("score", pa.float64()),
        ("phrase", pa.string()),
        ("row", pa.int64()),  # the mask's box, in scene pixels: top, left, height, width
        ("col", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask", pa.binary()),  # the box's pixels, row-major, np.packbits
        ("prompt_id", pa.string()),  # Instance.prompt_id (null: matched with its neighbours' views by overlap)
        ("attributes", pa.string()),  # Instance.attributes as JSON (null: none)
    ]
)


def stage_instances(mosaic: Mosaic, tile: Tile, result: TileResult) -> None:
    """Write a tile's instances, each cropped to its box over the read window, to the tile's staged file.

    The file replaces any earlier one atomically, so a re-run tile stages its instances once. A tile
    with no instance writes an empty file: it is done, unlike a failed tile, which writes none.
    """
    rows = []
    for label in mosaic.labels:
        for instance in result.instances.get(label, []):
            (r0, r1), (c0, c1) = (np.flatnonzero(instance.mask.any(axis=a))[[0, -1]] for a in (1, 0))
            box = instance.mask[r0 : r1 + 1, c0 : c1 + 1]
            top, left = tile.read_window.row_off + int(r0), tile.read_window.col_off + int(c0)
            packed = np.packbits(box).tobytes()
            attributes = None if instance.attributes is None else json.dumps(instance.attributes, sort_keys=True)
            rows.append(
                (label, instance.score, instance.phrase, top, left, *box.shape, packed, instance.prompt_id, attributes)
            )
    table = pa.Table.from_pylist([dict(zip(STAGED_SCHEMA.names, row)) for row in rows], schema=STAGED_SCHEMA)
    target = mosaic.staged_instances(tile.row, tile.col)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    pq.write_table(table, partial)
    os.replace(partial, target)


def staged_mask(height: int, width: int, packed: bytes) -> np.ndarray:
    """A staged instance's mask over its box, unpacked."""
    return np.unpackbits(np.frombuffer(packed, np.uint8), count=height * width).reshape(height, width).astype(bool)


OVERVIEW_RESAMPLING = {"label": "nearest", "instance": "nearest", "score": "mean"}


def overview_factors(mosaic: Mosaic) -> list[int]:
    """The factors of a mosaic's coarser levels, 2, 4, 8..., down to the level that fits one chunk."""
    factors, size = [], max(mosaic.shape)
    while size > mosaic.chunk:
        size = -(-size // 2)
        factors.append(2 * factors[-1] if factors else 2)
    return factors


def declare_overviews(mosaic: Mosaic) -> None:
    """Declare a mosaic's empty coarser levels for viewers, of factors :func:`overview_factors` (2, 4, 8...);
    :func:`create_mosaic` does.

    Level ``f`` is the group ``overviews/f``: a dataset like the mosaic (same arrays, CRS, chunking) on a
    grid ``f`` times coarser. ``label`` and ``instance`` take the first pixel of each block (a class or an
    id cannot be averaged), ``score`` the mean of the block's valid pixels (:func:`coarsen`). Chunk
    ``(i, j)`` of a level is made from the 2 x 2 chunks ``(2i..2i+1, 2j..2j+1)`` of the level before, so
    every level is written chunk by chunk (:func:`write_overview_chunk`, :func:`compute_overviews`).
    """
    _, xr = _declaring_libraries()
    base = xr.open_zarr(mosaic.path, decode_coords="all", consolidated=False)
    factors = overview_factors(mosaic)
    for factor in factors:
        dataset = _declare(
            _level_shape(mosaic, factor),
            mosaic.chunk,
            base.rio.transform() @ Affine.scale(factor),
            base.rio.crs.to_wkt(),
            base["instance"].dtype,  # ids of the full-resolution pixels
        )
        for name in _FILL_VALUES:
            dataset[name].attrs.update(base[name].attrs)
        dataset.to_zarr(
            mosaic.path, group=f"overviews/{factor}", mode="w", compute=False, zarr_format=3, consolidated=False
        )
    zarr.open_group(mosaic.path, mode="r+").attrs["overviews"] = {
        "groups": [f"overviews/{f}" for f in factors],
        "factors": factors,
        "resampling": OVERVIEW_RESAMPLING,
    }


def _level_shape(mosaic: Mosaic, factor: int) -> tuple[int, int]:
    """The shape of overview level ``factor`` (a partial block at the right or bottom counts whole)."""
    height, width = mosaic.shape
    return -(-height // factor), -(-width // factor)


def coarsen(name: str, values: np.ndarray) -> np.ndarray:
    """A block of array ``name`` on a grid twice as coarse, by its ``OVERVIEW_RESAMPLING`` (a partial 2 x 2
    block at the right or bottom counts whole)."""
    if OVERVIEW_RESAMPLING[name] == "nearest":
        return values[::2, ::2]
    return _block_means(np.ascontiguousarray(values, np.float32))


@numba.njit(cache=True, nogil=True)
def _block_means(values):
    """The mean of each 2 x 2 block's valid (not NaN) values, NaN for none: one pass, where NumPy's padding,
    masks and strided sums took five (6 % of step 1 of vectorising, now a third of that). A partial block at the
    right or bottom repeats its last column or row, which leaves its mean as it is."""
    height, width = values.shape
    means = np.empty(((height + 1) // 2, (width + 1) // 2), np.float32)
    for i in range(means.shape[0]):
        top, bottom = 2 * i, min(2 * i + 1, height - 1)
        for j in range(means.shape[1]):
            left, right = 2 * j, min(2 * j + 1, width - 1)
            total, count = 0.0, 0
            for value in (values[top, left], values[top, right], values[bottom, left], values[bottom, right]):
                if not np.isnan(value):
                    total += value
                    count += 1
            means[i, j] = total / count if count else np.nan
    return means


def write_overview_chunk(mosaic: Mosaic, factor: int, key: tuple[int, int], arrays: dict[str, np.ndarray]) -> None:
    """Write chunk ``key`` of level ``factor`` of the ``arrays`` given (by name) from the 2 x 2 chunks of the
    level before that it covers."""
    rows, cols = (slice(k * mosaic.chunk, (k + 1) * mosaic.chunk) for k in key)
    for name, values in arrays.items():
        mosaic_array(mosaic.path, f"overviews/{factor}/{name}")[rows, cols] = coarsen(name, values)


def compute_overviews(mosaic: Mosaic, factors: Sequence[int]) -> None:
    """Compute declared levels ``factors`` (in order), each from the one before, on the current Dask scheduler:
    one task per chunk, reading 2 x 2 chunks of the finer level and writing one chunk, and waiting only for
    the tasks that write those (one graph for all levels, not a level at a time)."""
    tasks: dict[tuple[int, int, int], Delayed] = {}
    for factor in factors:
        height, width = _level_shape(mosaic, factor)
        for i in range(-(-height // mosaic.chunk)):
            for j in range(-(-width // mosaic.chunk)):
                finer = ((factor // 2, 2 * i + di, 2 * j + dj) for di in (0, 1) for dj in (0, 1))
                after = [tasks[k] for k in finer if k in tasks]
                tasks[factor, i, j] = dask.delayed(_overview_chunk)(mosaic, factor, (i, j), *after)
    dask.compute(*tasks.values())


def _overview_chunk(mosaic: Mosaic, factor: int, key: tuple[int, int], *after: None) -> None:
    finer = "" if factor == 2 else f"overviews/{factor // 2}/"
    rows, cols = (slice(2 * k * mosaic.chunk, 2 * (k + 1) * mosaic.chunk) for k in key)
    arrays = {name: mosaic_array(mosaic.path, finer + name)[rows, cols] for name in OVERVIEW_RESAMPLING}
    write_overview_chunk(mosaic, factor, key, arrays)
