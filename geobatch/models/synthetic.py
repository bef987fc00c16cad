"""A backend of fixed, known cost per tile, for measuring the pipeline around the model.

It answers like ``spectral`` (so its outputs can be checked) and then keeps the CPU busy until
``seconds`` have passed since the tile arrived, so every tile costs the same model time however fast
the index is. Benchmarks use it to isolate pipeline overhead; tests use it to make a run long enough to
interrupt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from geobatch.models.base import Prompt, TileInput, TileResult
from geobatch.models.spectral import Spectral


class FixedCost(Spectral):
    """``spectral``'s answers at ``seconds`` of busy CPU per tile."""

    name = "fixed-cost"

    def __init__(self, seconds: float = 0.1, thresholds: dict[str, float] | None = None) -> None:
        super().__init__(thresholds)
        self.seconds = float(seconds)

    def __call__(self, tile: TileInput, prompts: Sequence[Prompt]) -> TileResult:
        deadline = time.perf_counter() + self.seconds
        result = super().__call__(tile, prompts)
        while time.perf_counter() < deadline:  # busy, like a model's compute, not asleep
            pass
        return result
