"""Official Segment Anything checkpoints (``sam_vit_b/l/h_*.pth``) loaded into transformers' ``SamModel``.

The official package builds the same network, but imports torchvision (for its resize and NMS) at import
time; transformers' ``SamModel`` is the same architecture in plain torch. This module reads the official
state dict with ``torch.load(weights_only=True)``, works out the architecture from the tensors' shapes
(:class:`SamArchitecture`), renames every official key to its transformers name (:func:`official_to_hf`)
and loads it so that every official tensor is used exactly once and every parameter gets one.

What the shapes tell (so vit_b, vit_l, vit_h and tiny test sizes load through the same code):
- image encoder: patch size (``patch_embed.proj`` kernel), input size (``pos_embed`` grid x patch),
  width, depth, MLP width; the head size from a block's ``rel_pos_h`` (its second axis), so the heads;
  a block is global when its ``rel_pos_h`` spans the whole grid (2 * grid - 1 rows), else windowed with
  window (rows + 1) / 2. (A window as large as the grid *is* global attention, so nothing is ambiguous.)
- prompt encoder and mask decoder: prompt width, mask-input channels, decoder depth and MLP width, the
  attention downsampling rate, the IoU head's width and depth, the number of mask outputs.
- Not in any shape: the mask decoder's attention heads. Every official checkpoint uses 8
  (:data:`DECODER_HEADS`), and so must a test checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from geobatch.errors import GeobatchError

HYPERNETWORK_DEPTH = 3  # the mask decoder's per-output MLPs: fixed in the architecture
DECODER_HEADS = 8  # the official builder's value for every size; not recoverable from tensor shapes
LAYER_NORM_EPS = 1e-6

# Official name -> transformers name, by pattern (first match wins); "{n}" keeps the layer number.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"image_encoder\.pos_embed", "vision_encoder.pos_embed"),
    (r"image_encoder\.patch_embed\.proj\.(\w+)", r"vision_encoder.patch_embed.projection.\1"),
    (r"image_encoder\.blocks\.(\d+)\.norm([12])\.(\w+)", r"vision_encoder.layers.\1.layer_norm\2.\3"),
    (r"image_encoder\.blocks\.(\d+)\.(attn|mlp)\.(.+)", r"vision_encoder.layers.\1.\2.\3"),
    (r"image_encoder\.neck\.0\.weight", "vision_encoder.neck.conv1.weight"),
    (r"image_encoder\.neck\.1\.(\w+)", r"vision_encoder.neck.layer_norm1.\1"),
    (r"image_encoder\.neck\.2\.weight", "vision_encoder.neck.conv2.weight"),
    (r"image_encoder\.neck\.3\.(\w+)", r"vision_encoder.neck.layer_norm2.\1"),
    (r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix", "shared_image_embedding.positional_embedding"),
    (r"prompt_encoder\.point_embeddings\.(\d+)\.weight", r"prompt_encoder.point_embed.\1.weight"),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
    (r"prompt_encoder\.mask_downscaling\.0\.(\w+)", r"prompt_encoder.mask_embed.conv1.\1"),
    (r"prompt_encoder\.mask_downscaling\.1\.(\w+)", r"prompt_encoder.mask_embed.layer_norm1.\1"),
    (r"prompt_encoder\.mask_downscaling\.3\.(\w+)", r"prompt_encoder.mask_embed.conv2.\1"),
    (r"prompt_encoder\.mask_downscaling\.4\.(\w+)", r"prompt_encoder.mask_embed.layer_norm2.\1"),
    (r"prompt_encoder\.mask_downscaling\.6\.(\w+)", r"prompt_encoder.mask_embed.conv3.\1"),
    (
        r"mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.(\w+)",
        r"mask_decoder.transformer.layers.\1.layer_norm\2.\3",
    ),
    (r"mask_decoder\.transformer\.norm_final_attn\.(\w+)", r"mask_decoder.transformer.layer_norm_final_attn.\1"),
    (r"mask_decoder\.transformer\.(.+)", r"mask_decoder.transformer.\1"),
    (r"mask_decoder\.(iou_token|mask_tokens)\.weight", r"mask_decoder.\1.weight"),
    (r"mask_decoder\.output_upscaling\.0\.(\w+)", r"mask_decoder.upscale_conv1.\1"),
    (r"mask_decoder\.output_upscaling\.1\.(\w+)", r"mask_decoder.upscale_layer_norm.\1"),
    (r"mask_decoder\.output_upscaling\.3\.(\w+)", r"mask_decoder.upscale_conv2.\1"),
    (r"mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.(\w+)", None),  # see below
)


class CheckpointError(GeobatchError, ValueError):
    """A Segment Anything checkpoint is missing, unreadable, or not laid out as the official ones."""


@dataclass(frozen=True, slots=True)
class SamArchitecture:
    """The sizes of one Segment Anything network, as read from its checkpoint (see the module docstring)."""

    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    window_size: int
    global_attn_indexes: tuple[int, ...]
    prompt_dim: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    attention_downsample_rate: int
    iou_head_hidden_dim: int
    iou_head_depth: int
    num_multimask_outputs: int

    @classmethod
    def of(cls, state: dict) -> SamArchitecture:
        """The architecture whose official state dict is ``state``; raises ``KeyError`` for a missing tensor."""
        patch = state["image_encoder.patch_embed.proj.weight"]
        embed_dim, patch_size = patch.shape[0], patch.shape[-1]
        grid = state["image_encoder.pos_embed"].shape[1]
        depth = _count(state, r"image_encoder\.blocks\.(\d+)\.")
        spans = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
        global_blocks = tuple(i for i, span in enumerate(spans) if span[0] == 2 * grid - 1)
        windowed = [span[0] for span in spans if span[0] != 2 * grid - 1]
        prompt_dim = state["image_encoder.neck.0.weight"].shape[0]
        decoder_mlp = state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]
        cross_width = state["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0]
        return cls(
            image_size=grid * patch_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=embed_dim // spans[0][1],
            mlp_dim=state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0],
            window_size=(windowed[0] + 1) // 2 if windowed else grid,
            global_attn_indexes=global_blocks,
            prompt_dim=prompt_dim,
            mask_in_chans=state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
            decoder_depth=_count(state, r"mask_decoder\.transformer\.layers\.(\d+)\."),
            decoder_mlp_dim=decoder_mlp,
            attention_downsample_rate=prompt_dim // cross_width,
            iou_head_hidden_dim=state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
            iou_head_depth=_count(state, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
            num_multimask_outputs=state["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        )

    @property
    def name(self) -> str:
        """``vit_b``, ``vit_l`` or ``vit_h`` for the official sizes, else a description of this one."""
        official = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}
        return official.get((self.embed_dim, self.depth), f"vit (width {self.embed_dim}, depth {self.depth})")

    def config(self):
        """The transformers ``SamConfig`` of this architecture."""
        from transformers.models.sam.configuration_sam import (
            SamConfig,
            SamMaskDecoderConfig,
            SamPromptEncoderConfig,
            SamVisionConfig,
        )

        vision = SamVisionConfig(
            hidden_size=self.embed_dim,
            output_channels=self.prompt_dim,
            num_hidden_layers=self.depth,
            num_attention_heads=self.num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            layer_norm_eps=LAYER_NORM_EPS,
            window_size=self.window_size,
            global_attn_indexes=list(self.global_attn_indexes),
            num_pos_feats=self.prompt_dim // 2,
            mlp_dim=self.mlp_dim,
        )
        prompt = SamPromptEncoderConfig(
            hidden_size=self.prompt_dim,
            image_size=self.image_size,
            patch_size=self.patch_size,
            mask_input_channels=self.mask_in_chans,
            layer_norm_eps=LAYER_NORM_EPS,
        )
        decoder = SamMaskDecoderConfig(
            hidden_size=self.prompt_dim,
            mlp_dim=self.decoder_mlp_dim,
            num_hidden_layers=self.decoder_depth,
            num_attention_heads=DECODER_HEADS,
            attention_downsample_rate=self.attention_downsample_rate,
            num_multimask_outputs=self.num_multimask_outputs,
            iou_head_depth=self.iou_head_depth,
            iou_head_hidden_dim=self.iou_head_hidden_dim,
            layer_norm_eps=LAYER_NORM_EPS,
        )
        return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def load_sam(path: str | Path, device: str = "cpu"):
    """transformers' ``SamModel`` with the weights of the official checkpoint at ``path``, in eval mode.

    Returns ``(model, architecture)``. Raises :class:`CheckpointError` (naming the file) when the file is
    missing or unreadable, a tensor is missing, left over or of the wrong shape.
    """
    import torch
    from transformers.models.sam.modeling_sam import SamModel

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal or corrupt file: one line naming the file
        raise CheckpointError(f"checkpoint {path} cannot be read safely: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    try:
        architecture = SamArchitecture.of(state)
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {path} is not an official Segment Anything state dict: {exc}") from None
    with torch.device("meta"):  # no random initialisation of weights that are about to be replaced
        model = SamModel(architecture.config())
    weights = official_to_hf(state, _expected_shapes(model), architecture, path)
    model.load_state_dict(weights, strict=True, assign=True)
    model.prompt_encoder.shared_embedding = model.shared_image_embedding  # one tensor, tied as in the official model
    return model.to(device).eval(), architecture


def official_to_hf(
    state: dict, expected: dict[str, tuple[int, ...]], architecture: SamArchitecture, path: Path | str = "checkpoint"
) -> dict:
    """``state`` under transformers' names, each official tensor used exactly once, shapes checked.

    ``expected`` is the transformers model's parameter shapes by name. The prompt encoder's copy of the
    positional embedding is the image-wide one (tied), so the official matrix fills both.
    """
    renamed: dict = {}
    for key, tensor in state.items():
        target = _rename(key, architecture.iou_head_depth)
        if target is None or target not in expected:
            raise CheckpointError(f"checkpoint {path}: unexpected tensor '{key}'")
        if tuple(tensor.shape) != expected[target]:
            raise CheckpointError(
                f"checkpoint {path}: tensor '{key}' has shape {tuple(tensor.shape)}, expected {expected[target]}"
            )
        renamed[target] = tensor
    renamed["prompt_encoder.shared_embedding.positional_embedding"] = renamed.get(
        "shared_image_embedding.positional_embedding"
    )
    missing = sorted(name for name in expected if renamed.get(name) is None)
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing {len(missing)} tensor(s), first: '{missing[0]}'")
    return renamed


def _rename(key: str, iou_head_depth: int) -> str | None:
    for pattern, replacement in _RENAMES:
        match = re.fullmatch(pattern, key)
        if match is None:
            continue
        if replacement is None:  # official MLP layers 0..depth-1 are transformers' proj_in, layers.*, proj_out
            module, index, field = match.group(1), int(match.group(2)), match.group(3)
            depth = iou_head_depth if module == "iou_prediction_head" else HYPERNETWORK_DEPTH
            layer = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
            return f"mask_decoder.{module}.{layer}.{field}"
        return match.expand(replacement)
    return None


def _count(state: dict, pattern: str) -> int:
    """How many numbered modules ``pattern`` (with one group: the number) finds among ``state``'s keys."""
    numbers = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    if numbers != set(range(len(numbers))):
        raise KeyError(f"numbered modules {sorted(numbers)} of '{pattern}' are not 0..n-1")
    return len(numbers)


