"""Scenes: find the job's rasters, open them, map their bands, and read windows of them.

Discovery and opening read metadata only (plus, for models that need display values from a 16-bit or
float scene, one small overview to compute a percentile stretch). Pixels are read in exactly one place,
:meth:`SceneReader.read`, one window at a time, so memory is bounded by the tile and never by the scene.

A scene's bands may live in one file or in several (a STAC item with one asset per band, possibly at
different resolutions): each band is a :class:`BandSource`, and every read resamples onto the scene's
output grid, which is the finest band's grid or the job's target resolution.

A :class:`Region` (see ``regions.py``) stands where a scene does: a window of its grid is composed from
windows of its source scenes, each read here too.
"""

from __future__ import annotations

import datetime as dt
import glob
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import rasterio
from affine import Affine
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry
from odc.geo.overlap import compute_reproject_roi
from odc.geo.roi import roi_is_empty
from odc.geo.warp import rio_reproject
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window, from_bounds
from rasterio.windows import bounds as window_bounds

from geobatch.access import Access, describe_error, gdal_path, gdal_warnings, is_remote, list_bucket
from geobatch.errors import MissingBand, SceneUnreadable
from geobatch.jobs import BAND_NAMES, JobSpec, SceneSpec, as_utc

log = logging.getLogger(__name__)

InputValues = Literal["physical", "display"]
T = TypeVar("T")

LOCAL_ACCESS = Access()  # defaults: no storage settings, the standard retries

_COLOR_BANDS = {ColorInterp.red: "red", ColorInterp.green: "green", ColorInterp.blue: "blue"}
_STRETCH_PERCENTILES = (2.0, 98.0)
_STRETCH_SAMPLE_PX = 512  # long side of the overview (or sample grid) the stretch is computed from


@dataclass(frozen=True, slots=True)
class BandSource:
    """Where one band's pixels are: a file or URL, the 1-based band index in it, and its value scaling.

    ``scale``/``offset`` turn stored values into physical ones; ``None`` takes them from the file.
    """

    uri: str
    index: int
    scale: float | None = None
    offset: float | None = None


@dataclass(frozen=True, slots=True)
class SceneRef:
    """A scene found by discovery, not yet opened.

    ``bands`` are those the job or STAC metadata named; ``file``, when every band is in one file, is that
    file, whose own metadata (colour interpretation, descriptions) may name the others. ``acquired_at``
    is the scene entry's or the STAC item's time; the file's time tag comes next, then ``default_time``
    (the job's).
    """

    scene_id: str
    uri: str
    acquired_at: dt.datetime | None
    bands: Mapping[str, BandSource]
    file: str | None
    default_time: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class SceneFailure:
    """A scene that could not be used, with the reason in one line."""

    scene_id: str
    uri: str
    reason: str


@dataclass(frozen=True, slots=True)
class ValueMap:
    """Stored values to model input: ``value * gain + offset``, clipped to ``clip`` when given."""

    gain: float = 1.0
    offset: float = 0.0
    clip: tuple[float, float] | None = None

    def apply(self, stored: np.ndarray) -> np.ndarray:
        values = stored.astype(np.float32)
        if (self.gain, self.offset) != (1.0, 0.0):
            values = values * np.float32(self.gain) + np.float32(self.offset)
        return np.clip(values, *self.clip) if self.clip else values


@dataclass(frozen=True, slots=True)
class Scene:
    """An opened scene: its output grid and, for each band the run needs, where it is and how to scale it."""

    scene_id: str
    uri: str
    acquired_at: dt.datetime | None
    geobox: GeoBox
    bands: Mapping[str, BandSource]
    values: Mapping[str, ValueMap]

    @property
    def shape(self) -> tuple[int, int]:
        return self.geobox.shape.yx


