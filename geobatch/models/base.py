"""The model contract: ``TileInput`` in, ``TileResult`` out, and a lazy registry of backends by name.

A backend loads its weights in ``__init__`` and infers in ``__call__``; it declares what it needs from a
scene as data (``required_bands``) so that a scene lacking a band is rejected before any pixel is read.
Backends are imported only when first asked for, so heavy dependencies stay optional.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from geobatch.errors import UnknownModel
from geobatch.tiling import Tile

if TYPE_CHECKING:  # annotations only: the workers that stitch and vectorise import this module too
    from odc.geo.geobox import GeoBox

    from geobatch.scenes import InputValues

MODELS: dict[str, str] = {
    "spectral": "geobatch.models.spectral:Spectral",
    "fixed-cost": "geobatch.models.synthetic:FixedCost",
    "synthetic-instances": "geobatch.models.synthetic:SyntheticInstances",
    "sam": "geobatch.models.sam:SegmentAnything",
    "geopixel": "geobatch.models.geopixel.backend:GeoPixelSegmenter",
}

ObjectKind = Literal["components", "instances"]


@dataclass(frozen=True, slots=True)
class Prompt:
    """What to find: the text, how to answer it, and the short label used in outputs."""

    text: str
    kind: str  # "class" (a fixed class), "referring" (one expression) or "gcg" (grounded caption)
    label: str


@dataclass(frozen=True, slots=True)
class Instance:
    """One answer to a prompt, over the tile's read window."""

    mask: np.ndarray  # bool, read-window shape
    score: float
    phrase: str
    score_map: np.ndarray | None = None  # float32 per-pixel confidence, for pixel-wise models
    prompt_id: str | None = None  # the vector feature that prompted it: views with one id are one object
    attributes: Mapping[str, Any] | None = None  # JSON-ready facts for the catalog (model measures, feature)


@dataclass(frozen=True, slots=True)
class TileInput:
    """The pixels of one tile's read window as float32, by band name, and which of them are valid."""

    tile: Tile
    bands: Mapping[str, np.ndarray]
    valid: np.ndarray  # bool; invalid pixels must never be labelled
    grid: GeoBox | None = None  # the read window's CRS, transform and shape, for models placing vector data


@dataclass(frozen=True, slots=True)
class TileResult:
    """A model's answers for one tile: instances per prompt label, and an optional caption."""

    tile_id: str
    instances: Mapping[str, list[Instance]]
    caption: str | None = None


@runtime_checkable
class Segmenter(Protocol):
    """What every backend provides.

    Optional: ``batch_size`` (tiles per call it wants, default 1), ``device`` (what it runs on, default
    "cpu"), ``predict_batch(tiles, prompts) -> list[TileResult]`` for backends that batch on a GPU, and
    ``objects`` (:data:`ObjectKind`, see :func:`objects_of`): what the catalog's objects are.
    ``"components"`` (the default): the instances of one tile are a per-pixel labelling, and objects are
    the connected components of each label across the whole mosaic (``vectorize``). ``"instances"``: each
    instance is an object of its own; instances may overlap and touch, and the partial views of one
    instance on neighbouring tiles are matched and merged into one object (``instances``).
    Backends prompted by vector features also provide ``prompt_ids`` (every feature's id) and
    ``prompts_outside(grids) -> list[str]`` (those reaching none of the scenes' grids): the run reports
    the features outside every scene and those inside that got no object.
    """

    name: str
    input_values: InputValues  # what band values it takes: "physical" (scaled) or "display" (0-255)

    def required_bands(self, prompts: Sequence[Prompt]) -> tuple[str, ...]:
        """Band names needed to answer ``prompts``; raises ``UnsupportedPrompt`` for one it cannot."""

    def __call__(self, tile: TileInput, prompts: Sequence[Prompt]) -> TileResult:
        """Answer every prompt on one tile."""


def objects_of(model: Segmenter) -> ObjectKind:
    """What ``model``'s objects are: its ``objects`` attribute, ``"components"`` if it has none."""
    return getattr(model, "objects", "components")


def backend_class(name: str) -> type:
    """The backend class registered as ``name``, imported on first use."""
    if name not in MODELS:
        raise UnknownModel(f"unknown model '{name}'; choose from {sorted(MODELS)}")
    module_name, class_name = MODELS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_model(name: str, options: Mapping[str, Any] | None = None) -> Segmenter:
    """Instantiate the backend registered as ``name`` with ``options``."""
    return backend_class(name)(**dict(options or {}))
