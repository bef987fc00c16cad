"""``GeoPixel``: the whole model (language, vision, grounding) and its batched, KV-cached greedy decoding.

One call answers a batch of queries: every image goes through the CLIP tower in one pass, each prompt is
``before_image`` ids, the image's embeddings, ``after_image`` ids, and the prompts are left-padded into
one batch. Decoding is greedy with a KV cache (``use_cache=False`` re-encodes the whole sequence for
every new token, as the published code does: slower, used to check the cache).

The ``[SEG]`` states are the final normalised hidden states at the positions where ``[SEG]`` tokens sit in
the sequence the model read, i.e. the state of the step that *consumes* a ``[SEG]`` (the published code
takes them from the last re-encoding, which is the same thing). A ``[SEG]`` that is the very last token
generated is never read and so has no state, as in the published code.

Beyond ``max_position_embeddings``, dynamic-NTK scaling rescales every position at every step, which a KV
cache cannot follow; there decoding re-encodes, so both paths give the published result at any length.
One difference from the published inference, on purpose: prompts are never cut to 16 384 tokens (the
published code silently drops the user prompt behind a large image).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from geobatch.models.geopixel.config import GeoPixelConfig
from geobatch.models.geopixel.grounding import GroundingConfig, GroundingHead, MaskPrediction
from geobatch.models.geopixel.language import InternLM2
from geobatch.models.geopixel.vision import VisionEncoder

_LORA_LAYERS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_UNUSED_ADAPTERS = ("lora_sft_", "lora_dpo_", "lora_web_")  # InternLM-XComposer's writing/web adapters


@dataclass(frozen=True)
class Query:
    """One image and its prompt, as token ids around the image; ``answer`` to ground a given answer."""

    image: np.ndarray  # HxWx3 uint8 RGB
    before_image: Sequence[int]  # the published template puts the image right after BOS: [BOS]
    after_image: Sequence[int]  # "[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    answer: Sequence[int] | None = None  # teacher-forced answer to ground (no generation)

    def __post_init__(self) -> None:
        image = self.image
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"Query.image: expected an HxWx3 uint8 RGB array, got {_describe(image)}")


@dataclass(frozen=True)
class Answer:
    """Answer tokens (generated ones end with the stop id when one came) and the states of their [SEG]s."""

    token_ids: tuple[int, ...]
    seg_states: torch.Tensor  # [n_seg, hidden], final normalised hidden states at the [SEG] tokens


@dataclass(frozen=True)
class _Batch:
    """Left-padded prompts: embeddings [B, T, H], which tokens are image tokens and which are real."""

    embeds: torch.Tensor
    image_mask: torch.Tensor
    valid: torch.Tensor


class GeoPixel(nn.Module):
    """InternLM2 + ``output`` head + CLIP vision + SAM2 grounding; float32 as built, ``.to()`` for bf16/GPU."""

    def __init__(self, config: GeoPixelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = InternLM2(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vision = VisionEncoder(config)
        self.grounding = GroundingHead(GroundingConfig.from_dict(config.sam2_config), config.hidden_size)

    def image_tokens(self, height: int, width: int) -> int:
        """Sequence length an image of this size takes in the prompt."""
        return self.vision.image_tokens(height, width)

    @torch.inference_mode()
    def answer(
        self,
        queries: Sequence[Query],
        *,
        max_new_tokens: int,
        stop_ids: Collection[int],
        seg_token_id: int,
        use_cache: bool = True,
    ) -> list[Answer]:
        """Greedy answers (or grounded given answers) for a batch of queries, in order."""
        if not queries:
            return []
        images = self.vision([query.image for query in queries])
        answers: list[Answer | None] = [None] * len(queries)
        given = [i for i, query in enumerate(queries) if query.answer is not None]
        free = [i for i, query in enumerate(queries) if query.answer is None]
        if given:
            grounded = self._ground([queries[i] for i in given], [images[i] for i in given], seg_token_id)
            for i, answer in zip(given, grounded, strict=True):
                answers[i] = answer
        if free:
            batch = self._batch([self._prompt(queries[i], images[i]) for i in free])
            generated = self._generate(batch, max_new_tokens, frozenset(stop_ids), seg_token_id, use_cache)
            for i, answer in zip(free, generated, strict=True):
                answers[i] = answer
        return answers  # type: ignore[return-value]  # every slot was filled above

    @torch.inference_mode()
    def segment(self, images: Sequence[np.ndarray], answers: Sequence[Answer]) -> list[MaskPrediction]:
        """One mask per [SEG] state of each answer, at its image's size."""
        if not images:
            return []
        features = self.grounding.image_features(self.grounding.preprocess(images))
        sizes = [(image.shape[0], image.shape[1]) for image in images]
        return self.grounding.masks(features, [answer.seg_states for answer in answers], sizes)

    def checkpoint_names(self) -> dict[str, str]:
        """Every parameter and persistent buffer of ours -> its key in the published checkpoint."""
        names = {f"model.{key}": f"model.{key}" for key in self.model.state_dict()}
        names.update({f"output.{key}": f"output.{key}" for key in self.output.state_dict()})
        names.update({f"vision.{ours}": theirs for ours, theirs in self.vision.checkpoint_names().items()})
        names.update({f"grounding.{ours}": theirs for ours, theirs in self.grounding.checkpoint_names().items()})
        return names

    @property
    def unused_official_prefixes(self) -> tuple[str, ...]:
        """Published keys that this model does not use (unused LoRA adapters, CLIP's pooled norm, SAM2 memory)."""
        adapters = tuple(
            f"model.layers.{index}.{layer}.{adapter}"
            for index in range(self.config.num_hidden_layers)
            for layer in _LORA_LAYERS
            for adapter in _UNUSED_ADAPTERS
        )
        return adapters + VisionEncoder.UNUSED_OFFICIAL_PREFIXES + GroundingHead.UNUSED_OFFICIAL_PREFIXES

    # -- prompts ---------------------------------------------------------------------------------------

    def _embed(self, ids: Sequence[int]) -> torch.Tensor:
        return self.model.tok_embeddings(torch.tensor(list(ids), dtype=torch.long, device=self.output.weight.device))

    def _prompt(self, query: Query, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A query's embeddings [L, H] and its image mask [L]."""
        parts = [self._embed(query.before_image), image, self._embed(query.after_image)]
        image_mask = torch.zeros(sum(len(part) for part in parts), dtype=torch.bool, device=image.device)
        image_mask[len(parts[0]) : len(parts[0]) + len(image)] = True
        return torch.cat(parts), image_mask

    def _batch(self, prompts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> _Batch:
        """Left-pad prompts into one batch (the padding is masked out, its embeddings are zeros)."""
        longest = max(len(embeds) for embeds, _ in prompts)
        first = prompts[0][0]
        embeds = first.new_zeros(len(prompts), longest, first.shape[1])
        image_mask = torch.zeros(len(prompts), longest, dtype=torch.bool, device=first.device)
        valid = torch.zeros(len(prompts), longest, dtype=torch.bool, device=first.device)
        for row, (prompt, mask) in enumerate(prompts):
            embeds[row, longest - len(prompt) :] = prompt
            image_mask[row, longest - len(prompt) :] = mask
            valid[row, longest - len(prompt) :] = True
        return _Batch(embeds, image_mask, valid)

    def _next_ids(self, hidden: torch.Tensor) -> list[int]:
        return self.output(hidden[:, -1]).float().argmax(-1).tolist()

    # -- decoding --------------------------------------------------------------------------------------

    def _ground(self, queries: Sequence[Query], images: Sequence[torch.Tensor], seg_token_id: int) -> list[Answer]:
        """Teacher-forced: one pass over prompt + given answer; one state per [SEG] in the answer."""
        prompts = []
        for query, image in zip(queries, images, strict=True):
            embeds, image_mask = self._prompt(query, image)
            answer = self._embed(query.answer or ())
            prompts.append((torch.cat([embeds, answer]), torch.cat([image_mask, image_mask.new_zeros(len(answer))])))
        batch = self._batch(prompts)
        hidden = self.model(batch.embeds, batch.image_mask, batch.valid)
        results = []
        for row, query in enumerate(queries):
            ids = tuple(query.answer or ())
            at = [hidden.shape[1] - len(ids) + j for j, token in enumerate(ids) if token == seg_token_id]
            results.append(Answer(token_ids=ids, seg_states=hidden[row, at]))
        return results

    def _generate(
        self, batch: _Batch, max_new_tokens: int, stop_ids: frozenset[int], seg_token_id: int, use_cache: bool
    ) -> list[Answer]:
        """Greedy decoding of a left-padded batch, with the KV cache or by re-encoding every step.

        With the cache, a [SEG]'s state comes from the step that reads it. Once a row outgrows
        ``max_position_embeddings`` under dynamic-NTK scaling, every position's rotation changes with the length,
        which the cache cannot follow: from then on each step re-encodes the whole sequence, as the published
        code always does, and a row's [SEG] states come from the pass that produced its last token.
        """
        rows, prompt_length = batch.embeds.shape[:2]
        lengths = batch.valid.sum(-1).tolist()  # each row's real prompt length
        tokens: list[list[int]] = [[] for _ in range(rows)]
        states: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        live = list(range(rows)) if max_new_tokens > 0 else []  # the rows still decoding, in batch order
        cache = DynamicCache() if use_cache else None
        prompt, prompt_mask, valid = batch.embeds, batch.image_mask, batch.valid
        while live:
            steps = len(tokens[live[0]])  # every live row has as many tokens
            if cache is not None and self._rescaled(max(lengths[row] for row in live) + steps):
                cache = None
            if cache is None:  # the whole sequence: prompt and every token fed back
                ids = torch.tensor([tokens[row] for row in live], dtype=torch.long, device=valid.device)
                embeds = torch.cat([prompt, self.model.tok_embeddings(ids.reshape(len(live), steps))], dim=1)
                image_mask = torch.cat([prompt_mask, prompt_mask.new_zeros(len(live), steps)], dim=1)
                hidden = self.model(embeds, image_mask, valid)
            elif steps == 0:
                hidden = self.model(prompt, prompt_mask, valid, cache)
            else:
                last = self._embed([tokens[row][-1] for row in live])[:, None]
                hidden = self.model(last, prompt_mask.new_zeros(len(live), 1), valid, cache)
            next_ids = self._next_ids(hidden)
            keep = []
            for i, row in enumerate(live):
                if cache is not None and tokens[row] and tokens[row][-1] == seg_token_id:
                    states[row].append(hidden[i, -1])
                tokens[row].append(next_ids[i])
                if next_ids[i] not in stop_ids and len(tokens[row]) < max_new_tokens:
                    keep.append(i)
                elif cache is None:
                    read = tokens[row][:-1]
                    at = [prompt_length + j for j, token in enumerate(read) if token == seg_token_id]
                    states[row] = list(hidden[i, at])
            valid = torch.cat([valid, valid.new_ones(len(live), 1)], dim=1)
            if len(keep) < len(live):  # finished rows leave the batch (and their keys and values the cache)
                index = torch.tensor(keep, dtype=torch.long, device=valid.device)
                if cache is not None and keep:
                    cache.batch_select_indices(index)
                prompt, prompt_mask, valid = prompt[index], prompt_mask[index], valid[index]
                live = [live[i] for i in keep]
        return [_answer(ids, found, batch.embeds) for ids, found in zip(tokens, states, strict=True)]

    def _rescaled(self, length: int) -> bool:
        """Whether dynamic-NTK scaling acts on a sequence of ``length`` tokens (it outgrows the table)."""
        config = self.config
        return config.rope_scaling_type == "dynamic" and length > config.max_position_embeddings


def _answer(ids: Sequence[int], states: Sequence[torch.Tensor], like: torch.Tensor) -> Answer:
    seg_states = torch.stack(list(states)) if states else like.new_zeros(0, like.shape[-1])
    return Answer(token_ids=tuple(ids), seg_states=seg_states)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
