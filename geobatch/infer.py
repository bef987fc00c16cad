"""Inference on Ray: one pinned model per actor (per GPU where there are GPUs), fed a bounded stream of tiles.

Each :class:`TileWorker` actor loads its model once, then takes batches of tiles: it reads their windows,
runs the model on the batch, and writes each tile's core into the scene mosaic; only small
:class:`TileOutcome` values travel back. An actor runs two batches at once on two threads sharing one
model lock, so one batch's reading and writing overlap the other's inference and the model stays busy.

The driver keeps at most ``in_flight`` batches per actor outstanding (backpressure): tiles are drawn
lazily from the plan, so neither tiles nor results pile up however many scenes there are. An actor that
dies is restarted by Ray and its batches retried (``max_retries``); a model error fails only its tile;
an out-of-memory error splits the batch and retries the halves before failing a tile.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice

import ray
from ray.exceptions import RayActorError

from geobatch.access import Access
from geobatch.jobs import ModelSpec
from geobatch.models.base import Prompt, Segmenter, TileInput, TileResult, load_model
from geobatch.scenes import SceneLike, SceneReader
from geobatch.stitch import Mosaic, write_tile
from geobatch.tiling import Tile

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TileWork:
    """Everything a worker needs for one tile, passed explicitly (no globals on workers)."""

    scene: SceneLike
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
    worker: str | None = None  # pid@host of the actor that processed it
    caption: str | None = None  # the model's caption of the tile, for models that write one


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """How one actor spent its time: ``busy_s`` inside the model out of ``wall_s`` since its first batch."""

    worker: str
    device: str
    tiles: int
    busy_s: float
    wall_s: float

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / self.wall_s if self.wall_s else 0.0


@dataclass(frozen=True, slots=True)
class InferenceSettings:
    """How the pool is shaped: actors, their resources, batch size, outstanding batches, retries."""

    num_actors: int
    num_gpus: float  # per actor: 1 on a GPU cluster, else 0
    batch_size: int
    in_flight: int = 2  # batches outstanding per actor
    max_retries: int = 3  # times a batch is retried after its actor died


class TileWorker:
    """Owns one model and one scene reader; Ray runs it as a threaded actor (two batches at a time)."""

    def __init__(self, model: ModelSpec, prompts: Sequence[Prompt], bands: Sequence[str], access: Access) -> None:
        self.model = load_model(model.name, model.backend_options)
        self.prompts = tuple(prompts)
        self.bands = tuple(bands)
        self.access = access
        self._readers = threading.local()  # GDAL datasets are not thread-safe: one reader per thread
        self.name = f"{os.getpid()}@{socket.gethostname()}"
        self._model_lock = threading.Lock()  # one inference at a time: the device's memory holds one batch
        self._stats_lock = threading.Lock()
        self._first: float | None = None
        self._last = 0.0
        self._busy = 0.0
        self._tiles = 0

    def run(self, batch: Sequence[TileWork]) -> list[TileOutcome]:
        """Read, infer and write one batch of tiles; every tile gets an outcome, whatever fails."""
        started = time.perf_counter()
        outcomes: dict[str, TileOutcome] = {}
        inputs: list[tuple[TileWork, TileInput]] = []
        for work in batch:
            try:
                pixels = self._reader().read(work.scene, work.tile.read_window, self.bands)
            except Exception as exc:  # noqa: BLE001 - whatever a tile raises fails that tile only
                outcomes[work.tile.tile_id] = self._failed(work.tile, exc)
                continue
            if not pixels.valid[work.tile.core_in_read].any():
                outcomes[work.tile.tile_id] = self._outcome(work.tile, "skipped", "no valid pixels (all nodata)")
            else:
                grid = work.scene.geobox[work.tile.read_window.toslices()]
                inputs.append((work, TileInput(work.tile, pixels.bands, pixels.valid, grid)))
        with self._model_lock:
            inferred = time.perf_counter()
            results = self._infer([tile_input for _, tile_input in inputs])
            self._account(started, inferred, len(batch))
        for (work, tile_input), result in zip(inputs, results):
            try:
                if isinstance(result, Exception):
                    raise result
                labelled = write_tile(work.mosaic, work.tile, result, tile_input.valid)
            except Exception as exc:  # noqa: BLE001 - as above
                outcomes[work.tile.tile_id] = self._failed(work.tile, exc)
                continue
            outcomes[work.tile.tile_id] = self._outcome(work.tile, "done", None, labelled, result.caption)
        with self._stats_lock:
            self._last = time.perf_counter()
        return [outcomes[work.tile.tile_id] for work in batch]

    def _reader(self) -> SceneReader:
        if not hasattr(self._readers, "reader"):
            self._readers.reader = SceneReader(self.access)
        return self._readers.reader

    def stats(self) -> WorkerStats:
        with self._stats_lock:
            wall = self._last - self._first if self._first is not None else 0.0
            return WorkerStats(self.name, getattr(self.model, "device", "cpu"), self._tiles, self._busy, wall)

    def _infer(self, inputs: list[TileInput]) -> list[TileResult | Exception]:
        """The model on ``inputs``; a failing batch is split in halves until the failure is one tile's."""
        if not inputs:
            return []
        try:
            return list(predict(self.model, inputs, self.prompts))
        except Exception as exc:  # noqa: BLE001 - isolated down to the tile that raised it
            if len(inputs) == 1:
                return [exc]
            if _is_out_of_memory(exc):
                log.warning("out of memory on a batch of %d tiles; retrying in halves", len(inputs))
            half = len(inputs) // 2
            return self._infer(inputs[:half]) + self._infer(inputs[half:])

    def _account(self, started: float, inferred: float, tiles: int) -> None:
        with self._stats_lock:
            self._first = started if self._first is None else min(self._first, started)
            self._busy += time.perf_counter() - inferred
            self._tiles += tiles

    def _outcome(
        self, tile: Tile, status: str, reason: str | None = None, labelled: int = 0, caption: str | None = None
    ) -> TileOutcome:
        return TileOutcome(tile.scene_id, tile.tile_id, status, reason, labelled, self.name, caption)

    def _failed(self, tile: Tile, exc: Exception) -> TileOutcome:
        log.warning("tile %s failed: %s", tile.tile_id, exc, exc_info=not isinstance(exc, OSError))
        return self._outcome(tile, "failed", f"{type(exc).__name__}: {exc}")


