"""Segment Anything (``sam``): class-agnostic objects over whole scenes, or masks for existing vector features.

Weights: an official checkpoint (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``)
from a local path, loaded with ``weights_only=True`` into transformers' ``SamModel`` (``sam_checkpoint``;
no torchvision). Two modes:

- ``everything``: automatic mask generation per tile (``sam_masks``): a grid of point prompts, the
  predicted-IoU and stability filters, NMS within the tile. Instances cut by tile seams are merged by
  the stitching stage like any instance model's.
- ``prompts``: one mask per feature of a vector file (any CRS), prompted by its box or a point inside it.
  Every tile whose read window the feature reaches answers it; the views carry the feature's id, and the
  stitching stage merges views by that id (not by overlap), so a feature gives exactly one object, with
  its id and properties in the catalog. Features outside every scene, and features inside that got no
  object (an empty mask), are reported by the run.

Each tile is encoded once (a batch of tiles at once: ``batch_size``) and the embedding serves every
prompt of the tile; the decoder takes ``points_per_batch`` prompts at a time. Instances: score = the
predicted IoU, ``attributes = {"stability_score": ...}`` (plus ``"feature": {...}`` in ``prompts`` mode).
The job's single prompt names the objects' label (e.g. ``{text: objects, label: object}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from odc.geo.geobox import GeoBox
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from geobatch.errors import JobSpecError, UnsupportedPrompt
from geobatch.models.base import Instance, Prompt, TileInput, TileResult
from geobatch.models.sam_masks import (
    EverythingSettings,
    mask_boxes,
    non_maximum_suppression,
    point_grid,
    stability_scores,
)
from geobatch.prompt_features import PlacedPrompt, PromptFeatures

PIXEL_MEAN = (123.675, 116.28, 103.53)  # the official normalisation, RGB in 0-255
PIXEL_STD = (58.395, 57.12, 57.375)
Fraction = Annotated[float, Field(ge=0, le=1)]


class SamOptions(BaseModel):
    """The ``model.options`` of a ``sam`` job; see docs/models.md."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: Path
    mode: Literal["everything", "prompts"] = "everything"
    prompts_file: Path | None = None
    prompt_kind: Literal["box", "point"] = "box"
    id_field: str = "id"
    device: str = "auto"  # "auto": the GPU when there is one (a Ray GPU actor), else the CPU
    batch_size: Annotated[int, Field(gt=0, le=256)] | None = None  # tiles encoded together; default 4 on GPU, 1 on CPU
    mask_threshold: float = 0.0
    points_per_side: Annotated[int, Field(gt=0, le=256)] = 32
    points_per_batch: Annotated[int, Field(gt=0, le=4096)] = 64
    pred_iou_thresh: Fraction = 0.88
    stability_score_thresh: Fraction = 0.95
    stability_score_offset: Annotated[float, Field(ge=0)] = 1.0
    box_nms_thresh: Fraction = 0.7

    def everything(self) -> EverythingSettings:
        names = EverythingSettings.__dataclass_fields__
        return EverythingSettings(**{name: getattr(self, name) for name in names})


