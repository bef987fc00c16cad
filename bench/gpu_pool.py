"""GPU benchmark: busy fraction and tiles/s of model actors pinned one per GPU.

Runs as is on a machine with NVIDIA GPUs and the `geopixel` extra (PyTorch with CUDA): the `fixed-cost`
backend spends `--seconds` per tile in matrix products on the actor's GPU, Ray places one actor per GPU
(`num_gpus=1`), and the tiles stream through the same pool as any model. Prints the figures to record
in docs/benchmarks.md; without a GPU it says so and exits 1.

    .venv/bin/python bench/gpu_pool.py [--seconds 0.05] [--scenes 8] [--batch 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from inference_pool import job_file, measure  # the CPU benchmark's job and driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.05, help="GPU time per tile")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="tiles per model call")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed (the 'geopixel' extra): the GPU benchmark is unmeasured here")
        sys.exit(1)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the GPU benchmark is unmeasured on this machine")
        sys.exit(1)
    with tempfile.TemporaryDirectory() as folder:
        options = {"seconds": args.seconds, "device": "cuda", "batch_size": args.batch}
        run = measure(job_file(Path(folder), args.scenes, None, options))
    inference = run["inference"]
    print(f"GPUs: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    print(f"{inference['tiles']} tiles in {inference['seconds']:.1f} s = {inference['tiles_per_s']:.2f} tiles/s")
    for worker in inference["workers"]:
        print(f"  actor {worker['worker']} on {worker['device']}: busy fraction {worker['busy_fraction']:.3f}")


if __name__ == "__main__":
    main()
