"""Benchmark: the plain floor of the water job, without geobatch: read, NDWI, Zarr writes.

Each of PROCESSES processes reads every PROCESSES-th row of 1024 px windows of the scene that
`water_mosaic.py` builds (the same cached file; bands 2 and 4, rasterio), computes NDWI with NumPy, and
writes `label` (uint8) and `score` (float32) chunks into a Zarr v3 store with the mosaic's codec (zstd)
and fill values. What
`geobatch run`'s tile phase adds to this is Ray, the ledger and composing labels from a model's output.

    .venv/bin/python bench/plain_floor.py --size 20000 --processes 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import rasterio
import zarr
from rasterio.windows import Window
from water_mosaic import HERE, build_scene  # the same scene, built once into bench/.cache

CHUNK = 1024


def write_rows(scene: Path, store: Path, size: int, rows: list[int]) -> None:
    group = zarr.open_group(store, mode="r+")
    label, score = (group[name].with_config({"write_empty_chunks": True}) for name in ("label", "score"))
    with rasterio.open(scene) as src:
        for top in rows:
            for left in range(0, size, CHUNK):
                window = Window(left, top, min(CHUNK, size - left), min(CHUNK, size - top))
                green, nir = src.read([2, 4], window=window).astype(np.float32)
                ndwi = (green - nir) / np.maximum(green + nir, 1e-6)
                where = window.toslices()
                label[where] = (ndwi > 0).astype(np.uint8)
                score[where] = ndwi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    scene = build_scene(args.size, HERE / ".cache" / f"naip_like_{args.size}.tif")
    store = HERE / ".cache" / f"plain_{args.size}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    group = zarr.open_group(store, mode="w")
    for name, dtype, fill in (("label", "uint8", 255), ("score", "float32", np.nan)):
        group.create_array(name, shape=(args.size, args.size), chunks=(CHUNK, CHUNK), dtype=dtype,
                           compressors=[zarr.codecs.ZstdCodec()], fill_value=fill)  # fmt: skip
    rows = list(range(0, args.size, CHUNK))
    started = time.perf_counter()
    with Pool(args.processes) as pool:
        pool.starmap(write_rows, [(scene, store, args.size, rows[i :: args.processes]) for i in range(args.processes)])
    seconds = time.perf_counter() - started
    shutil.rmtree(store)
    result = {"size": args.size, "processes": args.processes, "seconds": round(seconds, 1)}
    print(json.dumps(result | {"mpx_per_s": round(args.size**2 / 1e6 / seconds, 1)}, indent=2))


if __name__ == "__main__":
    main()