def predict(model: Segmenter, inputs: Sequence[TileInput], prompts: Sequence[Prompt]) -> Sequence[TileResult]:
    """A batch through the model: its own ``predict_batch`` if it has one, else tile by tile."""
    batched = getattr(model, "predict_batch", None)
    return batched(inputs, prompts) if batched else [model(tile, prompts) for tile in inputs]


def inference_settings(
    model: Segmenter, num_actors: int | None, batch_size: int | None, max_retries: int
) -> InferenceSettings:
    """One actor per GPU when the cluster has GPUs, else one per CPU (or ``num_actors``)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    default_actors = gpus or max(1, int(resources.get("CPU", 1)))
    return InferenceSettings(
        num_actors=num_actors or default_actors,
        num_gpus=1 if gpus else 0,
        batch_size=batch_size or getattr(model, "batch_size", 1),
        max_retries=max_retries,
    )


@dataclass
class PoolReport:
    """What the driver saw of the stream: throughput and how full the pipeline was."""

    settings: InferenceSettings
    workers: list[WorkerStats]
    tiles: int = 0
    seconds: float = 0.0
    mean_batches_in_flight: float = 0.0

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds else 0.0


def run_tiles(
    work: Iterable[TileWork],
    model: ModelSpec,
    prompts: Sequence[Prompt],
    bands: Sequence[str],
    access: Access,
    settings: InferenceSettings,
    report: PoolReport,
) -> Iterator[TileOutcome]:
    """Process ``work`` (drawn lazily) on a pool of actors, yielding outcomes as batches finish.

    Ray must already be initialised. ``report`` is filled in as the stream runs and when it ends.
    """
    batches = _batched(iter(work), settings.batch_size)
    first = next(batches, None)
    if first is None:
        return
    actor_class = ray.remote(
        num_cpus=0 if settings.num_gpus else 1,
        num_gpus=settings.num_gpus,
        max_concurrency=2,
        max_restarts=-1,
        max_task_retries=settings.max_retries,
    )(TileWorker)
    actors = [actor_class.remote(model, prompts, bands, access) for _ in range(settings.num_actors)]
    pending: dict[ray.ObjectRef, tuple[int, list[TileWork]]] = {}
    queue = chain([first], batches)
    started, samples = time.perf_counter(), []

    def submit(index: int) -> bool:
        batch = next(queue, None)
        if batch is None:
            return False
        pending[actors[index].run.remote(batch)] = (index, batch)
        return True

    try:
        for index in range(len(actors)):
            for _ in range(settings.in_flight):
                submit(index)
        while pending:
            samples.append(len(pending))
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            index, batch = pending.pop(ready)
            yield from _results(ready, batch)
            report.tiles += len(batch)
            submit(index)
        report.seconds = time.perf_counter() - started
        report.mean_batches_in_flight = sum(samples) / len(samples) if samples else 0.0
        report.workers = ray.get([actor.stats.remote() for actor in actors])
    finally:
        for actor in actors:
            ray.kill(actor)


def _results(ready: ray.ObjectRef, batch: list[TileWork]) -> list[TileOutcome]:
    try:
        return ray.get(ready)
    except RayActorError as exc:  # the actor died more often than Ray was allowed to retry the batch
        reason = f"worker died while processing the tile, after retries: {' '.join(str(exc).split())[:300]}"
        return [TileOutcome(w.tile.scene_id, w.tile.tile_id, "failed", reason) for w in batch]


def _batched(items: Iterator[TileWork], size: int) -> Iterator[list[TileWork]]:
    while batch := list(islice(items, size)):
        yield batch


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or any accelerator) out-of-memory, recognised without importing torch."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()
