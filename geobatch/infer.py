"""Inference on Ray: a pool of actors, each holding one model instance, fed a stream of tiles.

Each actor loads its model once (``__init__``), then for every tile reads the window, runs the model and
writes the tile's core into the scene mosaic (``__call__``). Only a small :class:`TileOutcome` travels
back, so the driver's memory does not grow with the masks. A tile with no valid pixel is ``skipped``
without running the model; a tile that fails is recorded with its reason. Both leave their mosaic chunk
as nodata, and the other tiles carry on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import ray
from ray.util import ActorPool

from geobatch.access import Access
from geobatch.jobs import ModelSpec
from geobatch.models.base import Prompt, TileInput, load_model
from geobatch.scenes import Scene, SceneReader
from geobatch.stitch import Mosaic, write_tile
from geobatch.tiling import Tile

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TileWork:
    """Everything a worker needs for one tile, passed explicitly (no globals on workers)."""

    scene: Scene
    tile: Tile
    mosaic: Mosaic


@dataclass(frozen=True, slots=True)
class TileOutcome:
    """What became of one tile: ``done``, ``skipped`` or ``failed`` (the last two with the reason)."""

    scene_id: str
    tile_id: str
    status: str
    reason: str | None = None
    labelled_pixels: int = 0


class TileWorker:
    """Callable that owns one model and one scene reader; Ray runs it as an actor."""

    def __init__(self, model: ModelSpec, prompts: Sequence[Prompt], bands: Sequence[str], access: Access) -> None:
        self.model = load_model(model.name, model.options)
        self.prompts = tuple(prompts)
        self.bands = tuple(bands)
        self.reader = SceneReader(access)

    def __call__(self, work: TileWork) -> TileOutcome:
        tile = work.tile
        try:
            pixels = self.reader.read(work.scene, tile.read_window, self.bands)
            if not pixels.valid[tile.core_in_read].any():
                return TileOutcome(tile.scene_id, tile.tile_id, "skipped", "no valid pixels (all nodata)")
            result = self.model(TileInput(tile, pixels.bands, pixels.valid), self.prompts)
            labelled = write_tile(work.mosaic, tile, result, pixels.valid)
        except Exception as exc:
            log.warning("tile %s failed: %s", tile.tile_id, exc, exc_info=not isinstance(exc, OSError))
            return TileOutcome(tile.scene_id, tile.tile_id, "failed", f"{type(exc).__name__}: {exc}")
        return TileOutcome(tile.scene_id, tile.tile_id, "done", labelled_pixels=labelled)


def run_tiles(
    work: Sequence[TileWork],
    model: ModelSpec,
    prompts: Sequence[Prompt],
    bands: Sequence[str],
    access: Access,
    num_actors: int | None = None,
) -> Iterator[TileOutcome]:
    """Process ``work`` on a pool of Ray actors, yielding outcomes as tiles finish (in any order).

    Ray must already be initialised. ``num_actors`` defaults to one per CPU of the cluster.
    """
    if not work:
        return
    size = num_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    actor_class = ray.remote(num_cpus=1)(TileWorker)
    actors = [actor_class.remote(model, prompts, bands, access) for _ in range(min(size, len(work)))]
    pool = ActorPool(actors)
    try:
        yield from pool.map_unordered(lambda actor, item: actor.__call__.remote(item), work)
    finally:
        for actor in actors:
            ray.kill(actor)
