"""Vector features as prompts: boxes or points from a GeoPackage, GeoParquet or GeoJSON file, placed in tiles.

A model prompted by existing vector data (old building footprints, field parcels) gets, for each tile,
the features that reach its read window, as a box (the feature's bounding box) or a point (a point
inside it), in the read window's pixel coordinates. The file may be in any CRS: its features are
reprojected once per scene CRS and then placed tile by tile with an R-tree, so a tile costs a query,
not a pass over the file. Features are read once, whole (they are prompts: thousands, not billions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import shapely
from odc.geo.geobox import GeoBox

from geobatch.errors import JobSpecError

PromptKind = Literal["box", "point"]


@dataclass(frozen=True, slots=True)
class PromptFeature:
    """One feature of the prompts file: its id (as text) and its other properties."""

    id: str
    properties: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PlacedPrompt:
    """A feature placed in one read window: ``box`` (x0, y0, x1, y1) or ``point`` (x, y), in its pixels.

    x is the column and y the row, from the window's top-left corner (pixel centres at .5); a box is
    cut to the window.
    """

    feature: PromptFeature
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None


class PromptFeatures:
    """The features of ``path``, keyed by the ``id_field`` property, as ``kind`` prompts.

    Raises :class:`JobSpecError` naming the file (and the option, ``field``) when it cannot be read, has no
    ``id_field`` or repeats an id, or has a feature with no geometry (or, for boxes, a point geometry).
    """

    def __init__(self, path: str | Path, id_field: str, kind: PromptKind, field: str = "prompts_file") -> None:
        import geopandas as gpd

        self.path, self.kind = Path(path), kind
        try:
            frame = (
                gpd.read_parquet(self.path)
                if self.path.suffix in (".parquet", ".geoparquet")
                else gpd.read_file(self.path)
            )
        except Exception as exc:  # noqa: BLE001 - any reader failure: one line naming the file
            raise JobSpecError(f"{field} {self.path}: cannot be read: {' '.join(str(exc).split())[:200]}") from None
        if frame.crs is None:
            raise JobSpecError(f"{field} {self.path}: has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:4326)")
        if id_field not in frame.columns:
            columns = [c for c in frame.columns if c != frame.geometry.name]
            raise JobSpecError(f"{field} {self.path}: no id column '{id_field}'; its columns are {columns}")
        ids = frame[id_field].astype(str)
        repeated = sorted(set(ids[ids.duplicated()]))
        if repeated:
            raise JobSpecError(f"{field} {self.path}: ids in '{id_field}' must be unique, repeated: {repeated[:5]}")
        geometries = frame.geometry.to_numpy()
        empty = shapely.is_missing(geometries) | shapely.is_empty(geometries)
        if empty.any():
            raise JobSpecError(f"{field} {self.path}: feature '{ids[empty].iloc[0]}' has no geometry")
        points = shapely.get_type_id(geometries) == shapely.GeometryType.POINT
        if kind == "box" and points.any():
            raise JobSpecError(
                f"{field} {self.path}: feature '{ids[points].iloc[0]}' is a point; use prompt_kind: point for points"
            )
        properties = frame.drop(columns=[frame.geometry.name, id_field])
        self.features = tuple(
            PromptFeature(i, _plain(row)) for i, row in zip(ids, properties.to_dict(orient="records"))
        )
        self._frame = gpd.GeoDataFrame(geometry=frame.geometry.to_numpy(), crs=frame.crs)
        self._in_crs: dict[str, tuple[np.ndarray, shapely.STRtree]] = {}

    def __len__(self) -> int:
        return len(self.features)

    def in_window(self, grid: GeoBox) -> list[PlacedPrompt]:
        """The features that reach the window ``grid`` (a read window's GeoBox), placed in its pixels."""
        geometries, tree = self._projected(grid)
        candidates = tree.query(shapely.box(*grid.extent.boundingbox.bbox))
        pixels = shapely.transform(geometries[np.sort(candidates)], _to_pixels(grid))
        height, width = grid.shape.yx
        placed = []
        for index, shape in zip(np.sort(candidates), pixels):
            feature = self.features[index]
            if self.kind == "point":
                x, y = shape.x, shape.y
                if 0 <= x < width and 0 <= y < height:
                    placed.append(PlacedPrompt(feature, point=(x, y)))
                continue
            x0, y0, x1, y1 = shape.bounds
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
            if x0 < x1 and y0 < y1:
                placed.append(PlacedPrompt(feature, box=(x0, y0, x1, y1)))
        return placed

    def outside(self, grids: Sequence[GeoBox]) -> list[str]:
        """Ids of the features that reach none of ``grids`` (scene grids): prompts no tile will answer."""
        reached = {placed.feature.id for grid in grids for placed in self.in_window(grid)}
        return [feature.id for feature in self.features if feature.id not in reached]

    def _projected(self, grid: GeoBox) -> tuple[np.ndarray, shapely.STRtree]:
        """The prompt geometries in ``grid``'s CRS (points: a point inside each), and their R-tree; cached."""
        key = grid.crs.wkt
        if key not in self._in_crs:
            geometries = self._frame.to_crs(key).geometry.to_numpy()
            if self.kind == "point":
                geometries = shapely.point_on_surface(geometries)
            self._in_crs[key] = (geometries, shapely.STRtree(geometries))
        return self._in_crs[key]


def _to_pixels(grid: GeoBox):
    """A coordinate transform from ``grid``'s CRS to its pixel (column, row) coordinates."""
    inverse = ~grid.affine

    def transform(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.stack([inverse.a * x + inverse.b * y + inverse.c, inverse.d * x + inverse.e * y + inverse.f], axis=1)

    return transform


def _plain(record: Mapping[str, Any]) -> dict[str, Any]:
    """A feature's properties as JSON-ready Python values (NumPy scalars unwrapped, missing values None)."""
    import pandas as pd

    plain = {}
    for name, value in record.items():
        if isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, pd.Timestamp):
            value = value.isoformat()
        plain[str(name)] = None if value is None or (isinstance(value, float) and np.isnan(value)) else value
    return plain
