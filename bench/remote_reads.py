"""Benchmark: what reading a remote COG costs in HTTP requests and bytes, and what a job over HTTP costs.

Serves COGs from a real HTTP server on 127.0.0.1 (the tests' range server, in its own process) and counts
the requests GDAL makes through geobatch's scene stage: opening a scene (metadata) and reading one tile
(core + overlap). Then runs the same water job on the local file and on its URL and compares wall time,
bytes fetched and mosaics.

    .venv/bin/python bench/remote_reads.py [--size 4000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
import yaml
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from servers import serve_files
from water_mosaic import build_scene

from geobatch.access import Access
from geobatch.jobs import load_job
from geobatch.pipeline import run_job
from geobatch.scenes import BandSource, SceneReader, SceneRef, open_scene

NAIP_2010 = HERE.parent.parent / "shared" / "data" / "naip" / "m_4709963_se_14_1_20100629.tif"
BANDS = {"red": 1, "green": 2, "blue": 3, "nir": 4}


def fetched(requests) -> tuple[int, int]:
    """(number of requests, bytes asked for by ranged GETs)."""
    ranges = [r.split("=")[1].split("-") for method, _, r in requests if method == "GET" and r]
    return len(requests), sum(int(end) - int(start) + 1 for start, end in ranges)


def request_costs(path: Path, tile: int, overlap: int) -> dict[str, tuple[int, int]]:
    costs = {}
    with serve_files(path.parent) as server:
        url = server.url(path.name)
        sources = {name: BandSource(url, index) for name, index in BANDS.items()}
        ref = SceneRef(path.stem, url, None, sources, url)
        scene = open_scene(ref, ("green", "nir"))
        costs["open (metadata)"] = fetched(server.requests)
        server.reset()
        window = Window(tile - overlap, tile - overlap, tile + 2 * overlap, tile + 2 * overlap)
        SceneReader(Access()).read(scene, window, ("green", "nir"))  # a fresh reader: opens the file again
        costs[f"one tile ({tile} px core + {overlap} px overlap, green+nir)"] = fetched(server.requests)
    return costs


def job_over_http(path: Path, folder: Path) -> dict[str, float]:
    times, labels = {}, {}
    with serve_files(path.parent) as server:
        server.reset()
        for where, uri in (("local", str(path)), ("http", server.url(path.name))):
            job = {
                "name": f"bench-{where}",
                "output": str(folder / where),
                "scenes": [uri],
                "bands": BANDS,
                "prompts": ["water bodies"],
                "model": "spectral",
                "tiling": {"core": 1024, "overlap": 0},
            }
            (folder / f"{where}.yaml").write_text(yaml.safe_dump(job))
            started = time.perf_counter()
            summary = run_job(load_job(folder / f"{where}.yaml"))
            times[where] = time.perf_counter() - started
            assert not summary.failed, summary.scenes
            zarr = folder / where / "mosaics" / f"{path.stem}.zarr"
            labels[where] = xr.open_zarr(zarr, consolidated=False)["label"].values
        times["requests"], times["bytes"] = fetched(server.requests)
    times["same mosaic"] = float(np.array_equal(labels["local"], labels["http"]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4000, help="side of the NAIP-like COG for the job (px)")
    args = parser.parse_args()
    big = build_scene(args.size, HERE / ".cache" / f"naip_like_{args.size}.tif")
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; python {platform.python_version()}")
    for path, tile in ((NAIP_2010, 256), (big, 1024)):
        print(f"\n{path.name} ({path.stat().st_size / 2**20:.1f} MiB)")
        for what, (count, size) in request_costs(path, tile, 32).items():
            print(f"  {what}: {count} requests, {size / 2**10:.0f} KiB")
    with tempfile.TemporaryDirectory() as folder:
        result = job_over_http(big, Path(folder))
    print(
        f"\njob on {big.name}: local {result['local']:.1f} s, over HTTP {result['http']:.1f} s "
        f"({result['requests']:.0f} requests, {result['bytes'] / 2**20:.1f} MiB fetched of "
        f"{big.stat().st_size / 2**20:.1f} MiB), same mosaic: {bool(result['same mosaic'])}"
    )


if __name__ == "__main__":
    main()
