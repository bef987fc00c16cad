"""``GeoPixelConfig``: every dimension of a GeoPixel checkpoint, read from its ``config.json``.

The language model's fields carry the names of InternLM-XComposer2's configuration (``hidden_size``,
``num_key_value_heads``, ``rope_scaling`` ...), so a published ``config.json`` is read as it is. The CLIP
tower and SAM2 are not described there: their published geometry (CLIP ViT-L/14 at 560 px, SAM2 Hiera-L)
ships as defaults, and a checkpoint may override them with ``"vision_config"`` and ``"sam2_config"``
objects (the tiny test checkpoints do).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from geobatch.errors import GeobatchError


class ModelConfigError(GeobatchError, ValueError):
    """A model's configuration file is missing, unparsable or has a bad field."""


@dataclass(frozen=True, slots=True)
class VisionConfig:
    """The CLIP ViT tower; one HD crop is ``image_size`` pixels square (560 for the published weights)."""

    image_size: int = 560
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        grid = self.image_size // self.patch_size
        if self.image_size % self.patch_size or grid % 2:
            raise ModelConfigError(
                f"vision_config: image_size {self.image_size} must be an even number of patches of {self.patch_size}"
            )

    @property
    def merged_grid(self) -> int:
        """Side of a crop's token grid after the 2x2 merge (20 for 560 px and 14 px patches)."""
        return self.image_size // self.patch_size // 2


@dataclass(frozen=True, slots=True)
class GeoPixelConfig:
    """The InternLM2 decoder's dimensions, the HD crop budget, and the vision and SAM2 settings."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling_type: str | None = None  # "dynamic" (NTK, as published) or "linear"; None: plain RoPE
    rope_scaling_factor: float = 1.0
    bias: bool = False  # biases on wqkv and wo
    plora_rank: int = 256  # Partial-LoRA, as the published code builds it
    plora_alpha: float = 256.0
    hd_num: int = 9  # most HD sub-crops per image (GeoPixel's inference setting)
    vision: VisionConfig = field(default_factory=VisionConfig)
    sam2_config: Mapping[str, Any] = field(default_factory=dict)  # parsed by grounding.GroundingConfig.from_dict

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ModelConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rope_scaling_type not in (None, "dynamic", "linear"):
            raise ModelConfigError(f"rope_scaling.type {self.rope_scaling_type!r}: choose 'dynamic' or 'linear'")
        if self.hd_num < 1:
            raise ModelConfigError(f"hd_num {self.hd_num} must be at least 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> GeoPixelConfig:
        """Read the fields of an InternLM-XComposer2 ``config.json``; unknown keys are ignored."""
        try:
            scaling = d.get("rope_scaling") or {}
            language = {
                f.name: d[f.name]
                for f in fields(cls)
                if f.name in d and f.name not in ("vision", "sam2_config", "rope_scaling_type", "rope_scaling_factor")
            }
            if "num_key_value_heads" not in language and "num_attention_heads" in language:
                language["num_key_value_heads"] = language["num_attention_heads"]  # plain multi-head attention
            vision = VisionConfig(**d.get("vision_config", {}))
            return cls(
                **language,
                rope_scaling_type=scaling.get("type"),
                rope_scaling_factor=float(scaling.get("factor", 1.0)),
                vision=vision,
                sam2_config=dict(d.get("sam2_config", {})),
            )
        except ModelConfigError as error:
            raise ModelConfigError(f"{source}: {error}") from None
        except TypeError as error:  # a missing or unknown field, e.g. "missing 1 required argument: 'vocab_size'"
            raise ModelConfigError(f"{source}: {error}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> GeoPixelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ModelConfigError(f"{path}: cannot read the model configuration ({error})") from None
        return cls.from_dict(data, source=str(path))
