"""GeoPixel's view of an image: the HD partition, the CLIP tower and the projector into the LM's space.

An image of any size becomes one global view plus a grid of sub-crops (crop = the tower's ``image_size``,
560 px for the published weights), exactly as InternLM-XComposer2.5 prepares it:

1. the longer side decides the grid: with ``ratio = long / short`` the largest ``scale`` with
   ``scale * ceil(scale / ratio) <= hd_num`` (but at least ``floor(long / crop)``) sets the long side to
   ``scale * crop`` pixels, the short side to ``int(long_side / ratio)``; the resize is PIL's bilinear;
2. the short side is padded with white (after the image) to a multiple of ``crop``;
3. pixels are scaled to [0, 1] and normalised with CLIP's mean and standard deviation; the global view
   is that padded image resized bicubically (torch, no antialiasing) to ``crop`` x ``crop``;
4. each crop's patch grid (40x40) is merged 2x2 into tokens of 4x the tower width (20x20 grid); every row
   of tokens ends with the ``row_separator`` (``plora_sub_GN``); the sequence is: global view, one
   ``global_separator`` (``plora_glb_GN``), then the sub-crops as one large grid, row by row.

Tokens per image, with ``g`` the merged grid side: ``(rows * cols + 1) * g**2 + 1 + (rows + 1) * g``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from geobatch.models.geopixel.config import GeoPixelConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHITE = 255


@dataclass(frozen=True, slots=True)
class HdLayout:
    """How one image is cut: its resized size (before padding) and the grid of crops after padding."""

    height: int
    width: int
    rows: int
    cols: int


def hd_layout(height: int, width: int, crop: int, hd_num: int) -> HdLayout:
    """The resized size and the crop grid of a ``height`` x ``width`` image (see the module docstring)."""
    long_side, short_side = max(height, width), min(height, width)
    ratio = long_side / short_side
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale = max(long_side // crop, scale - 1)
    new_long = scale * crop
    new_short = max(1, int(new_long / ratio))
    crops_short = math.ceil(new_short / crop)
    if width >= height:
        return HdLayout(height=new_short, width=new_long, rows=crops_short, cols=scale)
    return HdLayout(height=new_long, width=new_short, rows=scale, cols=crops_short)


def tokens_per_image(layout: HdLayout, grid: int) -> int:
    """Sequence length of one image: global view and sub-crops with their row separators, one global separator."""
    return (layout.rows * layout.cols + 1) * grid * grid + 1 + (layout.rows + 1) * grid


def hd_pixels(image: np.ndarray, crop: int, hd_num: int) -> torch.Tensor:
    """HxWx3 uint8 RGB -> the resized, white-padded, CLIP-normalised image [3, rows * crop, cols * crop]."""
    layout = hd_layout(image.shape[0], image.shape[1], crop, hd_num)
    # the published code resizes the image turned so that its long side is horizontal; PIL's two
    # resampling passes round in between, so turning it the same way gives the same pixels
    portrait = image.shape[1] < image.shape[0]
    turned = image.transpose(1, 0, 2) if portrait else image
    size = (layout.height, layout.width) if portrait else (layout.width, layout.height)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(turned)).resize(size, Image.Resampling.BILINEAR))
    if portrait:
        resized = resized.transpose(1, 0, 2)
    padded = np.full((layout.rows * crop, layout.cols * crop, 3), WHITE, dtype=np.uint8)
    padded[: resized.shape[0], : resized.shape[1]] = resized
    pixels = torch.from_numpy(padded).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


def crops_of(pixels: torch.Tensor, crop: int) -> torch.Tensor:
    """[3, H, W] normalised image -> [1 + rows * cols, 3, crop, crop]: the global view, then crops row by row."""
    channels, height, width = pixels.shape
    rows, cols = height // crop, width // crop
    sub = pixels.reshape(channels, rows, crop, cols, crop).permute(1, 3, 0, 2, 4).reshape(-1, channels, crop, crop)
    glb = F.interpolate(pixels[None], size=(crop, crop), mode="bicubic")
    return torch.cat([glb, sub])


class VisionEncoder(nn.Module):
    """CLIP tower + HD layout + projector: images -> one sequence of LM-space embeddings per image."""

    def __init__(self, config: GeoPixelConfig) -> None:
        super().__init__()
        vision = config.vision
        self.crop = vision.image_size
        self.grid = vision.merged_grid
        self.hd_num = config.hd_num
        self.clip = CLIPVisionModel(
            CLIPVisionConfig(
                image_size=vision.image_size,
                patch_size=vision.patch_size,
                hidden_size=vision.hidden_size,
                intermediate_size=vision.intermediate_size,
                num_hidden_layers=vision.num_hidden_layers,
                num_attention_heads=vision.num_attention_heads,
                layer_norm_eps=vision.layer_norm_eps,
                hidden_act=vision.hidden_act,
            )
        )
        self.clip.post_layernorm = nn.Identity()  # GeoPixel reads the last layer's patch tokens, not the pooled one
        merged = 4 * vision.hidden_size
        self.global_separator = nn.Parameter(torch.zeros(1, 1, merged))
        self.row_separator = nn.Parameter(torch.zeros(1, 1, 1, merged))
        self.projector = nn.Sequential(
            nn.Linear(merged, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )

    def layout(self, height: int, width: int) -> HdLayout:
        return hd_layout(height, width, self.crop, self.hd_num)

    def image_tokens(self, height: int, width: int) -> int:
        return tokens_per_image(self.layout(height, width), self.grid)

    def forward(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """HxWx3 uint8 RGB images -> per image its embeddings [image_tokens(h, w), hidden]; one CLIP pass."""
        param = self.global_separator
        crops, grids = [], []
        for image in images:
            pixels = hd_pixels(image, self.crop, self.hd_num).to(param.device)  # the bicubic view in float32
            grids.append((pixels.shape[1] // self.crop, pixels.shape[2] // self.crop))
            crops.append(crops_of(pixels, self.crop))
        patches = self.clip(torch.cat(crops).to(param.dtype)).last_hidden_state[:, 1:]
        merged = self._merge(patches)
        out, start = [], 0
        for rows, cols in grids:
            out.append(self.projector(self._sequence(merged[start : start + 1 + rows * cols], rows, cols)))
            start += 1 + rows * cols
        return out

    def _merge(self, patches: torch.Tensor) -> torch.Tensor:
        """[n, (2g)^2, C] patch tokens -> [n, g, g, 4C]: each 2x2 block of patches becomes one token."""
        n, _, channels = patches.shape
        g = self.grid
        blocks = patches.reshape(n, g, 2, g, 2, channels).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, g, g, 4 * channels)

    def _sequence(self, merged: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One image's merged crops [1 + rows*cols, g, g, 4C] -> its token sequence [tokens, 4C]."""
        g, width = self.grid, merged.shape[-1]
        glb = torch.cat([merged[:1], self.row_separator.expand(1, g, 1, width)], dim=2).reshape(-1, width)
        sub = merged[1:].reshape(rows, cols, g, g, width).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, width)
        sub = torch.cat([sub, self.row_separator[0].expand(rows * g, 1, width)], dim=1).reshape(-1, width)
        return torch.cat([glb, self.global_separator[0], sub])

    def checkpoint_names(self) -> dict[str, str]:
        """Our parameter names (relative to this module) -> the published checkpoint's keys."""
        names = {f"clip.{key}": f"vit.vision_tower.vision_model.{key}" for key in self.clip.state_dict()}
        names.update({f"projector.{key}": f"vision_proj.{key}" for key in self.projector.state_dict()})
        names.update({"global_separator": "plora_glb_GN", "row_separator": "plora_sub_GN"})
        return names

    #: published keys this module does not use: CLIP's pooled-output norm, and its position ids if saved
    UNUSED_OFFICIAL_PREFIXES: tuple[str, ...] = (
        "vit.vision_tower.vision_model.post_layernorm.",
        "vit.vision_tower.vision_model.embeddings.position_ids",
    )
