"""STAC discovery: a STAC ItemCollection (or the saved result of a STAC API search, or one Item) to scenes.

Each item is one scene, named by its id and dated by its ``datetime``. Its bands come from the job entry
(an ``asset`` to read, band indexes in it, or one asset key per band) or else from the assets' band
metadata: ``eo:bands`` (STAC 1.0) or ``bands`` with ``eo:common_name`` (STAC 1.1), whose common names
(``red``, ``nir08``, ``swir16``...) are mapped to the job's band names. ``raster:bands`` scale and offset,
when present, turn stored values into physical ones.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from typing import Any

import pystac

from geobatch.jobs import SceneSpec, as_utc
from geobatch.scenes import BandSource, SceneFailure, SceneRef

# STAC common names to our band names; an exact name wins over the narrow-band variant (nir over nir08).
_COMMON_NAMES = {
    "red": "red",
    "green": "green",
    "blue": "blue",
    "nir": "nir",
    "nir08": "nir",
    "swir16": "swir1",
    "swir22": "swir2",
}
_PREFERENCE = list(_COMMON_NAMES)
_RASTER_TYPES = ("image/tiff", "image/jp2", "application/x-hdf")


def stac_refs(entry: SceneSpec, default_time: dt.datetime | None) -> tuple[list[SceneRef], list[SceneFailure]]:
    """Scene references for every item in the STAC file ``entry.uri``; unusable items become failures."""
    try:
        items = _load_items(entry.uri)
    except (OSError, ValueError, KeyError, TypeError, pystac.STACError) as exc:
        reason = f"not a readable STAC ItemCollection or Item: {' '.join(str(exc).split())}"
        return [], [SceneFailure(entry.uri.rsplit("/", 1)[-1], entry.uri, reason)]
    refs, failures = [], []
    for item in items:
        scene_id = re.sub(r"[^\w.-]+", "_", item.id)
        try:
            bands = _item_bands(item, entry)
        except ValueError as exc:
            failures.append(SceneFailure(scene_id, f"{entry.uri}#{item.id}", str(exc)))
            continue
        files = {source.uri for source in bands.values()}
        single = files.pop() if len(files) == 1 else None
        when = entry.acquired_at or _item_time(item)
        refs.append(SceneRef(scene_id, single or f"{entry.uri}#{item.id}", when, bands, single, default_time))
    return refs, failures


def _load_items(uri: str) -> list[pystac.Item]:
    """Items of a local STAC file, with asset hrefs made absolute against the file's location."""
    with open(uri) as handle:
        document = json.load(handle)
    if document.get("type") == "Feature":
        items = [pystac.Item.from_dict(document)]
    else:  # an ItemCollection; a saved STAC API search is one too
        items = list(pystac.ItemCollection.from_dict(document).items)
    for asset in (asset for item in items for asset in item.assets.values()):
        if "://" not in asset.href:
            asset.href = pystac.utils.make_absolute_href(asset.href, uri)
    return items


def _item_bands(item: pystac.Item, entry: SceneSpec) -> dict[str, BandSource]:
    """Bands of one item: the entry's asset keys and indexes first, then the assets' common names."""
    if entry.asset:
        asset = _asset(item, entry.asset)
        bands = _described_bands(entry.asset, asset)
        bands |= {name: BandSource(asset.href, index) for name, index in entry.bands.items()}
        return bands
    bands: dict[str, BandSource] = {}
    for key, asset in _data_assets(item):
        for name, source in _described_bands(key, asset).items():
            bands.setdefault(name, source)
    named = {name: BandSource(_asset(item, key).href, 1) for name, key in entry.bands.items()}
    return bands | named


def _asset(item: pystac.Item, key: str) -> pystac.Asset:
    if key not in item.assets:
        raise ValueError(f"item '{item.id}' has no asset '{key}'; it has {sorted(item.assets)}")
    return item.assets[key]


def _data_assets(item: pystac.Item) -> list[tuple[str, pystac.Asset]]:
    """Raster assets that hold data (not thumbnails or the 8-bit 'visual' rendering), in listing order."""

    def is_data(asset: pystac.Asset) -> bool:
        raster = asset.media_type is None or asset.media_type.startswith(_RASTER_TYPES)
        return raster and (not asset.roles or "data" in asset.roles)

    return [(key, asset) for key, asset in item.assets.items() if is_data(asset)]


def _described_bands(key: str, asset: pystac.Asset) -> dict[str, BandSource]:
    """Bands that an asset's metadata names, by our band names, with scale and offset when given."""
    fields = asset.extra_fields
    described: list[Mapping[str, Any]] = fields.get("bands") or fields.get("eo:bands") or []
    raster = fields.get("raster:bands") or [{}] * len(described)
    found: dict[str, tuple[int, BandSource]] = {}
    for index, (band, scaling) in enumerate(zip(described, raster), start=1):
        common = band.get("eo:common_name") or band.get("common_name")
        name = _COMMON_NAMES.get(common)
        if name is None:
            continue
        rank = _PREFERENCE.index(common)
        scale, offset = band.get("scale", scaling.get("scale")), band.get("offset", scaling.get("offset"))
        source = BandSource(asset.href, index, scale, offset)
        if name not in found or rank < found[name][0]:
            found[name] = (rank, source)
    return {name: source for name, (_, source) in found.items()}


def _item_time(item: pystac.Item) -> dt.datetime | None:
    when = item.datetime or item.common_metadata.start_datetime
    return as_utc(when) if when else None
