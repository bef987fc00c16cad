"""Benchmark: NDWI water -> stitched Zarr mask -> polygons on a large NAIP-like scene, end to end.

Builds (once, cached in bench/.cache/) a SIZE x SIZE 4-band uint8 tiled GeoTIFF (512 px deflate blocks,
internal overviews) by mirror-tiling four real NAIP scenes from ../shared/data/naip, then runs
`geobatch run` on it twice, each in a fresh process: once timed, once with the memory (PSS, so shared pages
count once) of that process and all of its children (Ray's workers included) sampled every 0.2 s. The
kernel walks every page table to measure PSS, which slowed the finishing phase by up to a quarter, so
the times come from the first run and the peak from the second. The floor is the timed run's tile
phase (read + NDWI + Zarr writes, from `run/summary.json`); the whole path adds vectorising, overviews
and the catalog: `whole_over_floor` is the floor's time over both phases', `phase_over_floor` its time over
the second phase's alone.

    .venv/bin/python bench/water_mosaic.py --size 20000 --core 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rasterio
import yaml
from rasterio.enums import Resampling
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
NAIP = sorted((HERE.parent.parent / "shared" / "data" / "naip").glob("*.tif"))[:4]
BLOCK = 2048


def build_scene(size: int, path: Path) -> Path:
    if path.exists():
        return path
    sources = []
    for source in NAIP:
        with rasterio.open(source) as src:
            sources.append(src.read())
            profile = src.profile
    height = min(s.shape[1] for s in sources)
    width = min(s.shape[2] for s in sources)
    sources = [s[:, :height, :width] for s in sources]
    profile.update(
        width=size,
        height=size,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        BIGTIFF="YES",
        photometric="minisblack",
    )
    partial = path.with_suffix(".partial.tif")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(partial, "w", **profile) as dst:
        for top in range(0, size, BLOCK):
            for left in range(0, size, BLOCK):
                window = Window(left, top, min(BLOCK, size - left), min(BLOCK, size - top))
                rows = _mirror(np.arange(top, top + window.height), height)
                cols = _mirror(np.arange(left, left + window.width), width)
                source = sources[((top // height) + (left // width)) % len(sources)]
                dst.write(source[:, rows][:, :, cols], window=window)
        dst.build_overviews([2, 4, 8, 16, 32], Resampling.nearest)
    partial.rename(path)
    return path


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Reflect indices into 0..n-1 so that copies meet without a seam."""
    period = index % (2 * n)
    return np.where(period < n, period, 2 * n - 1 - period)


def _tree_pss_kib(root: int) -> int:
    """The PSS of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def run(scene: Path, core: int, overlap: int, output: Path, sample_memory: bool) -> dict:
    job = {
        "name": "bench",
        "output": str(output),
        "scenes": [str(scene)],
        "bands": {"red": 1, "green": 2, "blue": 3, "nir": 4},
        "prompts": [{"text": "water bodies", "label": "water"}],
        "model": "spectral",
        "tiling": {"core": core, "overlap": overlap},
    }
    job_path = output.parent / f"{output.name}.yaml"
    job_path.write_text(yaml.safe_dump(job))
    shutil.rmtree(output, ignore_errors=True)  # a run left there would be resumed, not redone
    geobatch = Path(sys.executable).parent / "geobatch"
    started = time.perf_counter()
    process = subprocess.Popen([str(geobatch), "run", str(job_path)], stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_pss_kib(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample if sample_memory else None)
    sampler.start()
    stdout, _ = process.communicate()
    seconds = time.perf_counter() - started
    sampler.join()
    if process.returncode:
        raise SystemExit(f"geobatch run failed with {process.returncode}:\n{stdout}")
    objects = next(line for line in stdout.splitlines() if line.startswith("objects:"))
    phases = json.loads((output / "run" / "summary.json").read_text())["phase_seconds"]
    return {"seconds": round(seconds, 1), "peak_pss_gib": round(peak[0] / 2**20, 2), "summary": objects, **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--core", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=0)
    args = parser.parse_args()
    cache = HERE / ".cache"
    scene = build_scene(args.size, cache / f"naip_like_{args.size}.tif")
    output = cache / f"out_{args.size}_{args.core}_{args.overlap}"
    result = run(scene, args.core, args.overlap, output, sample_memory=False)
    sampled = run(scene, args.core, args.overlap, output, sample_memory=True)
    result.update(peak_pss_gib=sampled["peak_pss_gib"], seconds_while_sampling_memory=sampled["seconds"])
    megapixels = args.size**2 / 1e6
    floor, whole = result["inference"], result["inference"] + result["vectorize_and_catalog"]
    result.update(
        size=args.size,
        core=args.core,
        overlap=args.overlap,
        mpx_per_s=round(megapixels / result["seconds"], 1),
        floor_mpx_per_s=round(megapixels / floor, 1),  # read + NDWI + Zarr writes: the tile phase alone
        whole_mpx_per_s=round(megapixels / whole, 1),  # the tile phase, then stitching, vectorising, catalog
        whole_over_floor=round(floor / whole, 2),
        phase_over_floor=round(floor / result["vectorize_and_catalog"], 2),  # that phase alone at the floor's pace
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB",
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
