"""Weight-free default backend: classes from normalised-difference band indices.

Each class is a normalised difference ``(a - b) / (a + b)`` of two bands above a threshold: water from
NDWI (green, NIR), vegetation from NDVI (NIR, red). It is pixel-wise, so tiling cannot change its result.
The per-pixel confidence rises linearly from 0.5 at the threshold to 1.0 at an index of 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geobatch.errors import UnsupportedPrompt
from geobatch.models.base import Instance, Prompt, TileInput, TileResult


@dataclass(frozen=True, slots=True)
class SpectralClass:
    """A class defined by ``(bands[0] - bands[1]) / (bands[0] + bands[1]) > threshold``."""

    name: str
    bands: tuple[str, str]
    threshold: float
    keywords: tuple[str, ...]


DEFAULT_CLASSES = (
    SpectralClass("water", ("green", "nir"), 0.0, ("water", "lake", "pond", "river", "reservoir", "wetland", "sea")),
    SpectralClass("vegetation", ("nir", "red"), 0.3, ("vegetation", "tree", "forest", "grass", "crop", "plant")),
)


class Spectral:
    """Index-threshold segmenter; ``thresholds`` overrides a class's default, e.g. ``{"water": 0.1}``."""

    name = "spectral"
    input_values = "physical"  # band ratios need values proportional to radiance, not stretched ones

    def __init__(self, thresholds: dict[str, float] | None = None) -> None:
        thresholds = thresholds or {}
        unknown = sorted(set(thresholds) - {c.name for c in DEFAULT_CLASSES})
        if unknown:
            raise UnsupportedPrompt(f"spectral: no class {unknown} to set a threshold for; it has {self._names()}")
        self.classes = tuple(
            SpectralClass(c.name, c.bands, float(thresholds.get(c.name, c.threshold)), c.keywords)
            for c in DEFAULT_CLASSES
        )

    def required_bands(self, prompts: Sequence[Prompt]) -> tuple[str, ...]:
        needed = [band for prompt in prompts for band in self.resolve(prompt).bands]
        return tuple(dict.fromkeys(needed))

    def resolve(self, prompt: Prompt) -> SpectralClass:
        """The class that answers ``prompt``; raises :class:`UnsupportedPrompt` if none or several do."""
        if prompt.kind != "class":
            raise UnsupportedPrompt(f"spectral answers only 'class' prompts, not '{prompt.kind}' ('{prompt.text}')")
        text = prompt.text.lower()
        matches = [c for c in self.classes if any(k in text for k in c.keywords)]
        if len(matches) != 1:
            problem = "matches no class" if not matches else f"is ambiguous between {[c.name for c in matches]}"
            raise UnsupportedPrompt(f"spectral: prompt '{prompt.text}' {problem}; it can segment {self._names()}")
        return matches[0]

    def __call__(self, tile: TileInput, prompts: Sequence[Prompt]) -> TileResult:
        instances: dict[str, list[Instance]] = {}
        for prompt in prompts:
            cls = self.resolve(prompt)
            index = normalised_difference(tile.bands[cls.bands[0]], tile.bands[cls.bands[1]])
            mask = (index > cls.threshold) & tile.valid
            score_map = np.where(mask, 0.5 + 0.5 * np.clip((index - cls.threshold) / (1 - cls.threshold), 0, 1), 0)
            score_map = score_map.astype(np.float32)
            instances[prompt.label] = (
                [Instance(mask, float(score_map[mask].mean()), prompt.label, score_map)] if mask.any() else []
            )
        return TileResult(tile.tile.tile_id, instances)

    @staticmethod
    def _names() -> list[str]:
        return [f"{c.name} (say: {', '.join(c.keywords)})" for c in DEFAULT_CLASSES]


def normalised_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a - b) / (a + b)`` in float32, 0 where both are 0."""
    a, b = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
    total = a + b
    return np.divide(a - b, total, out=np.zeros_like(total), where=total != 0)