class SegmentAnything:
    """The ``sam`` backend (see the module docstring); ``options`` are :class:`SamOptions` fields.

    Raises :class:`JobSpecError` (one line naming the option) for bad options, an unreadable checkpoint or
    prompts file.
    """

    name = "sam"
    input_values = "display"
    objects = "instances"

    def __init__(self, **options: Any) -> None:
        from geobatch.models.sam_checkpoint import CheckpointError, load_sam

        self.options = _validated(options)
        self.device = _device(self.options.device)
        try:
            self.sam, self.architecture = load_sam(self.options.checkpoint, self.device)
        except CheckpointError as exc:
            raise JobSpecError(f"model option 'checkpoint': {exc}") from None
        self.batch_size = self.options.batch_size or (1 if self.device == "cpu" else 4)
        self.prompt_features = None
        if self.options.mode == "prompts":
            opts = self.options
            self.prompt_features = PromptFeatures(opts.prompts_file, opts.id_field, opts.prompt_kind, "prompts_file")

    def required_bands(self, prompts: Sequence[Prompt]) -> tuple[str, ...]:
        if len(prompts) != 1 or prompts[0].kind != "class":
            raise UnsupportedPrompt(
                "'sam' takes exactly one prompt of kind 'class', whose label names its objects (e.g. 'object')"
            )
        return ("red", "green", "blue")

    @property
    def prompt_ids(self) -> tuple[str, ...]:
        """Every prompt feature's id (``prompts`` mode), for the run to report those that got no object."""
        return tuple(f.id for f in self.prompt_features.features) if self.prompt_features else ()

    def prompts_outside(self, grids: Sequence[GeoBox]) -> list[str]:
        """Ids of the prompt features (``prompts`` mode) that reach none of the scene ``grids``."""
        return self.prompt_features.outside(grids) if self.prompt_features else []

    def __call__(self, tile: TileInput, prompts: Sequence[Prompt]) -> TileResult:
        return self.predict_batch([tile], prompts)[0]

    def predict_batch(self, tiles: Sequence[TileInput], prompts: Sequence[Prompt]) -> list[TileResult]:
        """Encode the tiles in one pass, then decode each tile's prompts against its own embedding."""
        import torch

        (prompt,) = prompts
        with torch.inference_mode():
            images = torch.stack([self._image(tile) for tile in tiles]).to(self.device)
            embeddings = self.sam.get_image_embeddings(images)
            answers = [
                self._instances(tile, embedding[None], prompt.text) for tile, embedding in zip(tiles, embeddings)
            ]
        return [TileResult(tile.tile.tile_id, {prompt.label: found}) for tile, found in zip(tiles, answers)]

    def _image(self, tile: TileInput):
        """The tile as the encoder takes it: RGB normalised, longest side resized to the input size, padded.

        Invalid pixels are set to the mean (0 once normalised), so nodata looks like the padding.
        """
        import torch
        import torch.nn.functional as F

        size = self.architecture.image_size
        rgb = torch.from_numpy(np.stack([tile.bands[b] for b in ("red", "green", "blue")]).astype(np.float32))
        mean, std = torch.tensor(PIXEL_MEAN)[:, None, None], torch.tensor(PIXEL_STD)[:, None, None]
        normalised = torch.where(torch.from_numpy(tile.valid), (rgb - mean) / std, 0.0)
        height, width = _resized(tile.valid.shape, size)
        resized = F.interpolate(normalised[None], (height, width), mode="bilinear", align_corners=False, antialias=True)
        return F.pad(resized[0], (0, size - width, 0, size - height))

    def _instances(self, tile: TileInput, embedding, phrase: str) -> list[Instance]:
        if self.options.mode == "everything":
            return self._everything(tile, embedding, phrase)
        return self._prompted(tile, embedding, phrase)

    def _everything(self, tile: TileInput, embedding, phrase: str) -> list[Instance]:
        """Automatic mask generation over the tile: grid points, filters, NMS (see ``sam_masks``)."""
        import torch

        settings = self.options.everything()
        height, width = tile.valid.shape
        points = point_grid(settings.points_per_side) * np.array([width, height])
        valid = torch.from_numpy(tile.valid).to(self.device)
        masks, scores, stabilities = [], [], []
        for start in range(0, len(points), settings.points_per_batch):
            batch = points[start : start + settings.points_per_batch]
            logits, iou = self._decode(embedding, tile.valid.shape, points=batch, multimask=True)
            logits, iou = logits.flatten(0, 1), iou.flatten()
            stability = stability_scores(logits, self.options.mask_threshold, settings.stability_score_offset)
            mask = (logits > self.options.mask_threshold) & valid
            keep = (iou > settings.pred_iou_thresh) & (stability >= settings.stability_score_thresh)
            keep &= mask.flatten(1).any(dim=1)
            masks.append(mask[keep])
            scores.append(iou[keep])
            stabilities.append(stability[keep])
        masks, scores, stabilities = torch.cat(masks), torch.cat(scores), torch.cat(stabilities)
        if not len(masks):
            return []
        kept = non_maximum_suppression(mask_boxes(masks), scores, settings.box_nms_thresh)
        return [
            Instance(masks[i].cpu().numpy(), float(scores[i]), phrase, attributes=_measures(stabilities[i]))
            for i in kept.tolist()
        ]

    def _prompted(self, tile: TileInput, embedding, phrase: str) -> list[Instance]:
        """One mask per prompt feature reaching the tile (points: the best of three by predicted IoU)."""
        import torch

        if tile.grid is None:
            raise ValueError(f"tile {tile.tile.tile_id} came without its grid; 'prompts' mode needs it")
        placed = self.prompt_features.in_window(tile.grid)
        valid = torch.from_numpy(tile.valid).to(self.device)
        found = []
        step = self.options.points_per_batch
        for chunk in (placed[i : i + step] for i in range(0, len(placed), step)):
            if self.options.prompt_kind == "box":
                logits, iou = self._decode(embedding, tile.valid.shape, boxes=np.array([p.box for p in chunk]))
                logits, iou = logits[:, 0], iou[:, 0]
            else:
                points = np.array([p.point for p in chunk])
                logits, iou = self._decode(embedding, tile.valid.shape, points=points, multimask=True)
                best = iou.argmax(dim=1)
                picked = torch.arange(len(chunk), device=iou.device)
                logits, iou = logits[picked, best], iou[picked, best]
            offset = self.options.stability_score_offset
            stability = stability_scores(logits, self.options.mask_threshold, offset)
            masks = (logits > self.options.mask_threshold) & valid
            for prompt, mask, score, stable in zip(chunk, masks, iou.tolist(), stability):
                if mask.any():  # an empty answer has nothing to stage; the feature then has no object
                    found.append(_prompted_instance(prompt, mask.cpu().numpy(), score, phrase, stable))
        return found

    def _decode(self, embedding, shape: tuple[int, int], points=None, boxes=None, multimask: bool = False):
        """Mask logits at tile size ``(n, masks, h, w)`` and predicted IoUs ``(n, masks)`` for n prompts.

        ``points`` (n, 2) as (x, y) or ``boxes`` (n, 4) as (x0, y0, x1, y1), in tile pixels.
        """
        import torch
        import torch.nn.functional as F

        size = self.architecture.image_size
        height, width = _resized(shape, size)
        scale = np.array([width / shape[1], height / shape[0]])
        inputs = {}
        if points is not None:
            coords = torch.as_tensor(points * scale, dtype=torch.float32, device=self.device)
            inputs = {"input_points": coords[None, :, None], "input_labels": torch.ones_like(coords[None, :, :1])}
        if boxes is not None:
            coords = torch.as_tensor(boxes * np.tile(scale, 2), dtype=torch.float32, device=self.device)
            inputs = {"input_boxes": coords[None]}
        out = self.sam(image_embeddings=embedding, multimask_output=multimask, **inputs)
        low = out.pred_masks[0]  # (n, masks, 256, 256) over the padded input
        n, k = low.shape[:2]
        logits = F.interpolate(low.flatten(0, 1)[:, None], (size, size), mode="bilinear", align_corners=False)
        logits = F.interpolate(logits[:, :, :height, :width], shape, mode="bilinear", align_corners=False)
        return logits.reshape(n, k, *shape), out.iou_scores[0]


