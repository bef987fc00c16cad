"""The InternLM2 decoder of GeoPixel, with Partial-LoRA applied only at image-token positions.

Parameter names follow the published checkpoint (``tok_embeddings``, ``layers.N.attention.wqkv`` ...), so
loading is a name-for-name copy. The pieces that transformers already keeps are used as they are: the
RMSNorm (``LlamaRMSNorm`` computes exactly InternLM2's), the rotary helper ``apply_rotary_pos_emb``,
``DynamicCache`` for the keys and values, and torch's ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from geobatch.models.geopixel.config import GeoPixelConfig


class PartialLoRALinear(nn.Linear):
    """A linear layer plus a low-rank update (``Plora_B @ Plora_A``) that only image tokens receive."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, rank: int, alpha: float) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.Plora_A = nn.Linear(in_features, rank, bias=False)
        self.Plora_B = nn.Linear(rank, out_features, bias=False)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor, image_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``image_rows``: indices of the image tokens in ``x`` flattened to [B*T, C]; None when there are none."""
        out = super().forward(x)
        if image_rows is not None:
            flat = x.reshape(-1, x.shape[-1]).index_select(0, image_rows)
            out.view(-1, out.shape[-1]).index_add_(0, image_rows, self.Plora_B(self.Plora_A(flat)) * self.scaling)
        return out


class RotaryEmbedding(nn.Module):
    """Cosines and sines for each token, with InternLM2's optional linear or dynamic-NTK scaling.

    Dynamic NTK, as the published code computes it: while a sequence of ``L`` tokens fits
    ``max_position_embeddings`` the base is ``rope_theta``; beyond it the base becomes
    ``theta * (factor * L / max_positions - (factor - 1)) ** (dim / (dim - 2))`` for *every* position,
    with ``L`` the row's whole length at that forward pass.
    """

    def __init__(self, config: GeoPixelConfig) -> None:
        super().__init__()
        self.dim = config.head_dim
        self.theta = float(config.rope_theta)
        self.max_positions = config.max_position_embeddings
        self.scaling_type = config.rope_scaling_type
        self.factor = config.rope_scaling_factor

    def _inverse_frequencies(self, length: int, device: torch.device) -> torch.Tensor:
        base = self.theta
        if self.scaling_type == "dynamic" and length > self.max_positions:
            base = self.theta * ((self.factor * length / self.max_positions) - (self.factor - 1)) ** (
                self.dim / (self.dim - 2)
            )
        # the same float32 arithmetic as the published code, so both give the same bits
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def forward(
        self, positions: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [B, T] of new tokens, ``valid`` [B, S] the real tokens so far -> cos, sin [B, T, head_dim]."""
        if self.scaling_type == "dynamic" and valid.shape[1] > self.max_positions:  # some row may be rescaled
            lengths = valid.sum(-1).tolist()
        else:  # no row is longer than the table: one base for all (and no device sync)
            lengths = [0] * valid.shape[0]
        inverse = torch.stack([self._inverse_frequencies(int(n), positions.device) for n in lengths])
        steps = positions.float()
        if self.scaling_type == "linear":
            steps = steps / self.factor
        angles = steps[:, :, None] * inverse[:, None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    """Grouped-query attention over the packed ``wqkv`` (per key/value head: its query group, key, value)."""

    def __init__(self, config: GeoPixelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        lora = {"rank": config.plora_rank, "alpha": config.plora_alpha}
        self.wqkv = PartialLoRALinear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=config.bias, **lora
        )
        self.wo = PartialLoRALinear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias, **lora)

    def forward(
        self,
        hidden: torch.Tensor,
        image_rows: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: DynamicCache | None,
        layer: int,
    ) -> torch.Tensor:
        batch, length, _ = hidden.shape
        qkv = self.wqkv(hidden, image_rows).view(batch, length, self.num_kv_heads, self.groups + 2, self.head_dim)
        query = qkv[..., : self.groups, :].reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = qkv[..., -2, :].transpose(1, 2)
        value = qkv[..., -1, :].transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *rotary)
        if cache is not None:
            key, value = cache.update(key, value, layer)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            is_causal=attention_mask is None and length > 1,  # see causal_padding_mask
            enable_gqa=self.groups > 1,
        )
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1), image_rows)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: GeoPixelConfig) -> None:
        super().__init__()
        lora = {"bias": False, "rank": config.plora_rank, "alpha": config.plora_alpha}
        self.w1 = PartialLoRALinear(config.hidden_size, config.intermediate_size, **lora)
        self.w3 = PartialLoRALinear(config.hidden_size, config.intermediate_size, **lora)
        self.w2 = PartialLoRALinear(config.intermediate_size, config.hidden_size, **lora)

    def forward(self, x: torch.Tensor, image_rows: torch.Tensor | None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x, image_rows)) * self.w3(x, image_rows), image_rows)


class DecoderLayer(nn.Module):
    def __init__(self, config: GeoPixelConfig) -> None:
        super().__init__()
        self.attention_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(
        self,
        hidden: torch.Tensor,
        image_rows: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: DynamicCache | None,
        layer: int,
    ) -> torch.Tensor:
        hidden = hidden + self.attention(self.attention_norm(hidden), image_rows, rotary, attention_mask, cache, layer)
        return hidden + self.feed_forward(self.ffn_norm(hidden), image_rows)


class InternLM2(nn.Module):
    """Token embeddings, the decoder layers and the final norm; the LM head lives with the engine."""

    def __init__(self, config: GeoPixelConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(
        self,
        embeds: torch.Tensor,
        image_mask: torch.Tensor,
        valid: torch.Tensor,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states of the new tokens ``embeds`` [B, T, H].

        ``valid`` [B, S] marks the real (not padding) tokens of the whole sequence so far, the cached ones
        and these ``T`` new ones; rows are left-padded, so a row's positions count its real tokens only.
        """
        new = embeds.shape[1]
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
        rotary = self.rotary(positions, valid, embeds.dtype)
        attention_mask = causal_padding_mask(valid, new)
        # Partial-LoRA rows, found once per pass rather than in each of the 5 x layers linear layers
        image_rows = image_mask.flatten().nonzero().flatten() if bool(image_mask.any()) else None
        hidden = embeds
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, image_rows, rotary, attention_mask, cache, index)
        return self.norm(hidden)


def causal_padding_mask(valid: torch.Tensor, new: int) -> torch.Tensor | None:
    """Boolean [B, 1, new, S] mask: each new token sees the real tokens up to itself.

    A padding query also sees itself, so that no softmax row is empty (its output is never used). None when
    no row is padded and the new tokens are one step or the whole sequence: SDPA's causal flag (or no mask)
    says the same without a [B, 1, S, S] tensor, and lets it pick its fastest kernel.
    """
    total = valid.shape[1]
    if new in (1, total) and bool(valid.all()):
        return None
    query_at = torch.arange(total - new, total, device=valid.device)[:, None]
    key_at = torch.arange(total, device=valid.device)[None, :]
    causal = key_at <= query_at
    return ((causal[None] & valid[:, None, :]) | (key_at == query_at)[None])[:, None]
