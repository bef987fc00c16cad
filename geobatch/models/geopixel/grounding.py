"""GeoPixel's grounding head: [SEG] hidden states -> SAM2 mask decoder prompts -> masks at the image's size.

The head holds the SAM2 parts GeoPixel uses for single images (Hiera image encoder with its FPN neck, the
prompt encoder's dense positional encoding and "no mask" embedding, the mask decoder, ``no_mem_embed``) and
GeoPixel's ``text_hidden_fcs`` projection. The SAM2 video-memory modules in the checkpoint are not used.

Inference path (as GeoPixel runs it): the image is resized to ``image_size``² (aspect ratio not kept) and
normalised with ImageNet statistics; the encoder's lowest-resolution FPN level plus ``no_mem_embed`` is the
image embedding, rounded to bfloat16; the two finer levels go through the decoder's ``conv_s0``/``conv_s1``
as high-resolution features. Each [SEG] state becomes one sparse prompt (no points, no boxes, no mask), and
the decoder in eval mode keeps its single-mask output unless it is unstable, in which case it takes the best
of its three multimask outputs. Low-resolution logits are resized bilinearly to the image's size; pixels
with logits above 0 are the mask.

Numerics follow the official code (model/geopixel.py and its SAM2 copy) rather than transformers' SAM2
where the two round differently; each such place says why. In float32 every tensor matches the official
code bit for bit on a tiny random configuration.

Cost: the encoder runs once per image and dominates; the decoder runs once per [SEG] state, and each state
holds a copy of its image's embedding and high-resolution features while it is decoded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam2.configuration_sam2 import (
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
)
from transformers.models.sam2.modeling_sam2 import (
    Sam2FeedForward,
    Sam2LayerNorm,
    Sam2MaskDecoder,
    Sam2PositionalEmbedding,
    Sam2VisionModel,
)

_SAM2 = "model.visual_model."
_TEXT_FCS = "model.text_hidden_fcs.0."


@dataclass(frozen=True, slots=True)
class GroundingConfig:
    """SAM2 architecture settings, named as in the official SAM2 configuration (``sam2_hiera_l.yaml``).

    Settings the official ``SAM2Base`` fixes in code (decoder depth, widths, heads) are fields too, so that a
    tiny random configuration of the same architecture goes through the same code.
    """

    image_size: int = 1024
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Hiera trunk
    embed_dim: int = 144
    num_heads: int = 2
    stages: tuple[int, ...] = (2, 6, 36, 4)  # blocks per stage; channels and heads double at each stage
    global_att_blocks: tuple[int, ...] = (23, 33, 43)
    window_spec: tuple[int, ...] = (8, 4, 16, 8)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    q_pool: int = 3
    q_stride: tuple[int, int] = (2, 2)
    mlp_ratio: float = 4.0
    patch_kernel_size: int = 7
    patch_stride: int = 4
    patch_padding: int = 3
    # FPN neck; d_model is also the prompt/decoder width and the width of text_hidden_fcs' output
    d_model: int = 256
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    scalp: int = 1
    backbone_stride: int = 16
    # mask decoder
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    mask_threshold: float = 0.0

    def __post_init__(self) -> None:
        stages = len(self.stages)
        if len(self.window_spec) != stages:
            _bad("window_spec", f"needs one window size per stage ({stages}), got {list(self.window_spec)}")
        if self.q_pool != stages - 1:
            _bad("q_pool", f"must be len(stages) - 1 = {stages - 1} (every stage after the first pools)")
        if self.stages_kept != 3:
            _bad("scalp", f"len(stages) - scalp must be 3 (embedding + two high-res levels), got {self.stages_kept}")
        if self.backbone_stride != self.patch_stride * self.q_stride[0] ** (self.stages_kept - 1):
            _bad("backbone_stride", "must equal patch_stride x q_stride^(kept levels - 1)")
        if self.image_size % self.backbone_stride:
            _bad("image_size", f"{self.image_size} is not a multiple of backbone_stride {self.backbone_stride}")
        if (self.image_size // self.patch_stride) % self.window_spec[0]:
            _bad("window_spec", "the first window size must divide image_size / patch_stride")
        pooling_blocks = set(np.cumsum(self.stages)[:-1].tolist())
        if pooling_blocks & set(self.global_att_blocks):
            _bad(
                "global_att_blocks", f"blocks {sorted(pooling_blocks)} start a stage (they pool); they cannot be global"
            )
        if self.decoder_depth != 2:
            # transformers' two-way blocks size their MLP by the depth; SAM2's have two layers at any depth.
            _bad("decoder_depth", f"only 2 (SAM2's) is supported, got {self.decoder_depth}")

    @classmethod
    def hiera_l(cls) -> GroundingConfig:
        """SAM2 Hiera-L as GeoPixel uses it."""
        return cls()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroundingConfig:
        """Hiera-L defaults overridden by ``d`` (e.g. config.json's ``"sam2_config"``); unknown keys are errors."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"sam2_config: unknown setting(s) {unknown}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**values)

    @property
    def stages_kept(self) -> int:
        return len(self.stages) - self.scalp

    @property
    def stage_dims(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(len(self.stages))]

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding (64 for Hiera-L at 1024²)."""
        return self.image_size // self.backbone_stride

    def vision_config(self) -> Sam2VisionConfig:
        stages = len(self.stages)
        trunk = Sam2HieraDetConfig(
            hidden_size=self.embed_dim,
            num_attention_heads=self.num_heads,
            image_size=[self.image_size, self.image_size],
            patch_kernel_size=[self.patch_kernel_size] * 2,
            patch_stride=[self.patch_stride] * 2,
            patch_padding=[self.patch_padding] * 2,
            query_stride=list(self.q_stride),
            window_positional_embedding_background_size=list(self.window_pos_embed_bkg_spatial_size),
            num_query_pool_stages=self.q_pool,
            blocks_per_stage=list(self.stages),
            embed_dim_per_stage=self.stage_dims,
            num_attention_heads_per_stage=[self.num_heads * 2**i for i in range(stages)],
            window_size_per_stage=list(self.window_spec),
            global_attention_blocks=list(self.global_att_blocks),
            mlp_ratio=self.mlp_ratio,
        )
        side = self.image_size // self.patch_stride
        return Sam2VisionConfig(
            backbone_config=trunk,
            backbone_channel_list=self.stage_dims[::-1],
            backbone_feature_sizes=[[side // 2**i] * 2 for i in range(self.stages_kept)],
            fpn_hidden_size=self.d_model,
            fpn_top_down_levels=list(self.fpn_top_down_levels),
            num_feature_levels=self.stages_kept,
        )

    def prompt_config(self) -> Sam2PromptEncoderConfig:
        return Sam2PromptEncoderConfig(
            hidden_size=self.d_model,
            image_size=self.image_size,
            patch_size=self.backbone_stride,
            mask_input_channels=self.mask_in_chans,
        )

    def decoder_config(self) -> Sam2MaskDecoderConfig:
        config = Sam2MaskDecoderConfig(
            hidden_size=self.d_model,
            mlp_dim=self.decoder_mlp_dim,
            num_hidden_layers=self.decoder_depth,
            num_attention_heads=self.decoder_num_heads,
            attention_downsample_rate=self.attention_downsample_rate,
            num_multimask_outputs=self.num_multimask_outputs,
            iou_head_depth=self.iou_head_depth,
            iou_head_hidden_dim=self.iou_head_hidden_dim,
            dynamic_multimask_via_stability=True,
            dynamic_multimask_stability_delta=self.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=self.dynamic_multimask_stability_thresh,
        )
        config._attn_implementation = "sdpa"  # the decoder is not a PreTrainedModel, nothing else sets it
        return config


def _bad(field: str, problem: str) -> None:
    raise ValueError(f"sam2_config.{field}: {problem}")


@dataclass(frozen=True, slots=True)
class ImageFeatures:
    """Encoder output for a batch of images, in the head's dtype."""

    image_embed: torch.Tensor  # [B, d_model, s, s], rounded to bfloat16 as GeoPixel does
    high_res: tuple[torch.Tensor, torch.Tensor]  # [B, d_model/8, 4s, 4s], [B, d_model/4, 2s, 2s]


@dataclass(frozen=True, slots=True)
class MaskPrediction:
    """The masks for one image's [SEG] states, at the image's size."""

    logits: torch.Tensor  # float32 [n, h, w]
    scores: torch.Tensor  # float32 [n], the decoder's predicted IoU of each chosen mask
    threshold: float = 0.0

    @property
    def masks(self) -> torch.Tensor:
        """bool [n, h, w]: pixels whose logit is above the threshold."""
        return self.logits > self.threshold


class GroundingHead(nn.Module):
    """SAM2 + ``text_hidden_fcs``: images and [SEG] hidden states in, one mask per [SEG] state out.

    Inference only: built in eval mode, which the decoder's fallback to a stable multimask output needs.
    Runs in the dtype of its parameters (bfloat16 on GPU, float32 on CPU); see ``_autocast``.
    """

    # Official keys (under model.visual_model.) that GeoPixel's single-image path never reads: SAM2's video
    # memory (sam2_base.py) and the prompt encoder's point/box/mask inputs.
    UNUSED_OFFICIAL_PREFIXES: tuple[str, ...] = tuple(
        _SAM2 + name
        for name in (
            "memory_attention.",
            "memory_encoder.",
            "maskmem_tpos_enc",
            "no_mem_pos_enc",
            "no_obj_ptr",
            "mask_downsample.",
            "obj_ptr_proj.",
            "obj_ptr_tpos_proj.",
            "sam_prompt_encoder.point_embeddings.",
            "sam_prompt_encoder.not_a_point_embed.",
            "sam_prompt_encoder.mask_downscaling.",
        )
    )

    def __init__(self, config: GroundingConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, config.d_model)
        )
        self.image_encoder = Sam2VisionModel(config.vision_config())
        self.positional_embedding = Sam2PositionalEmbedding(config.prompt_config())
        self.no_mask_embed = nn.Embedding(1, config.d_model)
        self.mask_decoder = Sam2MaskDecoder(config.decoder_config())
        self._match_sam2_rounding(self.mask_decoder)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.eval()

    @staticmethod
    def _match_sam2_rounding(decoder: Sam2MaskDecoder) -> None:
        """Two changes that keep transformers' decoder on SAM2's rounding in bfloat16 (no effect in float32).

        The upscaling layer norm is computed op by op as SAM2's LayerNorm2d (see _ChannelsFirstLayerNorm).
        The hypernetwork and IoU MLPs get token slices that are not contiguous; F.linear then multiplies and
        adds the bias as two bfloat16 roundings, where SAM2's 2-D inputs take one fused addmm.
        """
        norm = decoder.upscale_layer_norm
        decoder.upscale_layer_norm = _ChannelsFirstLayerNorm(norm.normalized_shape, eps=norm.eps)
        for mlp in (*decoder.output_hypernetworks_mlps, decoder.iou_prediction_head):
            mlp.register_forward_pre_hook(_contiguous_inputs)

    @property
    def dtype(self) -> torch.dtype:
        return self.no_mem_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    @torch.no_grad()
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 RGB images -> [B, 3, S, S] normalised pixels in the head's dtype.

        As SAM2Transforms: scale to [0, 1] in float32, resize bilinearly with antialiasing (torchvision's
        Resize on tensors) to S x S, then normalise.
        """
        size = self.config.image_size
        mean = torch.tensor(self.config.pixel_mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.pixel_std, device=self.device).view(1, 3, 1, 1)
        batch = []
        for index, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"images[{index}]: expected HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
            pixels = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None]
            pixels = pixels.to(torch.float32) / 255.0
            resized = F.interpolate(pixels, (size, size), mode="bilinear", align_corners=False, antialias=True)
            batch.append((resized - mean) / std)
        return torch.cat(batch).to(self.dtype)

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> ImageFeatures:
        """Encode [B, 3, S, S] pixels: the bfloat16-rounded image embedding and the high-resolution features."""
        with self._autocast():
            return self._image_features(pixels.to(self.dtype))

    def _image_features(self, pixels: torch.Tensor) -> ImageFeatures:
        finest, middle, coarsest = self._feature_pyramid(pixels)
        # GeoPixel adds no_mem_embed to the coarsest level only (SAM2's "directly add" for a frame without
        # memory) and hands the decoder a bfloat16 embedding whatever the model's dtype.
        embed = (coarsest + self.no_mem_embed.view(1, -1, 1, 1)).to(torch.bfloat16).to(self.dtype)
        high_res = (self.mask_decoder.conv_s0(finest.to(self.dtype)), self.mask_decoder.conv_s1(middle.to(self.dtype)))
        return ImageFeatures(image_embed=embed, high_res=high_res)

    def _feature_pyramid(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The FPN levels SAM2 keeps (all but the ``scalp`` coarsest), fine to coarse, [B, d_model, h, w].

        Written here rather than calling transformers' Sam2VisionNeck, whose parameters it uses: that neck
        casts each top-down sum back to the model's dtype, while SAM2 adds the float32 upsampled coarser
        level to the lateral features and keeps the sum in float32. In bfloat16 the embedding would then be
        rounded twice instead of once (1 bf16 ulp apart from GeoPixel's). The neck's unused sine position
        encodings are skipped as well.
        """
        stages = self.image_encoder.backbone(pixels).intermediate_hidden_states  # fine to coarse, [B, h, w, C]
        neck = self.image_encoder.neck
        last = len(stages) - 1
        levels: list[torch.Tensor] = []
        coarser = None
        for index in range(last, -1, -1):
            lateral = neck.convs[last - index](stages[index].permute(0, 3, 1, 2))
            if index in neck.fpn_top_down_levels and coarser is not None:
                lateral = lateral + F.interpolate(coarser.float(), scale_factor=2.0, mode="nearest")
            coarser = lateral
            levels.insert(0, lateral)
        return levels[: self.config.stages_kept]

    def prompt_embeddings(self, seg_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden] [SEG] states -> [n, d_model] sparse prompt embeddings."""
        with self._autocast():
            return self.text_hidden_fcs(seg_states.to(self.dtype))

    def dense_positional_encoding(self) -> torch.Tensor:
        """[1, d_model, s, s]: the prompt encoder's random-Fourier encoding of the embedding grid's centres.

        Computed in the buffer's dtype, as GeoPixel's modified SAM2 builds the grid in bfloat16 (exact for
        these half-integer grids) and the model runs in bfloat16.
        """
        side = self.config.embedding_size
        centres = (
            torch.arange(side, device=self.device, dtype=self.positional_embedding.positional_embedding.dtype) + 0.5
        ) / side
        grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1)  # [s, s, (x, y)]
        return self.positional_embedding(grid).permute(2, 0, 1)[None]

    @torch.no_grad()
    def masks(
        self,
        features: ImageFeatures,
        seg_states: Sequence[torch.Tensor],
        sizes: Sequence[tuple[int, int]],
    ) -> list[MaskPrediction]:
        """One mask per [SEG] state, per image, resized to that image's (height, width).

        ``seg_states[i]`` is [n_i, hidden] for image ``i`` of ``features``; n_i may be 0 (no masks).
        """
        batch = features.image_embed.shape[0]
        if len(seg_states) != batch or len(sizes) != batch:
            raise ValueError(
                f"masks: {batch} images but {len(seg_states)} seg_states and {len(sizes)} sizes; one each per image"
            )
        counts = [int(states.shape[0]) for states in seg_states]
        if sum(counts) == 0:
            return [self._empty(size) for size in sizes]
        owner = torch.repeat_interleave(
            torch.arange(batch, device=self.device), torch.tensor(counts, device=self.device)
        )
        prompts = self.prompt_embeddings(torch.cat([s.to(self.device) for s in seg_states if s.shape[0]]))
        low_res, scores = self._decode(features, owner, prompts)
        predictions = []
        for low, score, size in zip(low_res.split(counts), scores.split(counts), sizes, strict=True):
            if low.shape[0] == 0:
                predictions.append(self._empty(size))
                continue
            logits = F.interpolate(low[:, None].float(), size, mode="bilinear", align_corners=False)[:, 0]
            predictions.append(MaskPrediction(logits, score.float(), self.config.mask_threshold))
        return predictions

    def _decode(
        self, features: ImageFeatures, owner: torch.Tensor, prompts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt on its own image: low-resolution logits [N, 4s, 4s] and predicted IoU [N]."""
        count = prompts.shape[0]
        embed = features.image_embed[owner]
        side = embed.shape[-1]
        dense = self.no_mask_embed.weight.view(1, -1, 1, 1).expand(count, -1, side, side)
        high_res = [level[owner] for level in features.high_res]
        with self._autocast():
            positional = self.dense_positional_encoding().to(self.dtype).expand(count, -1, -1, -1)
            low_res, iou, _, _ = self.mask_decoder(
                image_embeddings=embed,
                image_positional_embeddings=positional,
                sparse_prompt_embeddings=prompts[:, None, None, :],  # [N, 1 prompt, 1 token, C]
                dense_prompt_embeddings=dense,
                multimask_output=False,
                high_resolution_features=high_res,
            )
        return low_res[:, 0, 0], iou[:, 0, 0]

    def _autocast(self) -> torch.autocast:
        """bfloat16 autocast when the head is bfloat16, as GeoPixel runs SAM2 (chat.py wraps inference in it).

        Matmuls and convolutions run in bfloat16 either way, but autocast keeps the ops on its float32 list
        (on CUDA: layer norms, pow, softmax, ...) and the sums that follow them in float32, as GeoPixel's
        masks were made; a plain bfloat16 run would round those too.
        """
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def _empty(self, size: tuple[int, int]) -> MaskPrediction:
        return MaskPrediction(
            torch.zeros((0, *size), device=self.device), torch.zeros(0, device=self.device), self.config.mask_threshold
        )

    def checkpoint_names(self) -> dict[str, str]:
        """Our parameter/persistent-buffer name (relative to this module) -> full official GeoPixel key."""
        feed_forward_layers = {
            name + ".": module.num_layers
            for name, module in self.named_modules()
            if isinstance(module, Sam2FeedForward)
        }
        return {name: _official_name(name, feed_forward_layers) for name in self.state_dict()}


