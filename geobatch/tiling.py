"""The tile grid: which pixels each tile reads and which it owns.

Planning is pure arithmetic, no I/O. For a scene of ``height`` x ``width`` pixels and a grid with core
size ``c`` and overlap ``o``, tile ``(row, col)`` owns the core window

    rows [row*c, min((row+1)*c, height)),  cols [col*c, min((col+1)*c, width))

and reads that window grown by ``o`` on every side, clipped to the scene. The cores partition the scene
exactly, so every pixel has one owner, and mosaic chunks of ``c`` x ``c`` line up with the cores.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from rasterio.windows import Window


@dataclass(frozen=True, slots=True)
class TileGrid:
    """Grid parameters: the owned block size and the extra context read on each side."""

    core: int
    overlap: int

    def __post_init__(self) -> None:
        if self.core <= 0 or self.overlap < 0:
            raise ValueError(f"core must be > 0 and overlap >= 0, got core={self.core}, overlap={self.overlap}")

    def layout(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Number of tile rows and columns for a scene of ``shape`` (height, width)."""
        return math.ceil(shape[0] / self.core), math.ceil(shape[1] / self.core)


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile of one scene, in that scene's pixel coordinates."""

    scene_id: str
    tile_id: str
    row: int
    col: int
    read_window: Window  # core + overlap, clipped to the scene
    core_window: Window  # the pixels this tile owns

    @property
    def core_in_read(self) -> tuple[slice, slice]:
        """Slices that cut the core out of an array covering the read window."""
        top = self.core_window.row_off - self.read_window.row_off
        left = self.core_window.col_off - self.read_window.col_off
        return slice(top, top + self.core_window.height), slice(left, left + self.core_window.width)


def plan_tiles(scene_id: str, shape: tuple[int, int], grid: TileGrid) -> Iterator[Tile]:
    """Yield the tiles of a ``shape`` (height, width) scene in row-major order; no I/O."""
    height, width = shape
    rows, cols = grid.layout(shape)
    for row in range(rows):
        for col in range(cols):
            top, left = row * grid.core, col * grid.core
            bottom, right = min(top + grid.core, height), min(left + grid.core, width)
            read_top, read_left = max(top - grid.overlap, 0), max(left - grid.overlap, 0)
            read_bottom, read_right = min(bottom + grid.overlap, height), min(right + grid.overlap, width)
            yield Tile(
                scene_id=scene_id,
                tile_id=f"{scene_id}/c{grid.core}o{grid.overlap}/r{row}c{col}",
                row=row,
                col=col,
                read_window=Window(read_left, read_top, read_right - read_left, read_bottom - read_top),
                core_window=Window(left, top, right - left, bottom - top),
            )
