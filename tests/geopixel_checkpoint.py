"""Tiny GeoPixel checkpoints for tests: the real architecture at toy sizes, saved as the official release is.

:func:`write_checkpoint` builds our GeoPixel model from :func:`tiny_config` with random weights, renames
its tensors to the official names (``checkpoint_names()``), adds a few official tensors that GeoPixel
does not use (a ``lora_sft`` adapter, SAM2 memory modules), and writes the folder the official release
ships: ``config.json``, ``pytorch_model-0000K-of-0000N.bin`` shards with ``pytorch_model.bin.index.json``
(or ``model.safetensors`` / safetensors shards with an index), a SentencePiece ``tokenizer.model`` trained
here on a few built-in sentences with InternLM2's chat markers as user-defined pieces, and
``added_tokens.json`` with ``[SEG]``, ``<p>``, ``</p>`` numbered after it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

CHAT_MARKERS = tuple(f"[UNUSED_TOKEN_{n}]" for n in range(141, 147))  # InternLM2's, [UNUSED_TOKEN_146] opens a turn
ADDED_TOKENS = ("[SEG]", "<p>", "</p>")
TRAINING_TEXT = """\
The image is an aerial view of a tennis court complex surrounded by dense greenery, with lush trees.
Could you provide a segmentation mask for the red car in this image?
Can you provide a thorough description of this image? Please output with interleaved segmentation masks.
A river crosses farmland; small ponds and wetlands lie between fields, roads and a town.
Water bodies, vegetation, buildings, bare soil and a parking lot with white cars near the highway.
"""

# Official tensors GeoPixel does not use, with toy shapes: the loader must skip them by design.
UNUSED_EXTRAS = {
    "model.layers.0.attention.wqkv.lora_sft_A.weight": (8, 64),
    "model.layers.0.attention.wqkv.lora_sft_B.weight": (128, 8),
    "model.visual_model.maskmem_tpos_enc": (7, 1, 1, 16),
    "model.visual_model.memory_attention.layers.0.self_attn.q_proj.weight": (16, 16),
}


def write_tokenizer(directory: Path) -> int:
    """``tokenizer.model`` and ``added_tokens.json`` in ``directory``; returns the vocabulary size in use."""
    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()),
        model_writer=proto,
        vocab_size=400,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,  # as InternLM2: any text encodes
        user_defined_symbols=list(CHAT_MARKERS),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(proto.getvalue())
    pieces = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue()).get_piece_size()
    added = {token: pieces + number for number, token in enumerate(ADDED_TOKENS)}
    (directory / "added_tokens.json").write_text(json.dumps(added))
    return pieces + len(added)


def tiny_config(vocab_size: int) -> dict:
    """An InternLM-XComposer2-style ``config.json`` at toy sizes, with tiny CLIP and SAM2 settings."""
    return {
        "architectures": ["GeoPixelForCausalLM"],
        "model_type": "internlmxcomposer2",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "bias": False,
        "plora_rank": 8,
        "plora_alpha": 8,
        "hd_num": 4,
        "vision_config": {
            "image_size": 28,
            "patch_size": 14,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "sam2_config": {
            "image_size": 64,
            "embed_dim": 8,
            "num_heads": 1,
            "stages": [1, 1, 1, 1],
            "global_att_blocks": [0],
            "window_spec": [4, 2, 2, 1],
            "window_pos_embed_bkg_spatial_size": [2, 2],
            "d_model": 16,
            "decoder_mlp_dim": 32,
            "decoder_num_heads": 2,
            "iou_head_hidden_dim": 16,
            "mask_in_chans": 4,
        },
    }


def official_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """``model``'s tensors under their official names, plus :data:`UNUSED_EXTRAS` (random)."""
    generator = torch.Generator().manual_seed(seed)
    names = model.checkpoint_names()
    state = {names[key]: tensor.detach().clone() for key, tensor in model.state_dict().items()}
    state |= {key: torch.randn(shape, generator=generator) for key, shape in UNUSED_EXTRAS.items()}
    return state


def steer_to(state: dict[str, torch.Tensor], token_id: int) -> None:
    """Make greedy decoding say ``token_id`` at every step, whatever the input (in place, official names).

    Random weights rarely say ``[SEG]``; a test of what follows generation (masks, phrases, the catalog)
    needs it said. One hidden dimension is made a constant: every token embedding and every image token
    (the projector's bias) write +4 into it, no layer writes into it (its rows of ``wo``, ``w2`` and their
    Partial-LoRA ``B`` are zero), so after the final norm it is positive at every position; only
    ``token_id``'s row of the output head reads it, with a weight large enough to win the argmax.
    """
    dim = state["model.norm.weight"].shape[0] - 1
    state["model.tok_embeddings.weight"][:, dim] = 4.0
    for key, tensor in state.items():
        if key.startswith("model.layers.") and (".wo." in key or ".w2." in key) and not key.endswith("Plora_A.weight"):
            tensor[dim] = 0.0
    state["vision_proj.2.weight"][dim] = 0.0
    state["vision_proj.2.bias"][dim] = 4.0
    state["model.norm.weight"][dim] = 1.0
    state["output.weight"][:, dim] = 0.0
    state["output.weight"][token_id, dim] = 1000.0


def write_weights(directory: Path, state: dict[str, torch.Tensor], weight_format: str, shards: int) -> None:
    """``state`` in ``shards`` files as the official layout names them (``bin`` or ``safetensors``)."""
    from safetensors.torch import save_file

    keys = sorted(state)
    groups = [keys[k::shards] for k in range(shards)]
    if weight_format == "bin":
        names = [f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin" for k in range(shards)]
        index = "pytorch_model.bin.index.json"
    else:
        names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
        index = "model.safetensors.index.json"
    if shards == 1:
        names = ["pytorch_model.bin" if weight_format == "bin" else "model.safetensors"]
    for name, group in zip(names, groups, strict=True):
        tensors = {key: state[key].contiguous() for key in group}
        if weight_format == "bin":
            torch.save(tensors, directory / name)
        else:
            save_file(tensors, directory / name, metadata={"format": "pt"})
    if shards > 1:
        weight_map = {key: name for name, group in zip(names, groups, strict=True) for key in group}
        total = sum(t.numel() * t.element_size() for t in state.values())
        (directory / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def build_tiny_model(config: dict, seed: int = 0):
    """Our GeoPixel model for ``config``, randomly initialised from ``seed`` (float32, CPU)."""
    from geobatch.models.geopixel.config import GeoPixelConfig
    from geobatch.models.geopixel.engine import GeoPixel

    torch.manual_seed(seed)
    return GeoPixel(GeoPixelConfig.from_dict(config)).eval()


def write_checkpoint(
    directory: Path, weight_format: str = "bin", shards: int = 3, seed: int = 0, steer_to_seg: bool = False
) -> Path:
    """A tiny GeoPixel checkpoint folder in the official layout (see the module doc); returns ``directory``.

    ``steer_to_seg``: greedy decoding then answers ``[SEG]`` at every step (see :func:`steer_to`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(write_tokenizer(directory))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = official_state(build_tiny_model(config, seed), seed)
    if steer_to_seg:
        steer_to(state, json.loads((directory / "added_tokens.json").read_text())["[SEG]"])
    write_weights(directory, state, weight_format, shards)
    return directory
