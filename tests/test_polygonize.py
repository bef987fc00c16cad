"""Pixel-edge polygons against GDAL's polygoniser (rasterio.features.shapes), the reference they replace."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio.features
import shapely
from scipy import ndimage

from geobatch.polygonize import Runs, boundary_runs, polygon_wkb, polygons


def gdal_polygons(ids: np.ndarray) -> dict[int, shapely.Geometry]:
    found: dict[int, list] = {}
    for geometry, value in rasterio.features.shapes(ids.astype(np.int32), mask=ids > 0, connectivity=4):
        found.setdefault(int(value), []).append(shapely.geometry.shape(geometry))
    return {value: shapely.union_all(parts) if len(parts) > 1 else parts[0] for value, parts in found.items()}


def ours(ids: np.ndarray) -> dict[int, shapely.Geometry]:
    values, shapes = polygons(boundary_runs(np.pad(ids, 1)))
    return dict(zip(values.tolist(), shapes))


def assert_same(ids: np.ndarray) -> None:
    expected, got = gdal_polygons(ids), ours(ids)
    assert sorted(got) == sorted(expected)
    for value, shape in got.items():
        assert shape.is_valid, (value, shapely.validation.explain_validity(shape))
        assert shape.equals(expected[value]) and shape.area == expected[value].area, value


@pytest.mark.parametrize("seed", range(40))
def test_connected_components_match_gdal(seed):
    rng = np.random.default_rng(seed)
    shape = rng.integers(1, 48, 2)
    mask = rng.random(shape) < rng.uniform(0.2, 0.8)
    components, _ = ndimage.label(mask)  # 4-connected, with pinches, holes and islands in holes
    assert_same(components)


@pytest.mark.parametrize("seed", range(40))
def test_regions_in_several_parts_match_gdal(seed):
    """Instance rasters: one id may hold several 4-connected parts, touching at corners or apart."""
    ids = np.random.default_rng(seed).integers(0, 4, np.random.default_rng(seed + 100).integers(1, 40, 2))
    assert_same(ids)


def test_a_pinched_ring_becomes_a_shell_and_a_touching_hole():
    ring = np.array(
        [
            [1, 1, 1, 0],
            [1, 0, 1, 0],
            [1, 1, 0, 1],
            [0, 0, 1, 1],
        ]
    )
    components, _ = ndimage.label(ring)
    shapes = ours(components)
    assert len(shapes) == 2  # the corner-touching pixel pair is two objects under 4-connectivity
    big = max(shapes.values(), key=lambda s: s.area)
    assert big.is_valid and big.area == 7
    (hole,) = big.interiors  # the hole reaches the outside only through a corner: it touches the shell there
    assert shapely.Polygon(hole).area == 1 and big.exterior.intersection(hole).equals(shapely.Point(2, 2))


def test_runs_cut_by_chunk_seams_trace_to_the_whole_scene_polygon():
    rng = np.random.default_rng(7)
    components, _ = ndimage.label(ndimage.binary_opening(rng.random((60, 70)) < 0.6))
    halo = np.pad(components, 1)
    pieces = []
    for rows in (slice(0, 25), slice(25, 60)):
        for cols in (slice(0, 33), slice(33, 70)):
            window = halo[rows.start : rows.stop + 2, cols.start : cols.stop + 2]  # the chunk and its neighbours' edge
            pieces.append(boundary_runs(window, (rows.start, cols.start)))
    values, shapes = polygons(Runs.concat(pieces))
    whole = ours(components)
    assert sorted(values.tolist()) == sorted(whole)
    for value, shape in zip(values.tolist(), shapes):
        assert shapely.equals_exact(shape, whole[value], 0)  # same vertices, same start: independent of the cut


def test_nothing_in_gives_nothing_out():
    values, shapes = polygons(boundary_runs(np.zeros((5, 5), np.int64)))
    assert len(values) == len(shapes) == 0


def test_runs_that_do_not_close_into_rings_are_refused_not_walked_forever():
    runs = boundary_runs(np.pad(np.ones((3, 4), np.int64), 1))
    with pytest.raises(ValueError, match="do not close into rings"):
        polygon_wkb(runs.select(np.s_[:-1]))  # a region's last run lost


@pytest.mark.parametrize("seed", range(6))
def test_wkb_written_from_the_coordinates_is_shapely_s_wkb_of_the_same_polygons(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 3, (30, 40)) if seed % 2 else ndimage.label(rng.random((30, 40)) < 0.5)[0]
    runs = boundary_runs(np.pad(ids, 1))
    lonlat = lambda xy: xy * [1e-5, -1e-5] + [-98.5, 35.2]
    values, shapes = polygons(runs, lonlat)
    written = polygon_wkb(runs, lonlat)
    assert written.ids.tolist() == values.tolist()
    assert written.wkb.to_pylist() == shapely.to_wkb(shapes).tolist()  # byte for byte, multipart regions too
    assert np.array_equal(written.bounds, shapely.bounds(shapes))
