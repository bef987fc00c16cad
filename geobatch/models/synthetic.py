"""Synthetic backends with known answers, for measuring and testing the pipeline around the model.

``fixed-cost`` (:class:`FixedCost`) answers like ``spectral`` (so its outputs can be checked) and then
keeps the CPU busy until ``seconds`` have passed since the tile arrived, so every tile costs the same
model time however fast the index is. Benchmarks use it to isolate pipeline overhead; with
``device="cuda"`` the time is spent in matrix products on the GPU (PyTorch, the ``geopixel`` extra), so a
GPU actor can be measured. For tests of failure handling it can also raise on chosen tiles
(``fail_tiles``) and run out of memory on batches larger than ``max_batch``, with an error named like
PyTorch's CUDA one.

``synthetic-instances`` (:class:`SyntheticInstances`) behaves like an instance model (SAM, GeoPixel):
deterministic discs, rectangles and rings placed in *scene* pixel coordinates, which overlap each other
and are cut by tile edges, each with its own score and phrase. Its ground truth is
:func:`synthetic_instances` plus :meth:`SyntheticShape.mask`, so tests can check the stitched result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from geobatch.models.base import Instance, Prompt, TileInput, TileResult
from geobatch.models.spectral import Spectral


class OutOfMemoryError(RuntimeError):
    """Named like ``torch.cuda.OutOfMemoryError``, which is how workers recognise it."""


class FixedCost(Spectral):
    """``spectral``'s answers at ``seconds`` of busy CPU per tile, in batches of ``batch_size``."""

    name = "fixed-cost"

    def __init__(
        self,
        seconds: float = 0.1,
        batch_size: int = 1,
        fail_tiles: Sequence[str] = (),
        max_batch: int | None = None,
        device: str = "cpu",
        thresholds: dict[str, float] | None = None,
    ) -> None:
        super().__init__(thresholds)
        self.seconds = float(seconds)
        self.batch_size = int(batch_size)
        self.fail_tiles = frozenset(fail_tiles)
        self.max_batch = max_batch
        self._spin = _busy_cpu if device == "cpu" else _busy_gpu(device)
        self.device = device if device == "cpu" else f"{device} ({_gpu_name(device)})"

    def __call__(self, tile: TileInput, prompts: Sequence[Prompt]) -> TileResult:
        deadline = time.perf_counter() + self.seconds
        if tile.tile.tile_id in self.fail_tiles:
            raise RuntimeError(f"injected model failure on tile {tile.tile.tile_id}")
        result = super().__call__(tile, prompts)
        self._spin(deadline)
        return result

    def predict_batch(self, tiles: Sequence[TileInput], prompts: Sequence[Prompt]) -> list[TileResult]:
        if self.max_batch is not None and len(tiles) > self.max_batch:
            raise OutOfMemoryError(f"out of memory: a batch of {len(tiles)} tiles, at most {self.max_batch} fit")
        return [self(tile, prompts) for tile in tiles]


def _busy_cpu(deadline: float) -> None:
    while time.perf_counter() < deadline:  # busy, like a model's compute, not asleep
        pass


def _busy_gpu(device: str):
    import torch

    matrix = torch.randn(2048, 2048, device=device)

    def spin(deadline: float) -> None:
        while time.perf_counter() < deadline:
            (matrix @ matrix).sum().item()  # a kernel, then a sync: the device is busy until the deadline

    return spin


def _gpu_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device))


SHAPE_KINDS = ("disc", "rect", "ring")


@dataclass(frozen=True, slots=True)
class SyntheticShape:
    """One synthetic instance, in scene pixel coordinates (pixel ``(r, c)`` has its centre at ``r + .5, c + .5``).

    A disc holds the pixels within ``radius`` of the centre; a ring those between ``inner`` and ``radius``;
    a rectangle those within ``radius`` rows and ``inner`` columns of it.
    """

    label: str
    kind: str
    row: float  # centre
    col: float
    radius: float
    inner: float
    score: float
    phrase: str

    def bounds(self) -> tuple[int, int, int, int]:
        """Rows and columns ``(top, left, bottom, right)`` (bottom, right exclusive) that may hold pixels."""
        half_width = self.inner if self.kind == "rect" else self.radius
        return (
            math.floor(self.row - self.radius),
            math.floor(self.col - half_width),
            math.ceil(self.row + self.radius) + 1,
            math.ceil(self.col + half_width) + 1,
        )

    def mask(self, window: Window) -> np.ndarray:
        """The shape's pixels over ``window`` (bool, window shape)."""
        dr = window.row_off + np.arange(window.height)[:, None] + 0.5 - self.row
        dc = window.col_off + np.arange(window.width)[None, :] + 0.5 - self.col
        if self.kind == "rect":
            return (np.abs(dr) <= self.radius) & (np.abs(dc) <= self.inner)
        distance2 = dr**2 + dc**2
        inside = distance2 <= self.radius**2
        return inside & (distance2 >= self.inner**2) if self.kind == "ring" else inside


