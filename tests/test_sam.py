"""The Segment Anything backend with a tiny random network of the official architecture, saved as an
official-format checkpoint and loaded through the real loader; the pipeline runs on a crop of a real NAIP
scene with real Ray, and prompts come from real vector files in another CRS."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import torch
from conftest import NAIP_2010, write_job
from pyproj import Transformer
from rasterio.windows import Window
from typer.testing import CliRunner

from geobatch.cli import EXIT_BAD_JOB, app
from geobatch.errors import JobSpecError
from geobatch.jobs import load_job
from geobatch.models.base import Prompt, TileInput, load_model
from geobatch.models.sam_checkpoint import (
    CheckpointError,
    SamArchitecture,
    load_sam,
    official_shapes,
    write_random_checkpoint,
)
from geobatch.models.sam_masks import box_iou, mask_boxes
from geobatch.pipeline import run_job
from geobatch.prompt_features import PromptFeatures
from geobatch.scenes import Scene, SceneReader, discover, open_scene
from geobatch.tiling import TileGrid, plan_tiles

TINY = SamArchitecture(
    image_size=256, patch_size=16, embed_dim=32, depth=3, num_heads=2, mlp_dim=64, window_size=4,
    global_attn_indexes=(1,), prompt_dim=32, mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=64,
    attention_downsample_rate=2, iou_head_hidden_dim=32, iou_head_depth=3, num_multimask_outputs=3,
)  # fmt: skip
CROP = Window(300, 200, 192, 192)  # a fully valid part of the NAIP scene: 2 x 2 tiles of 96 + 16 overlap
GRID = TileGrid(96, 16)
RGB = {"red": 1, "green": 2, "blue": 3}
PROMPT = [{"text": "objects", "label": "object"}]
EVERYTHING = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
# Prompt features as boxes in the crop's pixels (col0, row0, col1, row1): inside one core, across a seam,
# across the four-tile corner, in the last tile; and two outside the scene.
FEATURES = {
    "a": (10, 10, 40, 40),
    "b": (80, 20, 120, 60),
    "c": (85, 85, 110, 110),
    "d": (130, 140, 170, 180),
    "out-east": (400, 20, 450, 60),
    "out-north": (20, -90, 60, -40),
}
INSIDE = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("sam") / "sam_tiny_random.pth", TINY, seed=1)


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory) -> Path:
    """A 192 x 192 crop of the NAIP 2010 scene (EPSG:26914), as its own GeoTIFF."""
    path = tmp_path_factory.mktemp("scene") / "naip_crop.tif"
    with rasterio.open(NAIP_2010) as source:
        profile = source.profile | {
            "width": CROP.width,
            "height": CROP.height,
            "transform": source.window_transform(CROP),
        }
        profile |= {"blockxsize": 64, "blockysize": 64}
        with rasterio.open(path, "w", **profile) as target:
            target.write(source.read(window=CROP))
    return path


def prompt_frame(scene_file: Path, crs: str = "EPSG:4326") -> gpd.GeoDataFrame:
    """:data:`FEATURES` as polygons in ``crs`` with an id and two attributes."""
    with rasterio.open(scene_file) as scene:
        transform, scene_crs = scene.transform, scene.crs
    to_crs = Transformer.from_crs(scene_crs, crs, always_xy=True)
    polygons = []
    for c0, r0, c1, r1 in FEATURES.values():
        ring = [transform @ corner for corner in [(c0, r0), (c1, r0), (c1, r1), (c0, r1)]]
        polygons.append(shapely.Polygon([to_crs.transform(x, y) for x, y in ring]))
    ids = list(FEATURES)
    return gpd.GeoDataFrame(
        {"id": ids, "name": [f"field {i}" for i in ids], "year": [1990 + k for k in range(len(ids))]},
        geometry=polygons,
        crs=crs,
    )


def write_prompts(frame: gpd.GeoDataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_file(path, driver={".gpkg": "GPKG", ".geojson": "GeoJSON"}[path.suffix])
    return path


def open_crop(scene_file: Path, values: str = "display") -> Scene:
    spec = load_job(write_job(scene_file.parent / "job.yaml", scenes=[str(scene_file)], bands=RGB))
    (ref,), _ = discover(spec)
    return open_scene(ref, ("red", "green", "blue"), values=values)


def tile_inputs(scene_file: Path) -> list[TileInput]:
    """Every tile of the crop as the pipeline's workers read it (display values, grid of the read window)."""
    scene = open_crop(scene_file)
    reader = SceneReader()
    inputs = []
    for tile in plan_tiles(scene.scene_id, scene.shape, GRID):
        pixels = reader.read(scene, tile.read_window, ("red", "green", "blue"))
        inputs.append(TileInput(tile, pixels.bands, pixels.valid, scene.geobox[tile.read_window.toslices()]))
    return inputs


