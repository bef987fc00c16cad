import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geobatch.tiling import TileGrid, plan_tiles

grids = st.builds(TileGrid, core=st.integers(1, 300), overlap=st.integers(0, 120))


@st.composite
def scenes_and_grids(draw):
    """A grid and a scene of at most ~20 x 20 tiles (up to 700 px a side), so each example stays fast."""
    grid = draw(grids)
    side = st.integers(1, min(700, grid.core * 20))
    return (draw(side), draw(side)), grid


@settings(max_examples=200, deadline=None)
@given(case=scenes_and_grids())
def test_cores_partition_the_scene_exactly(case):
    shape, grid = case
    owners = np.zeros(shape, np.int32)
    tiles = list(plan_tiles("s", shape, grid))
    for tile in tiles:
        rows, cols = tile.core_window.toslices()
        owners[rows, cols] += 1
    assert (owners == 1).all()
    assert len(tiles) == np.prod(grid.layout(shape))


@settings(max_examples=200, deadline=None)
@given(case=scenes_and_grids())
def test_read_window_is_core_plus_overlap_clipped_to_the_scene(case):
    shape, grid = case
    height, width = shape
    scene = np.arange(height * width).reshape(shape)
    for tile in plan_tiles("s", shape, grid):
        core, read = tile.core_window, tile.read_window
        assert read.row_off == max(core.row_off - grid.overlap, 0)
        assert read.col_off == max(core.col_off - grid.overlap, 0)
        assert read.row_off + read.height == min(core.row_off + core.height + grid.overlap, height)
        assert read.col_off + read.width == min(core.col_off + core.width + grid.overlap, width)
        # cutting the core out of a read-window array gives exactly the core pixels
        in_read = scene[read.toslices()][tile.core_in_read]
        assert np.array_equal(in_read, scene[core.toslices()])


@settings(deadline=None)
@given(case=scenes_and_grids())
def test_tile_ids_are_unique_and_deterministic(case):
    shape, grid = case
    first = [t.tile_id for t in plan_tiles("scene-a", shape, grid)]
    assert len(set(first)) == len(first)
    assert first == [t.tile_id for t in plan_tiles("scene-a", shape, grid)]
    other_grid = TileGrid(grid.core + 1, grid.overlap)
    assert not set(first) & {t.tile_id for t in plan_tiles("scene-a", shape, other_grid)}


def test_scene_smaller_than_one_tile_is_one_tile_covering_it():
    (tile,) = plan_tiles("small", (3, 2), TileGrid(512, 64))
    assert (tile.core_window.height, tile.core_window.width) == (3, 2)
    assert tile.read_window == tile.core_window


@pytest.mark.parametrize("core, overlap", [(0, 0), (-4, 2), (16, -1)])
def test_invalid_grid_is_rejected(core, overlap):
    with pytest.raises(ValueError, match="core must be > 0"):
        TileGrid(core, overlap)
