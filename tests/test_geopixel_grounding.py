"""The GeoPixel grounding head (SAM2 + text_hidden_fcs) on a tiny random configuration of the same architecture."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from geobatch.models.geopixel.grounding import GroundingConfig, GroundingHead, MaskPrediction

# Hiera with four stages (windowed, padded-window, pooling and global blocks), FPN, two-way decoder: all tiny.
TINY = {
    "image_size": 64,
    "embed_dim": 8,
    "num_heads": 1,
    "stages": [1, 2, 3, 1],
    "global_att_blocks": [4],
    "window_spec": [4, 2, 3, 2],
    "window_pos_embed_bkg_spatial_size": [3, 3],
    "d_model": 32,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
    "mask_in_chans": 8,
}
HIDDEN = 24
SAM2 = "model.visual_model."


def tiny_head(seed: int = 0) -> GroundingHead:
    torch.manual_seed(seed)
    head = GroundingHead(GroundingConfig.from_dict(TINY), HIDDEN)  # eval mode by construction
    with torch.no_grad():  # spread every tensor (transformers initialises some to zeros or ones)
        for parameter in head.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return head


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def head() -> GroundingHead:
    return tiny_head()


def test_from_dict_overrides_hiera_l_defaults_and_keeps_the_rest():
    config = GroundingConfig.from_dict(TINY)
    assert config.stages == (1, 2, 3, 1) and config.d_model == 32
    assert config.decoder_depth == GroundingConfig.hiera_l().decoder_depth == 2
    assert config.stage_dims == [8, 16, 32, 64]
    assert config.embedding_size == 4
    hiera_l = GroundingConfig.hiera_l()
    assert hiera_l.stage_dims == [144, 288, 576, 1152] and hiera_l.embedding_size == 64


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"stagess": [1, 1, 1, 1]}, "unknown setting"),
        ({"window_spec": [4, 2, 2]}, "sam2_config.window_spec"),
        ({"global_att_blocks": [3]}, "sam2_config.global_att_blocks"),  # block 3 starts a stage
        ({"scalp": 0}, "sam2_config.scalp"),
        ({"image_size": 72}, "sam2_config.image_size"),
        ({"decoder_depth": 3}, "sam2_config.decoder_depth"),
    ],
)
def test_from_dict_rejects_bad_settings_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        GroundingConfig.from_dict({**TINY, **override})


def test_checkpoint_names_round_trip_every_tensor_exactly_once(head):
    names = head.checkpoint_names()
    ours = head.state_dict()
    assert set(names) == set(ours)
    assert len(set(names.values())) == len(names), "two of our tensors map to one official key"
    assert all(key.startswith((SAM2, "model.text_hidden_fcs.0.")) for key in names.values())
    assert not [key for key in names.values() if key.startswith(head.UNUSED_OFFICIAL_PREFIXES)]

    official = {names[name]: tensor.clone() for name, tensor in ours.items()}
    back = {ours_name: official[official_name] for ours_name, official_name in names.items()}
    fresh = tiny_head(seed=1)
    fresh.load_state_dict(back, strict=True)  # also checks every shape
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, ours[name]), name


def test_checkpoint_names_follow_the_official_sam2_layout(head):
    official = set(head.checkpoint_names().values())
    trunk = SAM2 + "image_encoder.trunk."
    expected = {
        trunk + "patch_embed.proj.weight",
        trunk + "pos_embed",
        trunk + "pos_embed_window",
        trunk + "blocks.1.proj.weight",  # the first block of stage 2 widens the residual
        trunk + "blocks.6.norm1.weight",
        trunk + "blocks.6.mlp.layers.1.bias",
        SAM2 + "image_encoder.neck.convs.3.conv.weight",
        SAM2 + "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        SAM2 + "sam_prompt_encoder.no_mask_embed.weight",
        SAM2 + "sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
        SAM2 + "sam_mask_decoder.transformer.layers.0.mlp.layers.1.weight",
        SAM2 + "sam_mask_decoder.transformer.norm_final_attn.bias",
        SAM2 + "sam_mask_decoder.output_upscaling.1.weight",
        SAM2 + "sam_mask_decoder.output_hypernetworks_mlps.3.layers.2.weight",
        SAM2 + "sam_mask_decoder.iou_prediction_head.layers.1.weight",
        SAM2 + "sam_mask_decoder.pred_obj_score_head.layers.2.bias",
        SAM2 + "sam_mask_decoder.conv_s0.weight",
        SAM2 + "sam_mask_decoder.obj_score_token.weight",
        SAM2 + "no_mem_embed",
        "model.text_hidden_fcs.0.0.weight",
        "model.text_hidden_fcs.0.2.bias",
    }
    assert expected <= official
    assert not [key for key in official if ".layer_norm" in key or "proj_in" in key or "o_proj" in key]
    assert sum(key.endswith(".attn.qkv.weight") for key in official) == sum(TINY["stages"])


def test_hiera_l_head_has_the_official_shapes():
    with torch.device("meta"):  # shapes only: no memory, no time
        head = GroundingHead(GroundingConfig.hiera_l(), hidden_size=4096)
    shapes = {official: tuple(head.state_dict()[ours].shape) for ours, official in head.checkpoint_names().items()}
    trunk = SAM2 + "image_encoder.trunk."
    assert shapes[trunk + "patch_embed.proj.weight"] == (144, 3, 7, 7)
    assert shapes[trunk + "pos_embed"] == (1, 144, 7, 7)
    assert shapes[trunk + "pos_embed_window"] == (1, 144, 8, 8)
    assert shapes[trunk + "blocks.47.mlp.layers.0.weight"] == (4608, 1152)
    assert shapes[SAM2 + "image_encoder.neck.convs.0.conv.weight"] == (256, 1152, 1, 1)
    assert shapes[SAM2 + "sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight"] == (2048, 256)
    assert shapes[SAM2 + "sam_mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"] == (128, 256)
    assert shapes[SAM2 + "sam_mask_decoder.conv_s0.weight"] == (32, 256, 1, 1)
    assert shapes[SAM2 + "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] == (2, 128)
    assert shapes[SAM2 + "no_mem_embed"] == (1, 1, 256)
    assert shapes["model.text_hidden_fcs.0.0.weight"] == (4096, 4096)
    assert shapes["model.text_hidden_fcs.0.2.weight"] == (256, 4096)
    assert sum(key.endswith(".attn.qkv.weight") for key in shapes) == 48


def test_preprocess_resizes_to_the_square_input_and_normalises(head):
    rng = np.random.default_rng(0)
    flat = np.full((37, 91, 3), (200, 100, 0), dtype=np.uint8)
    pixels = head.preprocess([random_image(rng, 120, 30), flat])
    assert pixels.shape == (2, 3, 64, 64) and pixels.dtype == torch.float32
    config = head.config
    expected = [
        (value / 255 - mean) / std for value, mean, std in zip((200, 100, 0), config.pixel_mean, config.pixel_std)
    ]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(pixels[1, channel], torch.full((64, 64), value), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)]
)
def test_preprocess_rejects_what_is_not_rgb_uint8(head, bad):
    with pytest.raises(ValueError, match=r"images\[1\]: expected HxWx3 uint8 RGB"):
        head.preprocess([np.zeros((8, 8, 3), np.uint8), bad])


def test_image_features_round_the_embedding_to_bfloat16(head):
    features = head.image_features(head.preprocess([random_image(np.random.default_rng(1), 64, 64)]))
    embed = features.image_embed
    assert embed.shape == (1, 32, 4, 4) and embed.dtype == torch.float32
    assert torch.equal(embed, embed.to(torch.bfloat16).float())
    assert [tuple(level.shape) for level in features.high_res] == [(1, 4, 16, 16), (1, 8, 8, 8)]


def test_masks_one_per_seg_state_at_each_image_size(head):
    rng = np.random.default_rng(2)
    sizes = [(50, 70), (90, 40), (64, 64), (200, 130)]
    counts = [3, 0, 1, 2]
    features = head.image_features(head.preprocess([random_image(rng, *size) for size in sizes]))
    states = [torch.randn(count, HIDDEN) for count in counts]
    predictions = head.masks(features, states, sizes)
    assert len(predictions) == len(sizes)
    for prediction, size, count in zip(predictions, sizes, counts, strict=True):
        assert isinstance(prediction, MaskPrediction)
        assert prediction.logits.shape == (count, *size) and prediction.logits.dtype == torch.float32
        assert prediction.masks.shape == (count, *size) and prediction.masks.dtype == torch.bool
        assert prediction.scores.shape == (count,)
        assert torch.equal(prediction.masks, prediction.logits > 0)
        assert ((prediction.scores >= 0) & (prediction.scores <= 1)).all()  # sigmoid IoU predictions
    first = predictions[0].logits
    assert not torch.equal(first[0], first[1]), "different [SEG] states must give different masks"


def test_no_seg_states_give_no_masks(head):
    features = head.image_features(head.preprocess([random_image(np.random.default_rng(3), 20, 30)] * 2))
    predictions = head.masks(features, [torch.zeros(0, HIDDEN)] * 2, [(20, 30), (5, 7)])
    assert [tuple(p.logits.shape) for p in predictions] == [(0, 20, 30), (0, 5, 7)]
    assert [tuple(p.masks.shape) for p in predictions] == [(0, 20, 30), (0, 5, 7)]


def test_a_batch_of_images_equals_single_calls(head):
    rng = np.random.default_rng(4)
    images = [random_image(rng, 48, 80), random_image(rng, 100, 33), random_image(rng, 64, 64)]
    sizes = [image.shape[:2] for image in images]
    states = [torch.randn(2, HIDDEN), torch.randn(0, HIDDEN), torch.randn(3, HIDDEN)]
    batched = head.masks(head.image_features(head.preprocess(images)), states, sizes)
    for image, state, size, together in zip(images, states, sizes, batched, strict=True):
        (alone,) = head.masks(head.image_features(head.preprocess([image])), [state], [size])
        torch.testing.assert_close(together.logits, alone.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.scores, alone.scores, rtol=1e-5, atol=1e-5)


def test_masks_need_one_seg_state_tensor_and_one_size_per_image(head):
    features = head.image_features(head.preprocess([random_image(np.random.default_rng(5), 16, 16)]))
    with pytest.raises(ValueError, match="1 images but 2 seg_states and 1 sizes"):
        head.masks(features, [torch.randn(1, HIDDEN)] * 2, [(16, 16)])


def stability(logits: torch.Tensor, delta: float) -> torch.Tensor:
    return (logits > delta).flatten(1).sum(1) / (logits > -delta).flatten(1).sum(1).clamp(min=1)


@pytest.mark.parametrize("sharpness", [1.0, 300.0])
def test_eval_mode_keeps_the_single_mask_only_when_it_is_stable(sharpness):
    head = tiny_head(seed=6)
    with torch.no_grad():  # sharper single-mask logits pass SAM2's stability test
        head.mask_decoder.output_hypernetworks_mlps[0].proj_out.weight.mul_(sharpness)
    features = head.image_features(head.preprocess([random_image(np.random.default_rng(6), 64, 64)]))
    owner = torch.zeros(4, dtype=torch.long)
    prompts = head.prompt_embeddings(torch.randn(4, HIDDEN))
    chosen, chosen_scores = head._decode(features, owner, prompts)

    head.mask_decoder.dynamic_multimask_via_stability = False
    single, _ = head._decode(features, owner, prompts)
    head.mask_decoder.dynamic_multimask_via_stability = True
    count = prompts.shape[0]
    side = features.image_embed.shape[-1]
    multi, multi_scores, _, _ = head.mask_decoder(
        image_embeddings=features.image_embed[owner],
        image_positional_embeddings=head.dense_positional_encoding().expand(count, -1, -1, -1),
        sparse_prompt_embeddings=prompts[:, None, None, :],
        dense_prompt_embeddings=head.no_mask_embed.weight.view(1, -1, 1, 1).expand(count, -1, side, side),
        multimask_output=True,
        high_resolution_features=[level[owner] for level in features.high_res],
    )
    best = multi_scores[:, 0].argmax(-1)
    stable = stability(single, head.config.dynamic_multimask_stability_delta) >= 0.98
    assert stable.all() if sharpness > 1 else not stable.any()
    for index in range(count):
        expected = single[index] if stable[index] else multi[index, 0, best[index]]
        torch.testing.assert_close(chosen[index], expected)
        if not stable[index]:
            torch.testing.assert_close(chosen_scores[index], multi_scores[index, 0, best[index]])


def test_bfloat16_head_runs_and_returns_float32_logits():
    head = tiny_head(seed=7).to(torch.bfloat16)
    features = head.image_features(head.preprocess([random_image(np.random.default_rng(7), 30, 50)]))
    assert features.image_embed.dtype == torch.bfloat16
    (prediction,) = head.masks(features, [torch.randn(2, HIDDEN)], [(30, 50)])
    assert prediction.logits.dtype == torch.float32 and prediction.logits.shape == (2, 30, 50)
    assert torch.isfinite(prediction.logits).all()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GroundingConfig.hiera_l().d_model = 3  # type: ignore[misc]