def test_a_random_checkpoint_in_the_official_format_loads_through_the_real_loader(checkpoint):
    model, architecture = load_sam(checkpoint)
    assert architecture == TINY  # sizes, heads and global blocks read back from the tensors' shapes
    state = torch.load(checkpoint, weights_only=True)
    assert set(state) == set(official_shapes(TINY))
    loaded = model.state_dict()
    assert torch.equal(loaded["vision_encoder.layers.1.attn.rel_pos_h"], state["image_encoder.blocks.1.attn.rel_pos_h"])
    assert torch.equal(loaded["mask_decoder.upscale_conv2.weight"], state["mask_decoder.output_upscaling.3.weight"])
    assert torch.equal(
        loaded["mask_decoder.iou_prediction_head.proj_out.bias"],
        state["mask_decoder.iou_prediction_head.layers.2.bias"],
    )
    tied = model.prompt_encoder.shared_embedding.positional_embedding
    assert torch.equal(tied, state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    assert [layer.window_size for layer in model.vision_encoder.layers] == [4, 0, 4]  # 0: global attention


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update({"mask_decoder.iou_token.weight": torch.zeros(1, 8)}), "'mask_decoder.iou_token.weight'"),
        (lambda s: s.update({"image_encoder.extra": torch.zeros(1)}), "unexpected tensor 'image_encoder.extra'"),
        (lambda s: s.pop("prompt_encoder.no_mask_embed.weight"), "missing 1 tensor(s)"),
        (lambda s: s.update({"not_a_tensor": Path("x")}), "cannot be read safely"),  # weights_only refuses it
    ],
)
def test_a_checkpoint_that_is_not_laid_out_as_the_official_one_is_refused_naming_it(
    checkpoint, tmp_path, change, message
):
    state = torch.load(checkpoint, weights_only=True)
    change(state)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="bad.pth") as error:
        load_sam(bad)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_models_command_says_whether_a_checkpoint_loads(checkpoint, tmp_path):
    def sam_line(*arguments: str) -> str:
        listed = CliRunner().invoke(app, ["models", *arguments])
        assert listed.exit_code == 0
        return next(row for row in listed.output.splitlines() if row.startswith("sam\t"))

    assert sam_line("--weights", str(checkpoint)).endswith(f"present: {checkpoint.name} ({TINY.name})")
    assert "needs weights" in sam_line()
    assert "missing: no sam_vit_*.pth" in sam_line("--weights", str(tmp_path))
    (tmp_path / "sam_vit_b_broken.pth").write_bytes(b"not a checkpoint")
    assert "cannot be read safely" in sam_line("--weights", str(tmp_path))


def test_everything_returns_filtered_non_overlapping_instances_with_their_measures(checkpoint, scene_file):
    model = load_model("sam", {"checkpoint": str(checkpoint), **EVERYTHING, "box_nms_thresh": 0.5})
    tile = tile_inputs(scene_file)[0]
    (found,) = model(tile, [Prompt("objects", "class", "object")]).instances.values()
    assert found
    for instance in found:
        assert instance.mask.dtype == bool and instance.mask.shape == tile.valid.shape and instance.mask.any()
        assert isinstance(instance.score, float) and instance.phrase == "objects" and instance.prompt_id is None
        assert 0 <= instance.attributes["stability_score"] <= 1
    boxes = mask_boxes(torch.from_numpy(np.stack([i.mask for i in found])))
    overlaps = box_iou(boxes, boxes).fill_diagonal_(0)
    assert (overlaps <= 0.5).all()  # NMS within the tile


def test_the_quality_filters_drop_what_fails_them(checkpoint, scene_file):
    tile = tile_inputs(scene_file)[0]
    options = {"checkpoint": str(checkpoint), **EVERYTHING}
    everything = load_model("sam", options)(tile, [Prompt("objects", "class", "object")]).instances["object"]
    threshold = float(np.median([i.attributes["stability_score"] for i in everything]))
    stable = load_model("sam", options | {"stability_score_thresh": threshold})
    kept = stable(tile, [Prompt("objects", "class", "object")]).instances["object"]
    assert kept and all(i.attributes["stability_score"] >= threshold for i in kept)
    nothing = load_model("sam", options | {"mask_threshold": 1e9})  # every candidate mask is empty
    assert nothing(tile, [Prompt("objects", "class", "object")]).instances == {"object": []}