def synthetic_instances(
    labels: Sequence[str], seed: int = 0, count: int = 24, extent: Sequence[int] = (512, 512), max_size: float = 96
) -> list[SyntheticShape]:
    """The instances :class:`SyntheticInstances` answers: ``count`` shapes over ``extent`` (height, width).

    Shape ``k`` is a disc, rectangle or ring (``k % 3``) of prompt ``labels[k % len(labels)]``, centred
    uniformly at random, of a size log-uniform between 3 and ``max_size`` pixels (so some are far larger
    than a tile, many small), with a distinct score in (0.5, 1) and the phrase ``"{label} {kind} {k}"``.
    """
    rng = np.random.default_rng(seed)
    scores = 0.5 + 0.5 * (1 + rng.permutation(count)) / (count + 1)
    shapes = []
    for k in range(count):
        kind, label = SHAPE_KINDS[k % len(SHAPE_KINDS)], labels[k % len(labels)]
        row, col = rng.uniform(0, extent[0]), rng.uniform(0, extent[1])
        size = math.exp(rng.uniform(math.log(3), math.log(max_size)))
        inner = {"disc": 0.0, "rect": size * rng.uniform(0.3, 1.5), "ring": size * rng.uniform(0.4, 0.8)}[kind]
        shapes.append(SyntheticShape(label, kind, row, col, size, inner, float(scores[k]), f"{label} {kind} {k}"))
    return shapes


class SyntheticInstances:
    """An instance model with known answers: :func:`synthetic_instances` seen through each read window.

    Every prompt is answered (any kind). A tile gets each shape that has a valid pixel in its read window,
    masked to the valid pixels there. ``extent`` should be the scene's size: shapes are placed over it, and
    its border is the scene's edge. ``edge_erosion`` px along each read-window side that cuts the extent
    are dropped from every mask, as a model sees less near a cut: counterparts on neighbouring tiles then
    differ (IoU < 1). With ``edge_erosion`` at most the tiling's overlap, every core pixel is still seen.
    Like ``fixed-cost``, it raises on the tiles named in ``fail_tiles``.
    """

    name = "synthetic-instances"
    input_values = "physical"
    objects = "instances"

    def __init__(
        self,
        seed: int = 0,
        count: int = 24,
        extent: Sequence[int] = (512, 512),
        max_size: float = 96,
        edge_erosion: int = 0,
        fail_tiles: Sequence[str] = (),
    ) -> None:
        extent = (int(extent[0]), int(extent[1]))
        self.shape_options = {"seed": int(seed), "count": int(count), "extent": extent, "max_size": max_size}
        self.edge_erosion = int(edge_erosion)
        self.fail_tiles = frozenset(fail_tiles)

    def required_bands(self, prompts: Sequence[Prompt]) -> tuple[str, ...]:
        return ("red",)  # read only for its validity: nodata pixels are never labelled

    def shapes(self, prompts: Sequence[Prompt]) -> list[SyntheticShape]:
        return synthetic_instances([p.label for p in prompts], **self.shape_options)

    def __call__(self, tile: TileInput, prompts: Sequence[Prompt]) -> TileResult:
        if tile.tile.tile_id in self.fail_tiles:
            raise RuntimeError(f"injected model failure on tile {tile.tile.tile_id}")
        window = tile.tile.read_window
        seen = tile.valid & _away_from_cuts(window, self.shape_options["extent"], self.edge_erosion)
        instances: dict[str, list[Instance]] = {p.label: [] for p in prompts}
        for shape in self.shapes(prompts):
            top, left, bottom, right = shape.bounds()
            if bottom <= window.row_off or top >= window.row_off + window.height:
                continue
            if right <= window.col_off or left >= window.col_off + window.width:
                continue
            mask = shape.mask(window) & seen
            if mask.any():
                instances[shape.label].append(Instance(mask, shape.score, shape.phrase))
        return TileResult(tile.tile.tile_id, instances)


def _away_from_cuts(window: Window, extent: tuple[int, int], erosion: int) -> np.ndarray:
    """Pixels of ``window`` farther than ``erosion`` from each of its sides that cuts the ``extent``.

    A side that lies on the extent's border (the scene's edge) is no cut: there is nothing beyond it.
    """
    keep = np.ones((window.height, window.width), bool)
    if erosion <= 0:
        return keep
    if window.row_off > 0:
        keep[:erosion] = False
    if window.col_off > 0:
        keep[:, :erosion] = False
    if window.row_off + window.height < extent[0]:
        keep[-erosion:] = False
    if window.col_off + window.width < extent[1]:
        keep[:, -erosion:] = False
    return keep
