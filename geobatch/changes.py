"""What changed between two acquisitions of the same place: objects matched by IoU.

``before`` and ``after`` each select one set of a label's objects from the catalog: by run id, or by a
date prefix of ``acquired_at`` (``2009``, ``2009-08``, ``2009-08-18``). Pairs of objects whose shapes
overlap are found with an STRtree, their IoU measured in a local equal-area projection, and pairs are
matched one to one greedily, highest IoU first (ties by before id, then after id), keeping pairs with
IoU >= ``min_iou``. Then:

- ``appeared``: an after object with no match; ``disappeared``: a before object with no match;
- ``changed``: a match whose IoU is below ``changed_iou`` (``why`` = shape) or whose area changed by more
  than ``area_change`` relative to the before area (``why`` = area, or shape+area); other matches are
  unchanged and not listed.

Memory: both selections' geometries and the candidate pairs (about one per overlapping object).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from geobatch.catalog import Catalog
from geobatch.errors import GeobatchError

RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")
CHANGE_COLUMNS = (
    "change", "why", "label", "before_id", "after_id", "iou", "before_area_m2", "after_area_m2", "area_ratio",
    "before_acquired_at", "after_acquired_at", "before_run_id", "after_run_id",
)  # fmt: skip


class BadSelection(GeobatchError, ValueError):
    """A --before / --after value is neither a run id nor a date, or selects nothing."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """``min_iou``: least IoU for two objects to be the same; below ``changed_iou`` or with an area ratio
    off 1 by more than ``area_change`` a matched object counts as changed."""

    min_iou: float = 0.1
    changed_iou: float = 0.5
    area_change: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.min_iou <= self.changed_iou <= 1 or self.area_change < 0:
            raise ValueError("need 0 < min_iou <= changed_iou <= 1 and area_change >= 0")


def select(catalog: Catalog, label: str, which: str, bbox=None) -> gpd.GeoDataFrame:
    """The ``label`` objects of one run id or one date prefix (``YYYY[-MM[-DD]]``), in ``bbox``."""
    if RUN_ID.match(which):
        found = catalog.query(bbox=bbox, label=label)
        found = found[found["run_id"] == which]
    elif _DATE.match(which):
        since, until = _date_range(which)
        found = catalog.query(bbox=bbox, label=label, since=since, until=until)
    else:
        raise BadSelection(f"'{which}' is neither a run id (like 20261128T020003Z-1a2b3c) nor a date YYYY[-MM[-DD]]")
    if found.empty:
        raise BadSelection(f"no '{label}' objects for '{which}'" + (f" in {list(bbox)}" if bbox else ""))
    return found.reset_index(drop=True)


def _date_range(prefix: str) -> tuple[str, str]:
    parts = [int(p) for p in prefix.split("-")]
    first = dt.date(parts[0], parts[1] if len(parts) > 1 else 1, parts[2] if len(parts) > 2 else 1)
    if len(parts) == 3:
        last = first
    elif len(parts) == 2:
        last = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - dt.timedelta(days=1)
    else:
        last = dt.date(parts[0], 12, 31)
    return first.isoformat(), last.isoformat()


def candidate_pairs(before: gpd.GeoDataFrame, after: gpd.GeoDataFrame) -> pd.DataFrame:
    """Every (before, after) pair whose shapes overlap with positive area, with its IoU (equal-area CRS)."""
    if before.empty or after.empty:
        return pd.DataFrame({"b": np.array([], int), "a": np.array([], int), "iou": np.array([], float)})
    crs = pd.concat([before.geometry, after.geometry]).pipe(gpd.GeoSeries, crs=4326).estimate_utm_crs()
    shapes_b = before.geometry.to_crs(crs).to_numpy()
    shapes_a = after.geometry.to_crs(crs).to_numpy()
    b, a = shapely.STRtree(shapes_a).query(shapes_b, predicate="intersects")
    inter = shapely.area(shapely.intersection(shapes_b[b], shapes_a[a]))
    union = shapely.area(shapes_b[b]) + shapely.area(shapes_a[a]) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    keep = iou > 0
    return pd.DataFrame({"b": b[keep], "a": a[keep], "iou": iou[keep]})


def match(pairs: pd.DataFrame, before_ids, after_ids, min_iou: float) -> pd.DataFrame:
    """One-to-one matches: pairs taken by descending IoU (ties: before id, after id), each object once."""
    pairs = pairs[pairs["iou"] >= min_iou]
    pairs = pairs.assign(
        before_id=np.asarray(before_ids, dtype=object)[pairs["b"].to_numpy()],
        after_id=np.asarray(after_ids, dtype=object)[pairs["a"].to_numpy()],
    )
    pairs = pairs.sort_values(["iou", "before_id", "after_id"], ascending=[False, True, True], kind="stable")
    used_b: set[int] = set()
    used_a: set[int] = set()
    chosen = []
    for b, a, iou in zip(pairs["b"].to_numpy(), pairs["a"].to_numpy(), pairs["iou"].to_numpy()):
        if b not in used_b and a not in used_a:
            used_b.add(b)
            used_a.add(a)
            chosen.append((b, a, iou))
    return pd.DataFrame(chosen, columns=["b", "a", "iou"]).astype({"b": int, "a": int, "iou": float})


def changes(
    before: gpd.GeoDataFrame, after: gpd.GeoDataFrame, thresholds: Thresholds = Thresholds()
) -> gpd.GeoDataFrame:
    """Appeared, disappeared and changed objects between two selections of one label (see the module)."""
    matched = match(candidate_pairs(before, after), before["object_id"], after["object_id"], thresholds.min_iou)
    mb, ma = matched["b"].to_numpy(), matched["a"].to_numpy()
    ratio = after["area_m2"].to_numpy()[ma] / np.maximum(before["area_m2"].to_numpy()[mb], 1e-9)
    shape = matched["iou"].to_numpy() < thresholds.changed_iou
    area = np.abs(ratio - 1) > thresholds.area_change
    changed = shape | area
    why = np.where(shape & area, "shape+area", np.where(shape, "shape", "area"))[changed]
    gone = np.setdiff1d(np.arange(len(before)), mb)
    new = np.setdiff1d(np.arange(len(after)), ma)
    parts = [
        _rows("appeared", None, after, None, new),
        _rows("disappeared", before, None, gone, None),
        _rows("changed", before, after, mb[changed], ma[changed], matched["iou"].to_numpy()[changed], why),
    ]
    frame = pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)
    for column in ("before_acquired_at", "after_acquired_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return gpd.GeoDataFrame(frame, geometry="geometry", crs=4326)


def _rows(kind, before, after, b, a, iou=None, why=None) -> gpd.GeoDataFrame:
    """Change rows; the geometry is the after shape (the before one for disappeared objects)."""
    count = len(a) if a is not None else len(b)
    nothing = pd.array([None] * count, dtype="string[pyarrow]")
    no_time = pd.Series(pd.NaT, index=range(count), dtype="datetime64[ms, UTC]")

    def column(frame, rows, name, empty):
        return frame[name].to_numpy()[rows] if frame is not None else empty

    b_area = column(before, b, "area_m2", np.full(count, np.nan))
    a_area = column(after, a, "area_m2", np.full(count, np.nan))
    source, rows = (after, a) if after is not None else (before, b)
    return gpd.GeoDataFrame(
        {
            "change": kind,
            "why": why if why is not None else pd.array([None] * count, dtype="string[pyarrow]"),
            "label": source["label"].to_numpy()[rows] if count else [],
            "before_id": column(before, b, "object_id", nothing),
            "after_id": column(after, a, "object_id", nothing),
            "iou": iou if iou is not None else np.full(count, np.nan),
            "before_area_m2": b_area,
            "after_area_m2": a_area,
            "area_ratio": a_area / b_area,
            "before_acquired_at": column(before, b, "acquired_at", no_time),
            "after_acquired_at": column(after, a, "acquired_at", no_time),
            "before_run_id": column(before, b, "run_id", nothing),
            "after_run_id": column(after, a, "run_id", nothing),
        },
        geometry=source.geometry.to_numpy()[rows] if count else [],
        crs=4326,
    )