def test_the_image_encoder_runs_once_per_tile_for_all_its_prompts(checkpoint, scene_file, tmp_path):
    inside_first_tile = prompt_frame(scene_file).iloc[[0, 1, 2]]  # a, b, c all reach tile (0, 0)
    prompts = write_prompts(inside_first_tile, tmp_path / "prompts.gpkg")
    model = load_model("sam", {"checkpoint": str(checkpoint), "mode": "prompts", "prompts_file": str(prompts)})
    calls = []
    model.sam.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    result = model(tile_inputs(scene_file)[0], [Prompt("objects", "class", "object")])
    assert len(calls) == 1
    assert sorted(i.prompt_id for i in result.instances["object"]) == ["a", "b", "c"]


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet", ".geojson"])
def test_prompt_features_from_any_format_and_crs_land_on_their_pixels(scene_file, tmp_path, suffix):
    path = write_prompts(prompt_frame(scene_file, crs="EPSG:3857"), tmp_path / f"prompts{suffix}")
    features = PromptFeatures(path, "id", "box")
    scene = open_crop(scene_file)
    placed = {p.feature.id: p for p in features.in_window(scene.geobox)}
    assert sorted(placed) == INSIDE
    assert placed["a"].feature.properties == {"name": "field a", "year": 1990}
    assert np.allclose(placed["d"].box, FEATURES["d"], atol=0.05)  # reprojected twice, back onto its pixels
    assert features.outside([scene.geobox]) == ["out-east", "out-north"]


def test_point_prompts_answer_each_feature_from_a_point_inside_it(checkpoint, scene_file, tmp_path):
    prompts = write_prompts(prompt_frame(scene_file), tmp_path / "fields.geojson")
    options = {"mode": "prompts", "prompts_file": str(prompts), "prompt_kind": "point"}
    # the random network's best candidate for these points is empty at threshold 0; at -100 none is
    model = load_model("sam", {"checkpoint": str(checkpoint), **options, "mask_threshold": -100})
    first = tile_inputs(scene_file)[0]
    placed = {p.feature.id: p.point for p in model.prompt_features.in_window(first.grid)}
    assert sorted(placed) == ["a", "b", "c"]  # d's point lies beyond the first tile's read window
    for feature_id, (x, y) in placed.items():
        c0, r0, c1, r1 = FEATURES[feature_id]
        assert c0 <= x <= c1 and r0 <= y <= r1
    answers = {i.prompt_id: i for i in model(first, [Prompt("objects", "class", "object")]).instances["object"]}
    assert sorted(answers) == ["a", "b", "c"]
    embedding = model.sam.get_image_embeddings(model._image(first)[None])
    _, candidates = model._decode(embedding, first.valid.shape, points=np.array(list(placed.values())), multimask=True)
    best = candidates.max(dim=1).values.tolist()  # of the three masks per point, the best by predicted IoU
    assert [answers[i].score for i in placed] == pytest.approx(best, abs=1e-5)


def test_box_prompts_from_point_features_are_refused_naming_the_feature(scene_file, tmp_path):
    frame = prompt_frame(scene_file)
    frame.loc[2, "geometry"] = frame.geometry[2].centroid
    path = write_prompts(frame, tmp_path / "mixed.gpkg")
    with pytest.raises(JobSpecError, match="mixed.gpkg: feature 'c' is a point; use prompt_kind: point"):
        PromptFeatures(path, "id", "box")