def _expected_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


VIT_B = SamArchitecture(
    image_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072, window_size=14,
    global_attn_indexes=(2, 5, 8, 11), prompt_dim=256, mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=2048,
    attention_downsample_rate=2, iou_head_hidden_dim=256, iou_head_depth=3, num_multimask_outputs=3,
)  # fmt: skip


def official_shapes(architecture: SamArchitecture) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint of ``architecture``, by official name, with its shape.

    Written from the official layout (not from :func:`official_to_hf`), so a random checkpoint made from it
    (:func:`write_random_checkpoint`) tests the renaming rather than repeating it.
    """
    a = architecture
    grid, head = a.image_size // a.patch_size, a.embed_dim // a.num_heads
    c, p, cross = a.embed_dim, a.prompt_dim, a.prompt_dim // a.attention_downsample_rate
    shapes = {
        "image_encoder.pos_embed": (1, grid, grid, c),
        "image_encoder.patch_embed.proj.weight": (c, 3, a.patch_size, a.patch_size),
        "image_encoder.patch_embed.proj.bias": (c,),
        "image_encoder.neck.0.weight": (p, c, 1, 1),
        "image_encoder.neck.2.weight": (p, p, 3, 3),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, p // 2),
        "prompt_encoder.not_a_point_embed.weight": (1, p),
        "prompt_encoder.no_mask_embed.weight": (1, p),
        "prompt_encoder.mask_downscaling.0.weight": (a.mask_in_chans // 4, 1, 2, 2),
        "prompt_encoder.mask_downscaling.0.bias": (a.mask_in_chans // 4,),
        "prompt_encoder.mask_downscaling.3.weight": (a.mask_in_chans, a.mask_in_chans // 4, 2, 2),
        "prompt_encoder.mask_downscaling.3.bias": (a.mask_in_chans,),
        "prompt_encoder.mask_downscaling.6.weight": (p, a.mask_in_chans, 1, 1),
        "prompt_encoder.mask_downscaling.6.bias": (p,),
        "mask_decoder.iou_token.weight": (1, p),
        "mask_decoder.mask_tokens.weight": (a.num_multimask_outputs + 1, p),
        "mask_decoder.output_upscaling.0.weight": (p, p // 4, 2, 2),
        "mask_decoder.output_upscaling.0.bias": (p // 4,),
        "mask_decoder.output_upscaling.3.weight": (p // 4, p // 8, 2, 2),
        "mask_decoder.output_upscaling.3.bias": (p // 8,),
    }
    norms = ["image_encoder.neck.1", "image_encoder.neck.3", "mask_decoder.transformer.norm_final_attn"]
    norms += [
        "prompt_encoder.mask_downscaling.1",
        "prompt_encoder.mask_downscaling.4",
        "mask_decoder.output_upscaling.1",
    ]
    widths = [p, p, p, a.mask_in_chans // 4, a.mask_in_chans, p // 4]
    for name, width in zip(norms, widths):
        shapes |= {f"{name}.weight": (width,), f"{name}.bias": (width,)}
    for i in range(4):
        shapes[f"prompt_encoder.point_embeddings.{i}.weight"] = (1, p)
    for i in range(a.depth):
        block = f"image_encoder.blocks.{i}"
        span = 2 * (grid if i in a.global_attn_indexes else a.window_size) - 1
        shapes |= _linear(f"{block}.attn.qkv", c, 3 * c) | _linear(f"{block}.attn.proj", c, c)
        shapes |= _linear(f"{block}.mlp.lin1", c, a.mlp_dim) | _linear(f"{block}.mlp.lin2", a.mlp_dim, c)
        shapes |= {f"{block}.attn.rel_pos_h": (span, head), f"{block}.attn.rel_pos_w": (span, head)}
        shapes |= {f"{block}.norm{n}.{f}": (c,) for n in (1, 2) for f in ("weight", "bias")}
    for i in range(a.decoder_depth):
        layer = f"mask_decoder.transformer.layers.{i}"
        shapes |= _attention(f"{layer}.self_attn", p, p) | _attention(f"{layer}.cross_attn_token_to_image", p, cross)
        shapes |= _attention(f"{layer}.cross_attn_image_to_token", p, cross)
        shapes |= _linear(f"{layer}.mlp.lin1", p, a.decoder_mlp_dim) | _linear(
            f"{layer}.mlp.lin2", a.decoder_mlp_dim, p
        )
        shapes |= {f"{layer}.norm{n}.{f}": (p,) for n in (1, 2, 3, 4) for f in ("weight", "bias")}
    shapes |= _attention("mask_decoder.transformer.final_attn_token_to_image", p, cross)
    for i in range(a.num_multimask_outputs + 1):
        shapes |= _mlp(f"mask_decoder.output_hypernetworks_mlps.{i}", [p, p, p, p // 8])
    iou_widths = [p] + [a.iou_head_hidden_dim] * (a.iou_head_depth - 1) + [a.num_multimask_outputs + 1]
    return shapes | _mlp("mask_decoder.iou_prediction_head", iou_widths)


def write_random_checkpoint(path: str | Path, architecture: SamArchitecture, seed: int = 0) -> Path:
    """Save a randomly initialised network of ``architecture`` as an official-format ``.pth`` state dict.

    For tests and benchmarks where the real weights are not at hand: same tensors, names and file format.
    Weights are normal with a 1/sqrt(fan-in) scale (norm weights 1), so activations stay of order one.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes(architecture).items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        tensor = torch.randn(shape, generator=generator) / fan_in**0.5
        is_norm_weight = name.endswith("weight") and len(shape) == 1
        state[name] = torch.ones(shape) if is_norm_weight else tensor
    torch.save(state, path)
    return Path(path)


def _linear(name: str, fan_in: int, fan_out: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (fan_out, fan_in), f"{name}.bias": (fan_out,)}


def _attention(name: str, width: int, inner: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for projection in ("q_proj", "k_proj", "v_proj"):
        shapes |= _linear(f"{name}.{projection}", width, inner)
    return shapes | _linear(f"{name}.out_proj", inner, width)


def _mlp(name: str, widths: list[int]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i, (fan_in, fan_out) in enumerate(pairwise(widths)):
        shapes |= _linear(f"{name}.layers.{i}", fan_in, fan_out)
    return shapes
