"""Regional mosaics: one grid for the whole job, and the order in which its scenes fill it.

With a ``region`` in the job, the pipeline makes one mosaic on the regional grid instead of one per
scene: a :class:`~geobatch.scenes.Region` stands where a scene would, its tiles are tiles of the regional
grid, and :class:`~geobatch.scenes.SceneReader` composes each window from the source scenes that reach
it. Planning here is pure: no pixel is read.

Overlap rule (``newest``): sources are ordered newest acquisition first, undated last, ties in job order;
the first source with a valid pixel wins it, so older scenes fill only what newer ones leave nodata.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from odc.geo import resxy_
from odc.geo.crs import CRS
from odc.geo.geobox import GeoBox
from odc.geo.geom import BoundingBox
from pyproj import Transformer

from geobatch.jobs import RegionSpec
from geobatch.scenes import Region, RegionSource, Scene

_UNDATED = dt.datetime.min.replace(tzinfo=dt.UTC)


def region_grid(spec: RegionSpec) -> GeoBox:
    """The regional grid: pixels of ``spec.resolution`` in ``spec.crs`` covering ``spec.bounds`` (reprojected
    from ``bounds_crs`` first), from the bounds' top-left corner, or with ``snap`` on multiples of the
    resolution."""
    bounds = BoundingBox(*spec.bounds, crs=spec.bounds_crs or spec.crs).to_crs(spec.crs)
    x, y = spec.resolution_xy
    return GeoBox.from_bbox(bounds, resolution=resxy_(x, -y), tight=not spec.snap)


def make_region(spec: RegionSpec, scenes: Sequence[Scene]) -> Region:
    """The region of ``spec`` composed of those of ``scenes`` whose footprint reaches it, in overlap order.

    The region's ``acquired_at`` is its newest source's: the mosaic shows the ground as of that date
    wherever that scene has data.
    """
    grid = region_grid(spec)
    ordered = sorted(scenes, key=lambda s: s.acquired_at or _UNDATED, reverse=True)  # stable: ties keep job order
    sources = tuple(s for s in (_source(scene, grid.crs) for scene in ordered) if s.footprint.intersects(grid.extent))
    acquired_at = max((s.scene.acquired_at for s in sources if s.scene.acquired_at), default=None)
    return Region(spec.name, f"region:{spec.name}", acquired_at, grid, sources)


def _source(scene: Scene, crs: CRS) -> RegionSource:
    grid = scene.geobox
    if _same_coordinates(grid.crs, crs):
        grid = GeoBox(grid.shape, grid.affine, crs)
    return RegionSource(scene, grid, grid.footprint(crs))


def _same_coordinates(a: CRS, b: CRS) -> bool:
    """True when coordinates in ``a`` are coordinates in ``b``: equal CRSs, or ones PROJ transforms by a
    no-op (e.g. a WKT whose datum is only "based on the WGS 84 ellipsoid" and the EPSG code of its zone)."""
    return a == b or Transformer.from_crs(a.proj, b.proj, always_xy=True).definition.startswith("proj=noop")
