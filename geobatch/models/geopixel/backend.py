"""The ``geopixel`` backend: GeoPixel answering prompts on tiles, one instance per ``[SEG]`` mask.

``model: {name: geopixel, weights: /path/to/GeoPixel-7B}`` in a job. The folder is checked when the
backend is made (config, tokenizer, weight files, every prompt fits the token budget), so a bad folder
or prompt fails the job before anything is written; the weights themselves are loaded on the first
batch. The pipeline makes one backend in the driver only to ask for bands and object kind, and one per
inference actor; loading 15 GB in the driver would double the load time and the memory for nothing.

Per tile: the red, green and blue display values (0-255) become an RGB image; invalid pixels are shown
black (what nodata looks like in most imagery) and no mask ever covers them. Each prompt is one query
(a grounded description is asked as written; a referring expression or class name in GeoPixel-RES's
question). All queries of a batch are answered together (KV-cached greedy decoding), then each ``[SEG]``
becomes a mask at the tile's resolution, scored by the mask decoder's predicted IoU and named by the
``<p> .. </p>`` phrase before it (the prompt's label where there is none).

Token budget: GeoPixel's view of an image grows with its size (about 400 tokens per 560 px crop), and the
official code silently cuts the prompt off past 16 384 tokens. Here a tile whose view would not leave room
for the prompt and ``max_new_tokens`` is shown to the language model downscaled until it does (a
warning says so); the masks still come from the full tile. A prompt that cannot fit even beside the
smallest view is rejected when the backend is made.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geobatch.errors import UnsupportedPrompt
from geobatch.models.base import Instance, Prompt, TileInput, TileResult
from geobatch.models.geopixel import loading
from geobatch.models.geopixel.config import GeoPixelConfig
from geobatch.models.geopixel.tokenizer import (
    DESCRIPTION_QUESTION,
    CheckpointError,
    GeoPixelTokenizer,
    question_for,
)

log = logging.getLogger(__name__)

OFFICIAL_MAX_TOKENS = 16384  # the official inference truncates its input to this many tokens
RGB = ("red", "green", "blue")


@dataclass(frozen=True, slots=True)
class _Asked:
    """One query of a batch: which tile and which prompt it answers."""

    tile: int
    prompt: Prompt


class GeoPixelSegmenter:
    """GeoPixel (grounded description and referring segmentation) from a local checkpoint folder.

    ``weights``: the folder (see :mod:`geobatch.models.geopixel.loading`). ``device``: ``"cuda"`` when a
    GPU is visible, else ``"cpu"``; weights in bfloat16 on a GPU, float32 on the CPU unless ``dtype``
    says otherwise. ``batch_size`` tiles per call; ``max_new_tokens`` per answer (the official 300);
    ``max_tokens``: the sequence budget, at most the official 16 384 and the config's positions.
    """

    name = "geopixel"
    input_values = "display"
    objects = "instances"

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 4,
        max_new_tokens: int = 300,
        max_tokens: int = OFFICIAL_MAX_TOKENS,
    ) -> None:
        if weights is None:
            raise CheckpointError(
                "model 'geopixel' needs 'model.weights': a GeoPixel checkpoint folder (docs/models.md)"
            )
        self.files = loading.find_checkpoint(weights)
        self.tokenizer = GeoPixelTokenizer(self.files.directory)
        self.device = device or _default_device()
        self.dtype = dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.config = GeoPixelConfig.from_dict(loading.read_config(self.files), source=str(self.files.config_path))
        self.max_tokens = min(int(max_tokens), self.config.max_position_embeddings)
        self._engine = None

    # -- the Segmenter contract ------------------------------------------------------------------------

    def required_bands(self, prompts: Sequence[Prompt]) -> tuple[str, ...]:
        for prompt in prompts:
            self._check_budget(prompt)
        return RGB

    def __call__(self, tile: TileInput, prompts: Sequence[Prompt]) -> TileResult:
        return self.predict_batch([tile], prompts)[0]

    def predict_batch(self, tiles: Sequence[TileInput], prompts: Sequence[Prompt]) -> list[TileResult]:
        """Every prompt on every tile, all queries of the batch decoded together."""
        if not tiles:
            return []
        images = [tile_image(tile) for tile in tiles]
        chats = {p.label: self.tokenizer.chat(question_for(p.text, p.kind)) for p in prompts}
        asked = [_Asked(t, p) for t in range(len(tiles)) for p in prompts]
        queries = [self._query(images[a.tile], chats[a.prompt.label]) for a in asked]
        answers = self.engine.answer(
            queries,
            max_new_tokens=self.max_new_tokens,
            stop_ids={self.tokenizer.eos_id},
            seg_token_id=self.tokenizer.seg_id,
        )
        predictions = self.engine.segment([images[a.tile] for a in asked], answers)
        instances: list[dict[str, list[Instance]]] = [{p.label: [] for p in prompts} for _ in tiles]
        captions: list[list[str]] = [[] for _ in tiles]
        for a, answer, prediction in zip(asked, answers, predictions, strict=True):
            instances[a.tile][a.prompt.label] = self._instances(
                answer.token_ids, prediction, tiles[a.tile], a.prompt.label
            )
            if a.prompt.kind == "gcg":
                captions[a.tile].append(self.tokenizer.decode(answer.token_ids))
        return [
            TileResult(tile.tile.tile_id, found, "\n".join(caption) or None)
            for tile, found, caption in zip(tiles, instances, captions, strict=True)
        ]

    def ground(
        self, tiles: Sequence[TileInput], answers: Sequence[str], label: str, question: str = DESCRIPTION_QUESTION
    ) -> list[list[Instance]]:
        """Masks for answers the caller already has (e.g. existing descriptions), one per ``[SEG]`` in them.

        No text is generated: each answer is read by the model after ``question`` (by default the official
        grounded-description question), and its ``[SEG]`` states give the masks (phrases from its
        ``<p> .. </p>``, else ``label``).
        """
        if not tiles:
            return []
        images = [tile_image(tile) for tile in tiles]
        chat = self.tokenizer.chat(question)
        queries = [
            self._query(image, chat, answer=self.tokenizer.encode(text))
            for image, text in zip(images, answers, strict=True)
        ]
        grounded = self.engine.answer(
            queries, max_new_tokens=0, stop_ids={self.tokenizer.eos_id}, seg_token_id=self.tokenizer.seg_id
        )
        predictions = self.engine.segment(images, grounded)
        return [
            self._instances(answer.token_ids, prediction, tile, label)
            for tile, answer, prediction in zip(tiles, grounded, predictions, strict=True)
        ]

    # -- internals -------------------------------------------------------------------------------------

    @property
    def engine(self):
        """The GeoPixel model, loaded on first use (see the module doc for why not in ``__init__``)."""
        if self._engine is None:
            self._engine = loading.load_geopixel(self.files, device=self.device, dtype=self.dtype)
        return self._engine

    def _query(self, image: np.ndarray, chat, answer: Sequence[int] | None = None):
        from geobatch.models.geopixel.engine import Query

        answer_tokens = len(answer) if answer is not None else self.max_new_tokens  # given, or at most generated
        view = self._fitting_view(
            image, self.max_tokens - len(chat.before_image) - len(chat.after_image) - answer_tokens
        )
        return Query(view, chat.before_image, chat.after_image, tuple(answer) if answer is not None else None)

    def _fitting_view(self, image: np.ndarray, available: int) -> np.ndarray:
        """``image``, or the largest downscaled copy of it whose view fits in ``available`` tokens."""
        height, width = image.shape[:2]
        if self._image_tokens(height, width) <= available:
            return image
        low, high = 1, max(height, width)  # the long side, binary-searched: tokens grow with it
        while low < high:
            middle = (low + high + 1) // 2
            if self._image_tokens(*_scaled(height, width, middle)) <= available:
                low = middle
            else:
                high = middle - 1
        size = _scaled(height, width, low)
        log.warning(
            "a %dx%d tile is shown to GeoPixel's language model at %dx%d to fit its token budget", height, width, *size
        )
        return _resize(image, size)

    def _image_tokens(self, height: int, width: int) -> int:
        """Sequence length of an image of this size in GeoPixel's view (the HD partition)."""
        from geobatch.models.geopixel.vision import hd_layout, tokens_per_image

        vision = self.config.vision
        return tokens_per_image(hd_layout(height, width, vision.image_size, self.config.hd_num), vision.merged_grid)

    def _check_budget(self, prompt: Prompt) -> None:
        chat = self.tokenizer.chat(question_for(prompt.text, prompt.kind))
        needed = self._image_tokens(1, 1) + len(chat.before_image) + len(chat.after_image) + self.max_new_tokens
        if needed > self.max_tokens:
            raise UnsupportedPrompt(
                f"prompt '{prompt.label}': needs {needed} tokens with the smallest image view and max_new_tokens="
                f"{self.max_new_tokens}, over GeoPixel's budget of {self.max_tokens}; shorten it or lower max_new_tokens"
            )

    def _instances(self, token_ids: Sequence[int], prediction, tile: TileInput, label: str) -> list[Instance]:
        phrases = self.tokenizer.phrases(token_ids, default=label)
        masks, scores = prediction.masks.cpu().numpy(), prediction.scores.float().cpu().numpy()
        found = []
        for mask, score, phrase in zip(masks, scores, phrases, strict=False):  # a final [SEG] has no mask
            mask = mask & tile.valid
            if mask.any():  # a mask wholly on nodata is no object
                found.append(Instance(mask, float(score), phrase))
        return found


def tile_image(tile: TileInput) -> np.ndarray:
    """The tile's RGB display values as an ``HxWx3`` uint8 image; invalid pixels black."""
    image = np.stack([np.asarray(tile.bands[band], dtype=np.float32) for band in RGB], axis=-1)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    image[~tile.valid] = 0
    return image


def _scaled(height: int, width: int, long_side: int) -> tuple[int, int]:
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    resized = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_weights(weights: str | Path | None) -> str:
    """One line for ``geobatch models``: whether ``weights`` holds a GeoPixel checkpoint, and what kind."""
    if weights is None:
        return "needs weights: model: {name: geopixel, weights: DIR} (check a folder with --weights DIR)"
    try:
        return f"present: {loading.summarize(weights).describe()}"
    except CheckpointError as exc:
        return f"missing: {exc}"
