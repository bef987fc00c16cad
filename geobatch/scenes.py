"""Scenes: find the job's rasters, open them, map their bands, and read windows of them.

Discovery and opening read metadata only. Pixels are read in exactly one place, :meth:`SceneReader.read`,
one window at a time, so memory is bounded by the tile and never by the scene.
"""

from __future__ import annotations

import datetime as dt
import glob
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from odc.geo.geobox import GeoBox
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError
from rasterio.windows import Window

from geobatch.errors import MissingBand, SceneUnreadable
from geobatch.jobs import BAND_NAMES, JobSpec, as_utc

log = logging.getLogger(__name__)

_COLOR_BANDS = {ColorInterp.red: "red", ColorInterp.green: "green", ColorInterp.blue: "blue"}


@dataclass(frozen=True, slots=True)
class SceneRef:
    """A scene found by discovery, not yet opened."""

    scene_id: str
    uri: str
    acquired_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class SceneFailure:
    """A scene that could not be used, with the reason in one line."""

    scene_id: str
    uri: str
    reason: str


@dataclass(frozen=True, slots=True)
class Scene:
    """An opened scene: its grid, bands and nodata. Holds no pixels."""

    scene_id: str
    uri: str
    acquired_at: dt.datetime | None
    geobox: GeoBox
    band_map: Mapping[str, int]  # band name -> 1-based band index in the file
    dtype: str
    nodata: float | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.geobox.shape.yx


@dataclass(frozen=True, slots=True)
class WindowRead:
    """Pixels of one window: the requested bands and which pixels are valid in all of them."""

    bands: Mapping[str, np.ndarray]
    valid: np.ndarray  # bool, False where any requested band is nodata or masked


def discover(spec: JobSpec) -> tuple[list[SceneRef], list[SceneFailure]]:
    """Expand the job's scene entries (paths, globs, URLs) into scene references.

    An entry that matches nothing, and a second file with an already used scene id, become failures.
    """
    refs: dict[str, SceneRef] = {}
    failures: list[SceneFailure] = []
    for entry in spec.scenes:
        uris = _expand(entry.uri)
        if not uris:
            failures.append(SceneFailure(_scene_id(entry.uri), entry.uri, "no file matches this pattern"))
        for uri in uris:
            scene_id = _scene_id(uri)
            if scene_id in refs and refs[scene_id].uri != uri:
                reason = f"scene id '{scene_id}' is already used by {refs[scene_id].uri}"
                failures.append(SceneFailure(scene_id, uri, reason))
            elif scene_id not in refs:
                refs[scene_id] = SceneRef(scene_id, uri, entry.acquired_at or spec.acquired_at)
    return list(refs.values()), failures


def open_scene(ref: SceneRef, band_overrides: Mapping[str, int], needed_bands: Iterable[str]) -> Scene:
    """Read a scene's metadata and check that it has every band in ``needed_bands``.

    Raises :class:`SceneUnreadable` or :class:`MissingBand` with the file and the fix in the message.
    """
    if "://" not in ref.uri and not os.path.exists(ref.uri):
        raise SceneUnreadable(f"scene {ref.uri}: file not found")
    try:
        with rasterio.open(ref.uri) as src:
            _check_georeferencing(ref, src)
            band_map = _band_map(ref, src, band_overrides)
            acquired_at = ref.acquired_at or _tagged_datetime(src)
            geobox = GeoBox(src.shape, src.transform, src.crs.to_wkt())
            dtype, nodata = src.dtypes[0], src.nodata
    except RasterioError as exc:
        raise SceneUnreadable(f"scene {ref.uri}: cannot open: {exc}") from None
    missing = [b for b in needed_bands if b not in band_map]
    if missing:
        have = ", ".join(f"{name}={index}" for name, index in band_map.items()) or "none identified"
        raise MissingBand(
            f"scene {ref.uri}: the model needs band(s) {missing} but the file's known bands are "
            f"[{have}]; map them in the job's 'bands' field"
        )
    return Scene(ref.scene_id, ref.uri, acquired_at, geobox, band_map, dtype, nodata)


class SceneReader:
    """Reads windows of scenes, keeping each scene's file open between reads.

    One reader belongs to one worker; it is not shared between threads.
    """

    def __init__(self) -> None:
        self._open: dict[str, rasterio.DatasetReader] = {}

    def read(self, scene: Scene, window: Window, bands: Sequence[str]) -> WindowRead:
        """Read ``bands`` of ``scene`` inside ``window``; raises :class:`SceneUnreadable` on failure."""
        indexes = [scene.band_map[b] for b in bands]
        try:
            data = self._dataset(scene).read(indexes, window=window, masked=True)
        except RasterioError as exc:
            detail = f"{exc} ({exc.__cause__})" if exc.__cause__ else str(exc)  # GDAL's reason is the cause
            raise SceneUnreadable(f"scene {scene.uri}: cannot read window {_describe(window)}: {detail}") from None
        valid = ~np.ma.getmaskarray(data).any(axis=0)
        return WindowRead(dict(zip(bands, np.ma.getdata(data))), valid)

    def close(self) -> None:
        for dataset in self._open.values():
            dataset.close()
        self._open.clear()

    def _dataset(self, scene: Scene) -> rasterio.DatasetReader:
        if scene.uri not in self._open:
            self._open[scene.uri] = rasterio.open(scene.uri)
        return self._open[scene.uri]


def _expand(uri: str) -> list[str]:
    if "://" not in uri and glob.has_magic(uri):
        return sorted(glob.glob(uri))
    return [uri]


def _scene_id(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return Path(name).stem or name


def _check_georeferencing(ref: SceneRef, src: rasterio.DatasetReader) -> None:
    if src.crs is None:
        raise SceneUnreadable(f"scene {ref.uri}: has no CRS; assign one (e.g. gdal_edit.py -a_srs) and rerun")
    if src.transform.b != 0 or src.transform.d != 0:
        raise SceneUnreadable(f"scene {ref.uri}: rotated or sheared geotransform is not supported; warp it first")


def _band_map(ref: SceneRef, src: rasterio.DatasetReader, overrides: Mapping[str, int]) -> dict[str, int]:
    """Bands named by the job win; otherwise colour interpretation and band descriptions name them."""
    found: dict[str, int] = {}
    for index, (interp, description) in enumerate(zip(src.colorinterp, src.descriptions), start=1):
        name = _COLOR_BANDS.get(interp) or (description or "").strip().lower()
        if name in BAND_NAMES:
            found.setdefault(name, index)
    for name, index in overrides.items():
        if index > src.count:
            raise MissingBand(
                f"scene {ref.uri}: job field 'bands.{name}' is {index} but the file has {src.count} band(s)"
            )
    return {**found, **overrides}


def _tagged_datetime(src: rasterio.DatasetReader) -> dt.datetime | None:
    stamp = src.tags().get("TIFFTAG_DATETIME")
    try:
        return as_utc(dt.datetime.strptime(stamp, "%Y:%m:%d %H:%M:%S")) if stamp else None
    except ValueError:
        log.warning("ignoring unparsable TIFFTAG_DATETIME %r", stamp)
        return None


def _describe(window: Window) -> str:
    return f"(col {window.col_off}, row {window.row_off}, {window.width}x{window.height})"
