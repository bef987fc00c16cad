"""A backend of fixed, known cost per tile, for measuring and testing the pipeline around the model.

It answers like ``spectral`` (so its outputs can be checked) and then keeps the CPU busy until
``seconds`` have passed since the tile arrived, so every tile costs the same model time however fast
the index is. Benchmarks use it to isolate pipeline overhead; with ``device="cuda"`` the time is spent
in matrix products on the GPU (PyTorch, the ``geopixel`` extra), so a GPU actor can be measured. For
tests of failure handling it can also raise on chosen tiles (``fail_tiles``) and run out of memory on
batches larger than ``max_batch``, with an error named like PyTorch's CUDA one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from geobatch.models.base import Prompt, TileInput, TileResult
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