def _validated(options: dict[str, Any]) -> SamOptions:
    try:
        parsed = SamOptions.model_validate(options)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(options)"
        raise JobSpecError(f"model option '{field}': {error['msg']}") from None
    if parsed.mode == "prompts" and parsed.prompts_file is None:
        raise JobSpecError("model option 'prompts_file': required when mode is 'prompts'")
    if parsed.mode == "everything" and parsed.prompts_file is not None:
        raise JobSpecError("model option 'prompts_file': only used with mode 'prompts'")
    return parsed


def _device(option: str) -> str:
    """The torch device for the ``device`` option: ``auto`` is ``cuda`` where PyTorch sees a GPU, else ``cpu``."""
    import torch

    if option == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return option


def _resized(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """The (height, width) of an image of ``shape`` with its longest side resized to ``size`` (rounded)."""
    scale = size / max(shape)
    return int(shape[0] * scale + 0.5), int(shape[1] * scale + 0.5)


def _measures(stability) -> dict[str, float]:
    return {"stability_score": round(float(stability), 6)}


def _prompted_instance(prompt: PlacedPrompt, mask: np.ndarray, score: float, phrase: str, stability) -> Instance:
    attributes = {**_measures(stability), "feature": dict(prompt.feature.properties)}
    return Instance(mask, score, phrase, prompt_id=prompt.feature.id, attributes=attributes)


def describe_weights(weights: str | Path | None) -> str:
    """One line for ``geobatch models``: whether ``weights`` (a checkpoint, or a folder of them) loads."""
    from geobatch.models.sam_checkpoint import CheckpointError, load_sam

    if weights is None:
        return "needs weights: model: {name: sam, options: {checkpoint: FILE.pth}} (check one with --weights FILE)"
    path = Path(weights)
    files = sorted(path.glob("sam_vit_*.pth")) if path.is_dir() else [path]
    if not files:
        return f"missing: no sam_vit_*.pth in {path}"
    try:
        return "present: " + ", ".join(f"{f.name} ({load_sam(f)[1].name})" for f in files)
    except CheckpointError as exc:
        return f"missing: {exc}"
