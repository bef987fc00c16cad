"""GeoPixel engine on a tiny random configuration of the published architecture (fp32, CPU).

What the engine promises, checked here: KV-cached decoding equals re-encoding the whole sequence per token
(the published method), a batch equals its queries one by one, the image takes exactly ``image_tokens``
positions, a given answer is grounded with one state per [SEG], and every parameter has one published name.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from geobatch.models.geopixel.config import GeoPixelConfig, ModelConfigError
from geobatch.models.geopixel.engine import GeoPixel, Query
from geobatch.models.geopixel.vision import hd_layout, tokens_per_image

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "plora_rank": 8,
    "plora_alpha": 16,
    "hd_num": 4,
    "vision_config": {
        "image_size": 56,
        "patch_size": 14,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    },
    "sam2_config": {
        "image_size": 64,
        "embed_dim": 8,
        "num_heads": 1,
        "stages": [1, 2, 1, 1],
        "global_att_blocks": [2],
        "window_spec": [4, 2, 2, 2],
        "window_pos_embed_bkg_spatial_size": [2, 2],
        "d_model": 32,
        "decoder_mlp_dim": 32,
        "decoder_num_heads": 2,
        "iou_head_hidden_dim": 16,
        "mask_in_chans": 4,
    },
}
STOP = 2


@pytest.fixture(scope="module")
def model() -> GeoPixel:
    torch.manual_seed(0)
    model = GeoPixel(GeoPixelConfig.from_dict(TINY)).eval()
    with torch.no_grad():  # Partial-LoRA starts at zero in a fresh layer; make it count
        for name, param in model.named_parameters():
            if "Plora_B" in name:
                param.normal_(std=0.05)
    return model


def _queries() -> list[Query]:
    rng = np.random.default_rng(7)
    sizes = [(70, 100), (130, 40), (56, 56)]
    prompts = [([1], [5, 6, 7, 8, 9]), ([1], [10, 11]), ([1], [12, 13, 14, 15, 16, 17, 18])]
    return [
        Query(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), before, after)
        for (h, w), (before, after) in zip(sizes, prompts, strict=True)
    ]


def _repeated_token(token_ids: tuple[int, ...]) -> int:
    """A token generated before the last position, to play the part of [SEG] in a random model."""
    return max(set(token_ids[:-1]), key=token_ids[:-1].count)


def test_kv_cached_decoding_equals_reencoding(model: GeoPixel) -> None:
    queries = _queries()
    probe = model.answer(queries[:1], max_new_tokens=10, stop_ids={STOP}, seg_token_id=-1)
    seg = _repeated_token(probe[0].token_ids)
    cached = model.answer(queries, max_new_tokens=10, stop_ids={STOP}, seg_token_id=seg)
    reencoded = model.answer(queries, max_new_tokens=10, stop_ids={STOP}, seg_token_id=seg, use_cache=False)
    assert cached[0].seg_states.shape[0] > 0
    for fast, slow in zip(cached, reencoded, strict=True):
        assert fast.token_ids == slow.token_ids
        assert fast.seg_states.shape == slow.seg_states.shape
        torch.testing.assert_close(fast.seg_states, slow.seg_states, atol=1e-5, rtol=1e-4)


def test_kv_cached_decoding_equals_reencoding_beyond_the_rope_table(model: GeoPixel) -> None:
    # dynamic NTK rescales every position once a sequence outgrows max_position_embeddings: the cached path
    # must then re-encode like the published code; here the first query crosses the limit while decoding
    queries = _queries()
    short = GeoPixel(replace(model.config, max_position_embeddings=36)).eval()
    short.load_state_dict(model.state_dict())
    prompt_length = 1 + model.image_tokens(70, 100) + 5
    seg = _repeated_token(short.answer(queries[:1], max_new_tokens=10, stop_ids=set(), seg_token_id=-1)[0].token_ids)
    cached = short.answer(queries, max_new_tokens=10, stop_ids=set(), seg_token_id=seg)
    reencoded = short.answer(queries, max_new_tokens=10, stop_ids=set(), seg_token_id=seg, use_cache=False)
    assert prompt_length < 36 < prompt_length + len(cached[0].token_ids)
    assert cached[0].seg_states.shape[0] > 0
    for fast, slow in zip(cached, reencoded, strict=True):
        assert fast.token_ids == slow.token_ids
        torch.testing.assert_close(fast.seg_states, slow.seg_states, atol=1e-5, rtol=1e-4)
    unscaled = model.answer(queries[:1], max_new_tokens=10, stop_ids=set(), seg_token_id=seg, use_cache=False)[0]
    assert not torch.allclose(unscaled.seg_states[-1], reencoded[0].seg_states[-1])  # the scaling did act


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_equals_single_queries(model: GeoPixel, use_cache: bool) -> None:
    queries = _queries()
    probes = model.answer(queries, max_new_tokens=10, stop_ids=set(), seg_token_id=-1)
    seg = _repeated_token(probes[1].token_ids)
    # a stop id that ends one row early while others go on: finished rows leave the batch
    early = next(t for t in probes[2].token_ids[2:6] if t != seg and t not in probes[1].token_ids)
    stops = {STOP, early}
    batch = model.answer(queries, max_new_tokens=10, stop_ids=stops, seg_token_id=seg, use_cache=use_cache)
    assert len({len(answer.token_ids) for answer in batch}) > 1
    assert batch[1].seg_states.shape[0] > 0
    for query, together in zip(queries, batch, strict=True):
        alone = model.answer([query], max_new_tokens=10, stop_ids=stops, seg_token_id=seg, use_cache=use_cache)[0]
        assert together.token_ids == alone.token_ids
        torch.testing.assert_close(together.seg_states, alone.seg_states, atol=1e-5, rtol=1e-4)


def test_stop_id_ends_an_answer(model: GeoPixel) -> None:
    query = _queries()[0]
    free = model.answer([query], max_new_tokens=6, stop_ids=set(), seg_token_id=-1)[0]
    assert len(free.token_ids) == 6
    stopped = model.answer([query], max_new_tokens=6, stop_ids={free.token_ids[2]}, seg_token_id=-1)[0]
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[2]) + 1]


def test_given_answer_is_grounded_like_the_generated_one(model: GeoPixel) -> None:
    query = _queries()[2]
    generated = model.answer([query], max_new_tokens=10, stop_ids=set(), seg_token_id=-1)[0]
    seg = _repeated_token(generated.token_ids)
    generated = model.answer([query], max_new_tokens=10, stop_ids=set(), seg_token_id=seg)[0]
    given = Query(query.image, query.before_image, query.after_image, answer=generated.token_ids)
    grounded = model.answer([given], max_new_tokens=10, stop_ids=set(), seg_token_id=seg)[0]
    assert grounded.token_ids == generated.token_ids
    assert grounded.seg_states.shape[0] == generated.token_ids.count(seg)  # a given last [SEG] counts too
    read = generated.seg_states.shape[0]
    torch.testing.assert_close(grounded.seg_states[:read], generated.seg_states, atol=1e-5, rtol=1e-4)


def test_image_tokens_equal_the_spliced_length(model: GeoPixel) -> None:
    for height, width in [(70, 100), (130, 40), (56, 56), (20, 300)]:
        image = np.zeros((height, width, 3), dtype=np.uint8)
        (embeds,) = model.vision([image])
        assert embeds.shape == (model.image_tokens(height, width), TINY["hidden_size"])
        prompt, image_mask = model._prompt(Query(image, [1, 3], [4]), embeds)
        assert len(prompt) == 3 + model.image_tokens(height, width) == 3 + int(image_mask.sum())


def test_hd_layout_of_the_published_geometry() -> None:
    # worked by hand from InternLM-XComposer2.5's rule, crop 560 and hd_num 9 (GeoPixel's setting)
    square = hd_layout(1000, 1000, crop=560, hd_num=9)
    assert (square.rows, square.cols, square.height, square.width) == (3, 3, 1680, 1680)
    assert tokens_per_image(square, grid=20) == (9 + 1) * 400 + 1 + 4 * 20
    portrait = hd_layout(1000, 300, crop=560, hd_num=9)
    assert (portrait.rows, portrait.cols, portrait.height, portrait.width) == (4, 2, 2240, 672)
    large = hd_layout(600, 3000, crop=560, hd_num=9)  # at least floor(long / 560) crops along the long side
    assert (large.rows, large.cols) == (1, 5)


def test_segment_gives_one_mask_per_seg_state(model: GeoPixel) -> None:
    queries = _queries()[:2]
    seg = _repeated_token(model.answer(queries[:1], max_new_tokens=10, stop_ids=set(), seg_token_id=-1)[0].token_ids)
    answers = model.answer(queries, max_new_tokens=10, stop_ids=set(), seg_token_id=seg)
    predictions = model.segment([query.image for query in queries], answers)
    for query, answer, prediction in zip(queries, answers, predictions, strict=True):
        assert prediction.masks.shape == (answer.seg_states.shape[0], *query.image.shape[:2])
    assert predictions[0].masks.shape[0] > 0
    assert model.segment([], []) == [] and model.answer([], max_new_tokens=3, stop_ids=set(), seg_token_id=seg) == []


def test_checkpoint_names_cover_every_tensor_once(model: GeoPixel) -> None:
    names = model.checkpoint_names()
    assert set(names) == set(model.state_dict())
    assert len(set(names.values())) == len(names)
    unused = model.unused_official_prefixes
    assert not [key for key in names.values() if key.startswith(unused)]
    assert "model.layers.1.attention.wqkv.Plora_A.weight" in names.values()
    assert names["vision.row_separator"] == "plora_sub_GN"
    assert "model.layers.1.feed_forward.w2.lora_web_A.weight".startswith(unused)


def test_bfloat16_model_decodes(model: GeoPixel) -> None:
    half = GeoPixel(model.config).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)
    answer = half.answer(_queries()[:1], max_new_tokens=3, stop_ids=set(), seg_token_id=-1)[0]
    assert len(answer.token_ids) == 3 and all(0 <= token < TINY["vocab_size"] for token in answer.token_ids)


def test_config_errors_name_the_file_and_field(tmp_path) -> None:
    missing = {key: value for key, value in TINY.items() if key != "vocab_size"}
    with pytest.raises(ModelConfigError, match="config.json.*vocab_size"):
        GeoPixelConfig.from_dict(missing)
    with pytest.raises(ModelConfigError, match="rope_scaling.type"):
        GeoPixelConfig.from_dict({**TINY, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    broken = tmp_path / "config.json"
    broken.write_text("{")
    with pytest.raises(ModelConfigError, match=str(broken)):
        GeoPixelConfig.from_file(broken)