def test_prompts_mode_gives_one_catalog_row_per_feature_inside_with_its_id_and_attributes(
    ray_session, checkpoint, scene_file, tmp_path
):
    prompts = write_prompts(prompt_frame(scene_file), tmp_path / "fields.gpkg")  # EPSG:4326; the scene is UTM
    options = {"checkpoint": str(checkpoint), "mode": "prompts", "prompts_file": prompts.name}  # relative to the job
    job = write_job(
        tmp_path / "job.yaml", scenes=[str(scene_file)], prompts=PROMPT, model={"name": "sam", "options": options},
        tiling={"core": GRID.core, "overlap": GRID.overlap}, bands=RGB, ray={"num_actors": 1},
    )  # fmt: skip
    summary = run_job(load_job(job))
    assert not summary.failed
    objects = gpd.read_parquet(summary.tables["objects"]).set_index("prompt_id")
    assert sorted(objects.index) == INSIDE  # b and c cross seams, and still give one row each
    staged = pd.concat([pd.read_parquet(p) for p in (summary.output / "mosaics").glob("*.tile_instances/*.parquet")])
    assert staged.groupby("prompt_id").size().to_dict() == {"a": 1, "b": 2, "c": 4, "d": 1}  # views merged by id
    for feature_id in INSIDE:
        attributes = json.loads(objects.loc[feature_id, "attributes"])
        assert attributes["feature"] == {"name": f"field {feature_id}", "year": 1990 + list(FEATURES).index(feature_id)}
        assert 0 <= attributes["stability_score"] <= 1
    assert objects["pixels"].gt(0).all()
    assert summary.prompts_outside == ("out-east", "out-north") and summary.prompts_without_object == ()
    recorded = json.loads((summary.output / "run" / "summary.json").read_text())
    assert recorded["prompts_outside"] == ["out-east", "out-north"]


def test_features_inside_the_scene_that_get_no_mask_are_reported_not_lost(
    ray_session, checkpoint, scene_file, tmp_path
):
    prompts = write_prompts(prompt_frame(scene_file), tmp_path / "fields.parquet")
    options = {"checkpoint": str(checkpoint), "mode": "prompts", "prompts_file": str(prompts), "mask_threshold": 1e9}
    job = write_job(
        tmp_path / "job.yaml", scenes=[str(scene_file)], prompts=PROMPT, model={"name": "sam", "options": options},
        tiling={"core": GRID.core, "overlap": GRID.overlap}, bands=RGB, ray={"num_actors": 1},
    )  # fmt: skip
    summary = run_job(load_job(job))  # no logit reaches the threshold: every mask is empty
    assert summary.objects_per_label == {}
    assert summary.prompts_without_object == tuple(INSIDE)
    assert summary.prompts_outside == ("out-east", "out-north")


def test_everything_mode_through_the_pipeline_catalogues_objects_with_their_stability(
    ray_session, checkpoint, scene_file, tmp_path
):
    options = {"checkpoint": str(checkpoint), **EVERYTHING}
    job = write_job(
        tmp_path / "job.yaml", scenes=[str(scene_file)], prompts=PROMPT, model={"name": "sam", "options": options},
        tiling={"core": GRID.core, "overlap": GRID.overlap}, bands=RGB, ray={"num_actors": 1},
    )  # fmt: skip
    summary = run_job(load_job(job))
    assert not summary.failed and summary.tiles["done"] == 4
    objects = gpd.read_parquet(summary.tables["objects"])
    assert len(objects) > 0 and "prompt_id" not in objects.columns
    assert all(0 <= json.loads(a)["stability_score"] <= 1 for a in objects["attributes"])
    assert (objects["label"] == "object").all() and objects["object_id"].is_unique


@pytest.mark.parametrize(
    "options, field",
    [
        ({"mode": "all"}, "'mode'"),
        ({"points_per_sid": 4}, "'points_per_sid'"),
        ({"mode": "prompts"}, "'prompts_file'"),
        ({"pred_iou_thresh": 2}, "'pred_iou_thresh'"),
    ],
)
def test_bad_options_are_one_line_naming_the_option(checkpoint, options, field):
    with pytest.raises(JobSpecError, match=field) as error:
        load_model("sam", {"checkpoint": str(checkpoint), **options})
    assert "\n" not in str(error.value)


def test_a_bad_prompts_file_exits_2_naming_it_before_anything_is_written(checkpoint, scene_file, tmp_path):
    prompts = write_prompts(prompt_frame(scene_file).rename(columns={"id": "key"}), tmp_path / "fields.geojson")
    options = {"checkpoint": str(checkpoint), "mode": "prompts", "prompts_file": str(prompts)}
    job = write_job(
        tmp_path / "job.yaml", scenes=[str(scene_file)], prompts=PROMPT, model={"name": "sam", "options": options}
    )
    result = CliRunner().invoke(app, ["run", str(job)])
    assert result.exit_code == EXIT_BAD_JOB
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("geobatch: error:")]
    assert "fields.geojson: no id column 'id'" in line
    assert not (tmp_path / "out").exists()
