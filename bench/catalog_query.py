"""Benchmark: region queries on a generated catalog of 10 million objects.

Builds (once, cached in bench/.cache/catalog_OBJECTS/) a catalog laid out as geobatch writes it: 400 scenes
of 0.5° x 0.5° tiling a 10° x 10° "country", each with OBJECTS/400 small polygons, two labels, one of
twelve months per scene, written with `catalog.write_scene_objects` (label / month folders, one file per
run and scene, Hilbert-sorted row groups). Then times a bbox query covering 1 % of the area (cold and
warm, through `geobatch.catalog.open(...).query`), shows what it read, and compares with a full scan
(every file read into one GeoDataFrame, then filtered with shapely).

    .venv/bin/python bench/catalog_query.py [--objects 10000000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from geobatch import catalog

HERE = Path(__file__).resolve().parent
SCENES_PER_SIDE = 20  # 20 x 20 scenes of 0.5 degrees
WEST, SOUTH, SIDE = -100.0, 40.0, 10.0


def build(folder: Path, objects: int) -> Path:
    if (folder / "catalog").is_dir():
        return folder
    rng = np.random.default_rng(0)
    per_scene = objects // SCENES_PER_SIDE**2
    step = SIDE / SCENES_PER_SIDE
    for row in range(SCENES_PER_SIDE):
        for col in range(SCENES_PER_SIDE):
            scene_id = f"scene_r{row:02d}c{col:02d}"
            x = WEST + col * step + rng.uniform(0, step, per_scene)
            y = SOUTH + row * step + rng.uniform(0, step, per_scene)
            size = rng.uniform(2e-5, 4e-4, per_scene)
            month = 1 + (row * SCENES_PER_SIDE + col) % 12
            frame = gpd.GeoDataFrame(
                {
                    "object_id": [f"{scene_id}:{i}" for i in range(per_scene)],
                    "label": rng.choice(["water", "vegetation"], per_scene, p=[0.3, 0.7]),
                    "phrase": "generated",
                    "score": rng.uniform(0.5, 1.0, per_scene).astype(np.float32),
                    "area_m2": (size * 111_000) ** 2,
                    "pixels": rng.integers(1, 2000, per_scene),
                    "scene_id": scene_id,
                    "acquired_at": pd.Timestamp(f"2024-{month:02d}-15", tz="UTC"),
                    "run_id": "bench",
                    "model": "spectral",
                },
                geometry=shapely.box(x, y, x + size, y + size),
                crs=4326,
            )
            catalog.write_scene_objects(folder, frame, "bench", scene_id)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10_000_000)
    args = parser.parse_args()
    folder = build(HERE / ".cache" / f"catalog_{args.objects}", args.objects)
    files = catalog.open(folder).files()
    size = sum(p.stat().st_size for p in files)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"catalog: {args.objects:,} objects in {len(files)} files, {size / 2**20:.0f} MiB")
    center = (WEST + 3.3, SOUTH + 6.1)
    bbox = (center[0], center[1], center[0] + 1.0, center[1] + 1.0)  # 1 degree squared: 1 % of the area
    cat = catalog.open(folder)
    times = []
    for _ in range(11):  # the first is cold: file listing and footers are read then
        started = time.perf_counter()
        found = cat.query(bbox=bbox)
        times.append(time.perf_counter() - started)
    stats, warm = cat.last_query, sorted(times[1:])
    seconds = warm[len(warm) // 2]
    print(
        f"bbox query: {len(found):,} objects; cold {times[0]:.3f} s; warm median {seconds:.3f} s "
        f"(best {warm[0]:.3f}, worst {warm[-1]:.3f}); read {stats.files_read} of {stats.files} files, "
        f"{stats.row_groups_read} of {stats.row_groups} row groups"
    )
    started = time.perf_counter()
    everything = gpd.read_parquet(folder / "catalog" / "objects")
    scanned = everything[everything.intersects(shapely.box(*bbox))]
    full = time.perf_counter() - started
    print(f"full scan + filter: {len(scanned):,} objects in {full:.2f} s")
    print(f"speed-up of the warm query over the full scan: {full / seconds:.0f}x")
    assert set(scanned.object_id) == set(found.object_id)


if __name__ == "__main__":
    main()