@dataclass(frozen=True, slots=True)
class RegionSource:
    """A scene composited into a region, with its grid as the region sees it.

    ``grid`` is the scene's grid, labelled with the region's CRS where PROJ maps one CRS onto the other as
    a no-op (the same projection, the datum merely unnamed), so that such a scene is read, not warped.
    ``footprint`` is its extent in the region's CRS, to pass over it for windows it does not reach.
    """

    scene: Scene
    grid: GeoBox
    footprint: Geometry


@dataclass(frozen=True, slots=True)
class Region:
    """Scenes composited onto one grid; it goes wherever a :class:`Scene` goes (``scene_id``, ``uri``,
    ``acquired_at``, ``geobox``, ``shape``). ``sources`` are in overlap order: the first valid pixel wins."""

    scene_id: str
    uri: str
    acquired_at: dt.datetime | None
    geobox: GeoBox
    sources: tuple[RegionSource, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.geobox.shape.yx

    def reaching(self, window: Window) -> Region:
        """The region with only the sources that reach ``window``: what a tile's work needs to carry."""
        extent = self.geobox[window.toslices()].extent
        return replace(self, sources=tuple(s for s in self.sources if s.footprint.intersects(extent)))


SceneLike = Scene | Region  # what a mosaic is made of: one scene, or a region composed of several


@dataclass(frozen=True, slots=True)
class WindowRead:
    """Pixels of one window: the requested bands as model input and which pixels are valid in all of them."""

    bands: Mapping[str, np.ndarray]
    valid: np.ndarray  # bool, False where any requested band is nodata, masked, alpha 0 or not finite


def discover(spec: JobSpec) -> tuple[list[SceneRef], list[SceneFailure]]:
    """Expand the job's scene entries (paths, globs, URLs, STAC files) into scene references.

    An entry that matches nothing, and a second source with an already used scene id, become failures.
    """
    from geobatch.stac import stac_refs  # pystac only when a job names a STAC file

    refs: dict[str, SceneRef] = {}
    failures: list[SceneFailure] = []
    for entry in spec.scenes:
        found, failed = stac_refs(entry, spec.acquired_at) if entry.is_stac else _file_refs(entry, spec)
        failures += failed
        for ref in found:
            if ref.scene_id in refs and refs[ref.scene_id].uri != ref.uri:
                reason = f"scene id '{ref.scene_id}' is already used by {refs[ref.scene_id].uri}"
                failures.append(SceneFailure(ref.scene_id, ref.uri, reason))
            else:
                refs.setdefault(ref.scene_id, ref)
    return list(refs.values()), failures


def open_scene(
    ref: SceneRef,
    needed_bands: Iterable[str],
    *,
    values: InputValues = "physical",
    resolution: float | None = None,
    access: Access = LOCAL_ACCESS,
) -> Scene:
    """Read a scene's metadata, check it has every band in ``needed_bands``, and fix its output grid.

    ``values`` is what the model takes: ``physical`` (stored values times the band's scale, plus offset)
    or ``display`` (0-255; 8-bit data as is, other types stretched between percentiles of an overview).
    ``resolution`` is a target pixel size in metres. Raises :class:`SceneUnreadable` or
    :class:`MissingBand` with the file and the fix in the message.
    """
    files = {uri: _open_metadata(uri, access) for uri in {s.uri for s in ref.bands.values()} | {ref.file} - {None}}
    bands = {**(_named_bands(files[ref.file]) if ref.file else {}), **ref.bands}
    needed = list(needed_bands)
    missing = [b for b in needed if b not in bands]
    if missing:
        have = ", ".join(f"{name}={source.index}" for name, source in bands.items()) or "none identified"
        raise MissingBand(
            f"scene {ref.uri}: the model needs band(s) {missing} but the scene's known bands are "
            f"[{have}]; map them in the job's 'bands' field"
        )
    bands = {name: bands[name] for name in needed}
    for name, source in bands.items():
        if source.index > files[source.uri].count:
            raise MissingBand(
                f"scene {source.uri}: band '{name}' is mapped to band {source.index} but the file has "
                f"{files[source.uri].count} band(s)"
            )
    grid = _output_grid(ref, [files[s.uri] for s in bands.values()], resolution)
    value_maps = {name: _value_map(files[source.uri], source, values, access) for name, source in bands.items()}
    tagged = next(filter(None, (f.acquired_at for f in files.values())), None)
    acquired_at = ref.acquired_at or tagged or ref.default_time
    return Scene(ref.scene_id, ref.uri, acquired_at, grid, bands, value_maps)


class SceneReader:
    """Reads windows of scenes, keeping each file open between reads.

    One reader belongs to one worker; it is not shared between threads.
    """

    def __init__(self, access: Access = LOCAL_ACCESS) -> None:
        self.access = access
        self._open: dict[str, rasterio.DatasetReader] = {}

    def read(self, scene: SceneLike, window: Window, bands: Sequence[str]) -> WindowRead:
        """Read ``bands`` of ``scene`` inside ``window`` (of its output grid); raises :class:`SceneUnreadable`."""
        if isinstance(scene, Region):
            return self._read_region(scene, window, bands)
        shape = (int(window.height), int(window.width))
        valid = np.ones(shape, bool)
        stored: dict[str, np.ndarray] = {}
        by_file: dict[str, list[str]] = {}
        for name in bands:
            by_file.setdefault(scene.bands[name].uri, []).append(name)
        for uri, names in by_file.items():
            read = partial(
                self._read_file, uri, [scene.bands[name].index for name in names], window, scene.geobox.affine
            )
            doing = f"cannot read window {_describe(window)}"
            data, file_valid = _with_gdal(self.access, uri, read, doing, on_retry=partial(self._close, uri))
            stored.update(zip(names, data))
            valid &= file_valid
        inputs = {name: scene.values[name].apply(stored[name]) for name in bands}
        for array in inputs.values():
            valid &= np.isfinite(array)
        return WindowRead(inputs, valid)

    def _read_region(self, region: Region, window: Window, bands: Sequence[str]) -> WindowRead:
        """A window of the regional grid: each source, in overlap order, fills the pixels still nodata."""
        target = region.geobox[window.toslices()]
        values = {name: np.zeros(target.shape.yx, np.float32) for name in bands}
        valid = np.zeros(target.shape.yx, bool)
        for source in region.reaching(window).sources:
            if valid.all():
                break
            piece = self._read_on_grid(source, target, bands)
            fill = piece.valid & ~valid
            for name in bands:
                values[name][fill] = piece.bands[name][fill]
            valid |= fill
        return WindowRead(values, valid)

    def _read_on_grid(self, source: RegionSource, target: GeoBox, bands: Sequence[str]) -> WindowRead:
        """``source`` over ``target`` (a window of the regional grid), nodata where it does not reach.

        Where the grids differ by whole pixels only (odc-geo's ``paste_ok``) this is a plain window read of
        the source, bit for bit; otherwise the source is read around the window and warped.
        """
        roi = compute_reproject_roi(source.grid, target)
        if roi_is_empty(roi.roi_dst):
            return _nodata(target, bands)
        piece = self.read(source.scene, Window.from_slices(*roi.roi_src), bands)
        if roi.paste_ok and roi.read_shrink == 1:
            return _pasted(piece, target, roi.roi_dst)
        return _warped(piece, source.grid[roi.roi_src], target, shrinking=roi.scale > 1)

    def close(self) -> None:
        for uri in list(self._open):
            self._close(uri)

    def _read_file(self, uri: str, indexes: list[int], window: Window, grid: Affine) -> tuple[np.ndarray, np.ndarray]:
        """Bands ``indexes`` of one file over ``window`` of the output grid, resampled if the grids differ."""
        dataset = self._dataset(uri)
        shape = (len(indexes), int(window.height), int(window.width))
        if dataset.transform == grid:
            source_window, resampling = window, Resampling.nearest
        else:
            source_window = from_bounds(*window_bounds(window, grid), transform=dataset.transform)
            downsampling = source_window.width > window.width
            resampling = Resampling.average if downsampling else Resampling.bilinear
        data = dataset.read(indexes, window=source_window, out_shape=shape, resampling=resampling)
        if all(dataset.mask_flag_enums[i - 1] == [MaskFlags.all_valid] for i in indexes):
            return data, np.ones(shape[1:], bool)
        # Valid where the averaged mask stays 255: for masks and alpha, all source pixels valid; GDAL derives
        # nodata masks at the read's resolution, after its nodata-aware averaging (any source pixel valid).
        masks = dataset.read_masks(indexes, window=source_window, out_shape=shape, resampling=Resampling.average)
        return data, (masks == 255).all(axis=0)

    def _dataset(self, uri: str) -> rasterio.DatasetReader:
        if uri not in self._open:
            self._open[uri] = rasterio.open(gdal_path(uri))
        return self._open[uri]

    def _close(self, uri: str) -> None:
        dataset = self._open.pop(uri, None)
        if dataset is not None:
            dataset.close()


def _nodata(target: GeoBox, bands: Sequence[str]) -> WindowRead:
    return WindowRead({name: np.zeros(target.shape.yx, np.float32) for name in bands}, np.zeros(target.shape.yx, bool))


def _pasted(piece: WindowRead, target: GeoBox, where: tuple[slice, slice]) -> WindowRead:
    """``piece`` placed at ``where`` in an otherwise nodata window of ``target``."""
    placed = _nodata(target, list(piece.bands))
    placed.valid[where] = piece.valid
    for name, band in piece.bands.items():
        placed.bands[name][where] = band
    return placed


def _warped(piece: WindowRead, source: GeoBox, target: GeoBox, shrinking: bool) -> WindowRead:
    """``piece`` (on ``source``) warped onto ``target`` by GDAL.

    Validity is warped with nearest (a mask cannot be interpolated); values with bilinear, or average where
    the source is finer than the target, from valid source pixels only.
    """
    resampling = Resampling.average if shrinking else Resampling.bilinear
    shape = target.shape.yx
    mask = rio_reproject(
        piece.valid.astype(np.uint8), np.zeros(shape, np.uint8), source, target, Resampling.nearest, 0, 0
    )
    valid = mask == 1
    bands = {}
    for name, band in piece.bands.items():
        values = np.where(piece.valid, band, np.float32(np.nan))
        warped = rio_reproject(values, np.full(shape, np.nan, np.float32), source, target, resampling, np.nan, np.nan)
        valid &= np.isfinite(warped)
        bands[name] = np.nan_to_num(warped)
    return WindowRead(bands, valid)


@dataclass(frozen=True, slots=True)
class _FileInfo:
    """What opening a file tells: its grid, band metadata, overviews and time stamp."""

    uri: str
    crs_wkt: str
    transform: Affine
    shape: tuple[int, int]
    count: int
    dtypes: tuple[str, ...]
    colorinterp: tuple[ColorInterp, ...]
    descriptions: tuple[str | None, ...]
    scales: tuple[float, ...]
    offsets: tuple[float, ...]
    overviews: tuple[int, ...]
    acquired_at: dt.datetime | None


def _open_metadata(uri: str, access: Access) -> _FileInfo:
    if not is_remote(uri) and not os.path.exists(uri):
        raise SceneUnreadable(f"scene {uri}: file not found")

    def read() -> _FileInfo:
        with rasterio.open(gdal_path(uri)) as src:
            _check_georeferencing(uri, src)
            return _FileInfo(
                uri,
                src.crs.to_wkt(),
                src.transform,
                src.shape,
                src.count,
                src.dtypes,
                src.colorinterp,
                src.descriptions,
                src.scales,
                src.offsets,
                tuple(src.overviews(1)),
                _tagged_datetime(src),
            )

    return _with_gdal(access, uri, read, "cannot open")


def _with_gdal(
    access: Access, uri: str, operation: Callable[[], T], doing: str, on_retry: Callable[[], None] | None = None
) -> T:
    """``operation`` on ``uri`` with the job's GDAL settings and retries; a failure becomes one line saying
    what was being done and GDAL's reason (:class:`SceneUnreadable`)."""
    try:
        with gdal_warnings() as warnings:
            return access.retrying(uri, operation, on_retry)
    except RasterioError as exc:
        raise SceneUnreadable(f"scene {uri}: {doing}: {describe_error(exc, warnings)}") from None


def _file_refs(entry: SceneSpec, spec: JobSpec) -> tuple[list[SceneRef], list[SceneFailure]]:
    uris = sorted(glob.glob(entry.uri)) if not is_remote(entry.uri) and glob.has_magic(entry.uri) else [entry.uri]
    if entry.uri.startswith("s3://") and (entry.uri.endswith("/") or glob.has_magic(entry.uri)):
        try:  # a bucket prefix or glob: its objects, listed now (a growing archive gets new scenes)
            uris = list_bucket(entry.uri, Access.from_spec(spec.storage))
        except SceneUnreadable as exc:
            return [], [SceneFailure(_scene_id(entry.uri), entry.uri, str(exc))]
    if not uris:
        return [], [SceneFailure(_scene_id(entry.uri), entry.uri, "no file matches this pattern")]
    indexes = {**spec.bands, **entry.bands}
    refs = [
        SceneRef(
            _scene_id(uri),
            uri,
            entry.acquired_at or (_date_in_name(uri) if entry.date_from_name else None),
            {b: BandSource(uri, i) for b, i in indexes.items()},
            uri,
            spec.acquired_at,
        )
        for uri in uris
    ]
    return refs, []


_NAME_DATE = re.compile(r"(?<!\d)((?:19|20)\d\d)-?(0[1-9]|1[0-2])-?(0[1-9]|[12]\d|3[01])(?!\d)")


def _date_in_name(uri: str) -> dt.datetime | None:
    """The last date ``YYYYMMDD`` or ``YYYY-MM-DD`` in the file name (NAIP: ``m_..._20100629.tif``), UTC."""
    for match in reversed(list(_NAME_DATE.finditer(uri.rstrip("/").rsplit("/", 1)[-1]))):
        try:
            return dt.datetime(*(int(part) for part in match.groups()), tzinfo=dt.UTC)
        except ValueError:  # 20230231
            continue
    return None


def _scene_id(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return Path(name).stem or name


def _check_georeferencing(uri: str, src: rasterio.DatasetReader) -> None:
    problems = []
    if src.transform.b != 0 or src.transform.d != 0:
        problems.append("has a rotated or sheared geotransform (warp it north-up first, e.g. gdalwarp)")
    if src.crs is None:
        problems.append("has no CRS (assign one, e.g. gdal_edit.py -a_srs, and rerun)")
    if problems:
        raise SceneUnreadable(f"scene {uri}: {'; '.join(problems)}")


def _named_bands(info: _FileInfo) -> dict[str, BandSource]:
    """Bands named by the file itself: colour interpretation, else band descriptions ('nir', 'swir1'...)."""
    found: dict[str, BandSource] = {}
    for index, (interp, description) in enumerate(zip(info.colorinterp, info.descriptions), start=1):
        name = _COLOR_BANDS.get(interp) or (description or "").strip().lower()
        if name in BAND_NAMES:
            found.setdefault(name, BandSource(info.uri, index))
    return found


def _output_grid(ref: SceneRef, files: list[_FileInfo], resolution: float | None) -> GeoBox:
    """The finest band's grid, or that grid resampled to ``resolution`` metres (whole pixels inside it)."""
    if len({f.crs_wkt for f in files}) > 1:
        raise SceneUnreadable(f"scene {ref.uri}: its bands are in different CRSs; warp them to one first")
    finest = min(files, key=lambda f: abs(f.transform.a))
    grid = GeoBox(finest.shape, finest.transform, finest.crs_wkt)
    if resolution is None:
        return grid
    step_x, step_y = _metres_to_crs_units(grid, resolution)
    factor_x, factor_y = step_x / abs(grid.affine.a), step_y / abs(grid.affine.e)
    shape = (math.floor(grid.height / factor_y), math.floor(grid.width / factor_x))
    if min(shape) == 0:
        raise SceneUnreadable(f"scene {ref.uri}: target resolution {resolution} m is coarser than the whole scene")
    return GeoBox(shape, grid.affine @ Affine.scale(factor_x, factor_y), grid.crs)


def _metres_to_crs_units(grid: GeoBox, metres: float) -> tuple[float, float]:
    """Pixel size in the grid's CRS units; for degrees, measured at the scene's centre latitude."""
    if grid.crs.geographic:
        latitude = grid.extent.centroid.coords[0][1]
        return metres / (111_320 * math.cos(math.radians(latitude))), metres / 111_320
    factor = grid.crs.proj.axis_info[0].unit_conversion_factor  # metres per CRS unit
    return metres / factor, metres / factor


def _value_map(info: _FileInfo, source: BandSource, values: InputValues, access: Access) -> ValueMap:
    if values == "physical":
        scale = info.scales[source.index - 1] if source.scale is None else source.scale
        offset = info.offsets[source.index - 1] if source.offset is None else source.offset
        return ValueMap(scale, offset)
    if info.dtypes[source.index - 1] == "uint8":
        return ValueMap()
    low, high = _stretch_limits(info, source.index, access)
    return ValueMap(255 / (high - low), -255 * low / (high - low), (0.0, 255.0))


def _stretch_limits(info: _FileInfo, index: int, access: Access) -> tuple[float, float]:
    """Percentiles of one band from an overview (or, without overviews, 16 storage blocks spread over it)."""
    height, width = info.shape
    usable = [f for f in info.overviews if f <= max(1, max(height, width) // _STRETCH_SAMPLE_PX)]

    def read() -> np.ndarray:
        with rasterio.open(gdal_path(info.uri)) as src:
            if usable:  # GDAL serves a read at an overview's size from that overview
                level = max(usable)
                return src.read(index, out_shape=(height // level, width // level), masked=True).compressed()
            windows = _sample_blocks(src, index)
            return np.concatenate([src.read(index, window=w, masked=True).compressed() for w in windows])

    sample = _with_gdal(access, info.uri, read, "cannot read an overview for the value stretch")
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, _STRETCH_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def _sample_blocks(src: rasterio.DatasetReader, index: int, per_side: int = 4) -> list[Window]:
    """A spread of whole storage blocks (at most ``per_side``² of them): each costs one block read."""
    block_rows, block_cols = (math.ceil(n / b) for n, b in zip(src.shape, src.block_shapes[index - 1]))
    rows = sorted({int(r) for r in np.linspace(0, block_rows - 1, per_side)})
    cols = sorted({int(c) for c in np.linspace(0, block_cols - 1, per_side)})
    return [src.block_window(index, row, col) for row in rows for col in cols]


def _tagged_datetime(src: rasterio.DatasetReader) -> dt.datetime | None:
    stamp = src.tags().get("TIFFTAG_DATETIME")
    try:
        return as_utc(dt.datetime.strptime(stamp, "%Y:%m:%d %H:%M:%S")) if stamp else None
    except ValueError:
        log.warning("ignoring unparsable TIFFTAG_DATETIME %r", stamp)
        return None


def _describe(window: Window) -> str:
    return f"(col {window.col_off}, row {window.row_off}, {window.width}x{window.height})"