class _ChannelsFirstLayerNorm(Sam2LayerNorm):
    """Layer norm over the channels of [B, C, H, W], computed step by step as SAM2's LayerNorm2d does.

    Same parameters as transformers' Sam2LayerNorm, but F.layer_norm is one fused op: under bfloat16
    autocast its precision differs from SAM2's separate mean/variance/scale ops, and the decoder's upscaling
    (hence every mask boundary) then drifts from GeoPixel's by a bf16 ulp here and there.
    """

    def __init__(self, normalized_shape: tuple[int, ...], eps: float) -> None:
        super().__init__(normalized_shape, eps=eps, data_format="channels_first")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        centred = features - features.mean(1, keepdim=True)
        normalised = centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + self.eps)
        return self.weight[:, None, None] * normalised + self.bias[:, None, None]


def _contiguous_inputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(tensor.contiguous() for tensor in inputs)


# transformers' SAM2 names -> official SAM2 names, applied in order to a name under model.visual_model.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^image_encoder\.backbone\.", "image_encoder.trunk."),
    (r"\.patch_embed\.projection\.", ".patch_embed.proj."),
    (r"^image_encoder\.neck\.convs\.(\d+)\.", r"image_encoder.neck.convs.\1.conv."),
    (r"\.layer_norm(\d)\.", r".norm\1."),
    (r"\.layer_norm_final_attn\.", ".norm_final_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.upscale_conv1\.", ".output_upscaling.0."),
    (r"\.upscale_layer_norm\.", ".output_upscaling.1."),
    (r"\.upscale_conv2\.", ".output_upscaling.3."),
    (r"^mask_decoder\.", "sam_mask_decoder."),
    (
        r"^positional_embedding\.positional_embedding$",
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    ),
    (r"^no_mask_embed\.", "sam_prompt_encoder.no_mask_embed."),
)


def _official_name(name: str, feed_forward_layers: Mapping[str, int]) -> str:
    if name.startswith("text_hidden_fcs."):
        return _TEXT_FCS + name.removeprefix("text_hidden_fcs.")
    name = _feed_forward_name(name, feed_forward_layers)
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    return _SAM2 + name


def _feed_forward_name(name: str, feed_forward_layers: Mapping[str, int]) -> str:
    """transformers' MLP (proj_in, layers.k, proj_out) -> SAM2's MLP (layers.0 ... layers.n-1)."""
    for prefix, num_layers in feed_forward_layers.items():
        if name.startswith(prefix):
            layer, _, rest = name.removeprefix(prefix).partition(".")
            if layer == "proj_in":
                index = 0
            elif layer == "proj_out":
                index = num_layers - 1
            else:
                index = int(rest.partition(".")[0]) + 1
                rest = rest.partition(".")[2]
            return f"{prefix}layers.{index}.{rest}"
    return name
