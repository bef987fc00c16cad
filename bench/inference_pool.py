"""Benchmark: the inference pool around a model of fixed, known cost per tile.

The `fixed-cost` backend answers like `spectral` and then keeps the CPU busy for exactly `--seconds` per
tile, so what is measured is the pipeline around the model: how busy the actors are (time in the model
over wall time), how throughput scales from 1 to 2 actors, and whether the driver's peak memory stays
flat when the job has 4x more scenes. Each run is a fresh driver process (`run_job` with its own local
Ray); the driver's peak RSS is its VmHWM.

    .venv/bin/python bench/inference_pool.py [--seconds 0.2] [--scenes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
NAIP = sorted((HERE.parent.parent / "shared" / "data" / "naip").glob("*.tif"))


def job_file(folder: Path, scenes: int, actors: int | None, options: dict) -> Path:
    """A water job over ``scenes`` NAIP scenes (the 10 real ones, linked under new names as needed)."""
    data = folder / "scenes"
    data.mkdir(exist_ok=True)
    for index in range(scenes):
        link = data / f"scene{index:03d}.tif"
        if not link.exists():
            link.symlink_to(NAIP[index % len(NAIP)])
    job = {
        "name": f"pool-{scenes}x{actors}",
        "output": str(folder / f"out-{scenes}-{actors}"),
        "scenes": [str(data / f"scene{i:03d}.tif") for i in range(scenes)],
        "bands": {"red": 1, "green": 2, "blue": 3, "nir": 4},
        "prompts": ["water bodies"],
        "model": {"name": "fixed-cost", "options": options},
        "tiling": {"core": 256, "overlap": 32},
        "ray": {"num_actors": actors},
    }
    path = folder / f"job-{scenes}-{actors}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def measure(job: Path) -> dict:
    """Run ``job`` in a fresh driver process; its inference report and its peak RSS."""
    child = (
        "import json, sys; from geobatch.jobs import load_job; from geobatch.pipeline import run_job\n"
        "summary = run_job(load_job(sys.argv[1]))\n"
        "report = json.load(open(summary.output / 'run' / 'summary.json'))\n"
        "peak = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
        "print(json.dumps({'inference': report['inference'], 'peak_rss_kib': int(peak), 'tiles': report['tiles']}))"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(
        [sys.executable, "-c", child, str(job)], capture_output=True, text=True, check=True, env=environment
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.2, help="model time per tile")
    parser.add_argument("--scenes", type=int, default=4, help="scenes in the small job (the large has 4x)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as folder:
        runs = {
            (scenes, actors): measure(job_file(Path(folder), scenes, actors, {"seconds": args.seconds}))
            for scenes, actors in ((args.scenes, 1), (args.scenes, 2), (4 * args.scenes, 2))
        }
    for (scenes, actors), run in runs.items():
        inference = run["inference"]
        busy = ", ".join(f"{w['busy_fraction']:.3f}" for w in inference["workers"])
        print(
            f"{scenes:3d} scenes, {actors} actor(s): {inference['tiles']} tiles in {inference['seconds']:.1f} s = "
            f"{inference['tiles_per_s']:.2f} tiles/s; busy fraction per actor {busy}; "
            f"mean batches in flight {inference['mean_batches_in_flight']:.2f}; "
            f"driver peak RSS {run['peak_rss_kib'] / 2**10:.0f} MiB"
        )
    small, pair, large = runs.values()
    print(f"throughput 2 actors / 1 actor: {pair['inference']['tiles_per_s'] / small['inference']['tiles_per_s']:.2f}x")
    print(f"driver peak RSS, 4x scenes / 1x: {large['peak_rss_kib'] / pair['peak_rss_kib']:.3f}")


if __name__ == "__main__":
    main()
