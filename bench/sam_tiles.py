"""Segment Anything backend: tiles/s of the vit_b architecture (random weights) in both modes.

Writes a random vit_b network as an official-format checkpoint (375 MB, in a temporary folder), reads
real NAIP tiles (read windows of a 512 + 2 x 32 grid), and times the backend's ``predict_batch`` on them
after one warm-up batch: ``everything`` (a ``--points-per-side`` grid of point prompts per tile) and
``prompts`` (``--prompts`` boxes per tile from a GeoPackage in EPSG:4326). Random weights decode as fast
as real ones; only the number of masks surviving the filters differs, so the filters are switched off
(every candidate is kept, then NMS): an upper bound on the post-processing work. ``--device cuda`` runs
the same on one NVIDIA GPU (needs PyTorch with CUDA); without one it says so and exits 1.

    .venv/bin/python bench/sam_tiles.py [--device cpu] [--tiles 4] [--batch 1] [--points-per-side 16] [--prompts 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely

REPO = Path(__file__).resolve().parents[1]
NAIP = REPO.parent / "shared" / "data" / "naip" / "m_4709963_se_14_1_20100629.tif"
RGB = ("red", "green", "blue")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiles", type=int, default=4, help="tiles timed per mode")
    parser.add_argument("--batch", type=int, default=1, help="tiles per model call (encoded together)")
    parser.add_argument("--points-per-side", type=int, default=16, help="'everything' grid (official: 32)")
    parser.add_argument("--prompts", type=int, default=16, help="box prompts per tile in 'prompts' mode")
    parser.add_argument("--scene", type=Path, default=NAIP)
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU here: the GPU benchmark is unmeasured on this machine")
        sys.exit(1)
    from geobatch.models.base import Prompt, load_model
    from geobatch.models.sam_checkpoint import VIT_B, write_random_checkpoint

    prompt = [Prompt("objects", "class", "object")]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = write_random_checkpoint(Path(folder) / "sam_vit_b_random.pth", VIT_B)
        tiles = read_tiles(args.scene, args.tiles + args.batch)
        prompts = write_prompts(tiles, args.prompts, Path(folder) / "prompts.gpkg")
        common = {"checkpoint": str(checkpoint), "device": args.device, "batch_size": args.batch}
        everything = {"points_per_side": args.points_per_side, "pred_iou_thresh": 0, "stability_score_thresh": 0}
        modes = {
            "everything": common | everything,
            "prompts": common | {"mode": "prompts", "prompts_file": str(prompts)},
        }
        device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU x {torch.get_num_threads()}"
        print(f"vit_b (random weights), {device}, batch {args.batch}, tiles of {tiles[0].valid.shape}")
        for mode, options in modes.items():
            model = load_model("sam", options)
            model.predict_batch(tiles[: args.batch], prompt)  # warm-up: allocations, kernels
            timed = tiles[args.batch :]
            started = time.perf_counter()
            found = 0
            for start in range(0, len(timed), args.batch):
                results = model.predict_batch(timed[start : start + args.batch], prompt)
                found += sum(len(r.instances["object"]) for r in results)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            detail = f"{args.points_per_side}² points" if mode == "everything" else f"{args.prompts} boxes"
            print(
                f"{mode:10s} ({detail}/tile): {len(timed)} tiles in {seconds:.1f} s = {len(timed) / seconds:.3f} "
                f"tiles/s, {found / len(timed):.1f} masks/tile"
            )


def read_tiles(scene: Path, count: int):
    """``count`` tiles of ``scene`` as the workers read them: 576 x 576 read windows (core 512, overlap 32)."""
    from geobatch.jobs import JobSpec
    from geobatch.models.base import TileInput
    from geobatch.scenes import SceneReader, discover, open_scene
    from geobatch.tiling import Tile

    spec = JobSpec(
        name="bench", output=Path("unused"), scenes=[str(scene)], prompts=["objects"], model="sam",
        bands={"red": 1, "green": 2, "blue": 3},
    )  # fmt: skip
    (ref,), _ = discover(spec)
    opened = open_scene(ref, RGB, values="display")
    reader, rng, tiles = SceneReader(), np.random.default_rng(0), []
    height, width = opened.shape
    from rasterio.windows import Window

    for k in range(count):  # windows at random offsets: every tile a full read window of real pixels
        row, col = int(rng.integers(0, height - 576)), int(rng.integers(0, width - 576))
        window = Window(col, row, 576, 576)
        tile = Tile(opened.scene_id, f"bench/{k}", 0, k, window, Window(col + 32, row + 32, 512, 512))
        pixels = reader.read(opened, window, RGB)
        tiles.append(TileInput(tile, pixels.bands, pixels.valid, opened.geobox[window.toslices()]))
    return tiles


def write_prompts(tiles, per_tile: int, path: Path) -> Path:
    """``per_tile`` random boxes (8 to 64 px) inside each tile's window, as a GeoPackage in EPSG:4326."""
    rng = np.random.default_rng(1)
    boxes = []
    for tile in tiles:
        affine = tile.grid.affine
        for _ in range(per_tile):
            size = rng.uniform(8, 64, 2)
            x0, y0 = rng.uniform(0, 576 - size)
            corners = [affine * (x, y) for x, y in [(x0, y0), (x0 + size[0], y0 + size[1])]]
            boxes.append(shapely.box(*np.min(corners, axis=0), *np.max(corners, axis=0)))
    frame = gpd.GeoDataFrame({"id": [f"p{i}" for i in range(len(boxes))]}, geometry=boxes, crs=tiles[0].grid.crs.wkt)
    frame.to_crs(4326).to_file(path, driver="GPKG")
    return path


if __name__ == "__main__":
    main()
