"""The ``geopixel`` backend from a checkpoint folder: tokenizer, loader, convert, backend, job, pipeline.

Every checkpoint here is a tiny random configuration of the published architecture, saved in the official
names and layouts (``tests/geopixel_checkpoint.py``) and read through the real loader. One of them is
steered so that greedy decoding answers ``[SEG]`` at every step (random weights rarely say it), so that
masks, phrases, mosaics and catalog rows are exercised; their content is arbitrary, so the tests check
structure, shapes and consistency, not quality.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from conftest import NAIP_2010, open_mosaic, write_job
from geopixel_checkpoint import build_tiny_model, official_state, tiny_config, write_checkpoint, write_weights
from rasterio.windows import Window
from typer.testing import CliRunner

from geobatch.cli import app
from geobatch.errors import JobSpecError, UnsupportedPrompt
from geobatch.jobs import load_job
from geobatch.models.base import Prompt, TileInput, load_model
from geobatch.models.geopixel import loading
from geobatch.models.geopixel.backend import GeoPixelSegmenter
from geobatch.models.geopixel.tokenizer import CheckpointError, GeoPixelTokenizer
from geobatch.pipeline import run_job
from geobatch.tiling import Tile

PROMPTS = [
    Prompt("Describe this image in detail with grounded masks.", "gcg", "scene"),
    Prompt("pond", "referring", "pond"),
]


@pytest.fixture(scope="module")
def bin_checkpoint(tmp_path_factory) -> Path:
    """The official release's layout: three ``.bin`` shards and their index."""
    return write_checkpoint(tmp_path_factory.mktemp("bin"), "bin", shards=3, seed=0)


@pytest.fixture(scope="module")
def steered_checkpoint(tmp_path_factory) -> Path:
    """One ``model.safetensors``; greedy decoding answers ``[SEG]`` at every step."""
    return write_checkpoint(tmp_path_factory.mktemp("steered"), "safetensors", shards=1, seed=1, steer_to_seg=True)


@pytest.fixture(scope="module")
def tokenizer(bin_checkpoint) -> GeoPixelTokenizer:
    return GeoPixelTokenizer(bin_checkpoint)


def tile_input(index: int, height: int = 72, width: int = 88, seed: int = 0) -> TileInput:
    """A tile of random RGB display values whose first rows are nodata."""
    rng = np.random.default_rng(seed + index)
    window = Window(index * width, 0, width, height)
    valid = np.ones((height, width), bool)
    valid[:6] = False
    bands = {band: rng.uniform(0, 255, (height, width)).astype(np.float32) for band in ("red", "green", "blue")}
    return TileInput(Tile("scene", f"tile{index}", 0, index, window, window), bands, valid)


# -- tokenizer -----------------------------------------------------------------------------------------


def test_added_tokens_cut_the_text_and_swallow_the_spaces_around_them(tokenizer):
    pieces = tokenizer._sp  # the SentencePiece model itself: text between cuts is encoded by it alone
    ids = tokenizer.encode("The <p> tennis court </p> [SEG] at right")
    start, end, seg = tokenizer.phrase_start_id, tokenizer.phrase_end_id, tokenizer.seg_id
    assert ids == [*pieces.encode("The"), start, *pieces.encode("tennis court"), end, seg, *pieces.encode("at right")]


def test_the_chat_template_puts_the_image_after_bos_and_keeps_chat_markers_whole(tokenizer):
    chat = tokenizer.chat("segment the pond")
    marker = tokenizer._sp.piece_to_id("[UNUSED_TOKEN_146]")
    assert chat.before_image == (tokenizer.bos_id,)
    assert chat.after_image.count(marker) == 2  # the user's turn and the assistant's
    template = "[UNUSED_TOKEN_146]user\nsegment the pond[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    assert list(chat.after_image) == tokenizer._sp.encode(template)  # one piece of text: SentencePiece's own ids


def test_phrases_are_read_per_seg_with_the_label_where_there_is_none(tokenizer):
    answer = "The <p> tennis court </p> [SEG] by a <p> pond </p> [SEG] and more [SEG] ; <p> road </p> runs [SEG]"
    ids = tokenizer.encode(answer)
    assert tokenizer.phrases(ids, default="scene") == ["tennis court", "pond", "scene", "scene"]
    assert tokenizer.decode(ids) == answer  # added tokens set off by single spaces, as the official decode


def test_added_tokens_must_follow_the_sentencepiece_pieces(bin_checkpoint, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copyfile(bin_checkpoint / "tokenizer.model", folder / "tokenizer.model")
    (folder / "added_tokens.json").write_text(json.dumps({"[SEG]": 7, "<p>": 8}))
    with pytest.raises(CheckpointError, match=r"added_tokens.json: GeoPixel's tokens \['</p>'\] are missing"):
        GeoPixelTokenizer(folder)
    (folder / "added_tokens.json").write_text(json.dumps({"[SEG]": 7, "<p>": 8, "</p>": 9}))
    with pytest.raises(CheckpointError, match="do not follow the"):
        GeoPixelTokenizer(folder)


# -- loading -------------------------------------------------------------------------------------------


def _same_weights(model, reference) -> bool:
    ours, theirs = model.state_dict(), reference.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_bin_shards_load_into_the_model_that_wrote_them(bin_checkpoint):
    files = loading.find_checkpoint(bin_checkpoint)
    assert files.format == "bin" and len(files.shards) == 3
    model = loading.load_geopixel(files, device="cpu", dtype="float32")
    config = json.loads((bin_checkpoint / "config.json").read_text())
    assert _same_weights(model, build_tiny_model(config, seed=0))
    halved = loading.load_geopixel(files, device="cpu", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in halved.parameters())
    assert torch.equal(halved.output.weight, model.output.weight.to(torch.bfloat16))


def test_convert_writes_safetensors_that_load_the_same_and_are_preferred(bin_checkpoint, tmp_path):
    target = tmp_path / "converted"
    result = CliRunner().invoke(app, ["models", "convert", str(bin_checkpoint), str(target)])
    assert result.exit_code == 0, result.output
    files = loading.find_checkpoint(target)
    assert files.format == "safetensors" and len(files.shards) == 3
    assert not list(target.glob("*.bin")) and (target / "tokenizer.model").is_file()
    source_count = len(json.loads((bin_checkpoint / "pytorch_model.bin.index.json").read_text())["weight_map"])
    assert loading.summarize(target).tensors == source_count
    converted = loading.load_geopixel(files, device="cpu", dtype="float32")
    original = loading.load_geopixel(loading.find_checkpoint(bin_checkpoint), device="cpu", dtype="float32")
    assert _same_weights(converted, original)
    in_place = tmp_path / "in_place"
    shutil.copytree(bin_checkpoint, in_place)
    loading.convert(in_place, in_place)
    assert loading.find_checkpoint(in_place).format == "safetensors"  # beside the .bin files, and preferred


def _variant(source: Path, target: Path, change) -> Path:
    """A copy of the checkpoint in ``source`` whose official state is changed by ``change(state)``."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.bin", "*.json"))
    config = json.loads((source / "config.json").read_text())
    shutil.copyfile(source / "config.json", target / "config.json")
    shutil.copyfile(source / "added_tokens.json", target / "added_tokens.json")
    state = official_state(build_tiny_model(config))
    change(state)
    write_weights(target, state, "bin", shards=2)
    return target


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update({"model.layers.0.attention.extra.weight": torch.zeros(2)}), "'model.layers.0.attention"),
        (
            lambda s: s.update({"output.weight": s["output.weight"][:-1]}),
            r"'output.weight' has shape \[\d+, 64\], the model expects \[\d+, 64\]",
        ),
        (lambda s: s.pop("model.norm.weight"), r"no tensor for \['model.norm.weight'\]"),
    ],
    ids=["unknown tensor", "wrong shape", "missing tensor"],
)
def test_a_checkpoint_that_does_not_fit_is_one_clear_error(bin_checkpoint, tmp_path, change, message):
    folder = _variant(bin_checkpoint, tmp_path / "variant", change)
    with pytest.raises(CheckpointError, match=message):
        loading.load_geopixel(loading.find_checkpoint(folder), device="cpu", dtype="float32")


class _Payload:
    """Not a tensor: unpickling it would run code of the file's choosing."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_bin_files_are_never_unpickled_beyond_plain_tensors(bin_checkpoint, tmp_path, capsys):
    folder = tmp_path / "unsafe"
    shutil.copytree(bin_checkpoint, folder)
    shard = loading.find_checkpoint(folder).shards[0]
    state = torch.load(shard, weights_only=True)
    torch.save({**state, "payload": _Payload()}, shard)
    with pytest.raises(CheckpointError, match=f"{shard.name}: refused: not loadable as plain tensors"):
        loading.load_geopixel(loading.find_checkpoint(folder), device="cpu", dtype="float32")
    assert "unpickled" not in capsys.readouterr().out
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=f"{shard.name}: not a readable PyTorch weight file"):
        loading.read_shard(shard)


def test_a_folder_without_weights_names_what_is_missing(bin_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        loading.find_checkpoint(tmp_path / "nowhere")
    shutil.copytree(bin_checkpoint, tmp_path / "no_weights", ignore=shutil.ignore_patterns("pytorch_model*"))
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors.index.json"):
        loading.find_checkpoint(tmp_path / "no_weights")
    (tmp_path / "no_weights" / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.model"):
        loading.find_checkpoint(tmp_path / "no_weights")


def test_models_command_says_whether_weights_are_present(bin_checkpoint, tmp_path):
    listed = CliRunner().invoke(app, ["models", "--weights", str(bin_checkpoint)])
    assert listed.exit_code == 0
    line = next(row for row in listed.output.splitlines() if row.startswith("geopixel\t"))
    tensors = len(json.loads((bin_checkpoint / "pytorch_model.bin.index.json").read_text())["weight_map"])
    assert f"present: bin, 3 file(s), {tensors} tensors" in line
    missing = CliRunner().invoke(app, ["models", "--weights", str(tmp_path)])
    assert "missing: GeoPixel weights folder" in missing.output
    plain = CliRunner().invoke(app, ["models"])
    assert "spectral\tgeobatch.models.spectral:Spectral\tno weights needed" in plain.output


# -- the backend ---------------------------------------------------------------------------------------


def test_load_and_first_inference_open_no_socket(steered_checkpoint, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access during a GeoPixel load")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = load_model("geopixel", {"weights": str(steered_checkpoint), "max_new_tokens": 3})
    result = model(tile_input(0), PROMPTS[1:])
    assert len(result.instances["pond"]) == 2  # three [SEG]s, the last one unread


def test_a_batch_answers_every_prompt_with_masks_at_tile_resolution(steered_checkpoint):
    model = GeoPixelSegmenter(steered_checkpoint, max_new_tokens=4)
    assert (model.device, model.dtype, model.input_values, model.objects) == ("cpu", "float32", "display", "instances")
    tiles = [tile_input(0), tile_input(1, height=64, width=100)]
    results = model.predict_batch(tiles, PROMPTS)
    for tile, result in zip(tiles, results, strict=True):
        assert result.tile_id == tile.tile.tile_id and set(result.instances) == {"scene", "pond"}
        assert result.caption == "[SEG] [SEG] [SEG] [SEG]"  # the grounded description's answer
        for label, found in result.instances.items():
            assert len(found) == 3 and all(i.phrase == label for i in found)
            for instance in found:
                assert instance.mask.dtype == bool and instance.mask.shape == tile.valid.shape
                assert not (instance.mask & ~tile.valid).any() and 0.0 <= instance.score <= 1.0


@pytest.mark.parametrize("checkpoint", ["bin_checkpoint", "steered_checkpoint"])
def test_a_batch_of_n_tiles_equals_n_single_calls(checkpoint, request):
    """Random weights: the answers' tokens must agree; steered ones: their masks and scores too."""
    model = GeoPixelSegmenter(request.getfixturevalue(checkpoint), max_new_tokens=5)
    tiles = [tile_input(i, seed=7) for i in range(2)] + [tile_input(2, height=50, width=90, seed=7)]
    batched = model.predict_batch(tiles, PROMPTS)
    for tile, together in zip(tiles, batched, strict=True):
        alone = model(tile, PROMPTS)
        assert alone.caption == together.caption
        for label in ("scene", "pond"):
            assert len(alone.instances[label]) == len(together.instances[label])
            for one, other in zip(alone.instances[label], together.instances[label], strict=True):
                assert np.array_equal(one.mask, other.mask) and one.phrase == other.phrase
                assert one.score == pytest.approx(other.score, abs=1e-5)
    if checkpoint == "steered_checkpoint":
        assert all(len(result.instances["pond"]) == 4 for result in batched)


def test_a_given_answer_is_grounded_one_mask_per_seg_without_generation(steered_checkpoint):
    model = GeoPixelSegmenter(steered_checkpoint, max_new_tokens=4)
    tiles = [tile_input(0), tile_input(1)]
    answers = ["A <p> pond </p> [SEG] near a <p> road </p> [SEG] .", "Only <p> fields </p> and more [SEG]"]
    grounded = model.ground(tiles, answers, label="described")
    assert [[i.phrase for i in found] for found in grounded] == [["pond", "road"], ["described"]]
    assert all(i.mask.shape == tiles[0].valid.shape for found in grounded for i in found)


def test_a_tile_too_large_for_the_token_budget_is_shown_smaller_not_cut(steered_checkpoint, caplog):
    model = GeoPixelSegmenter(steered_checkpoint, max_new_tokens=2)
    big = tile_input(0, height=700, width=760)
    assert model._image_tokens(700, 760) > model.max_tokens  # the full view alone would overflow
    found = model(big, PROMPTS[1:]).instances["pond"]
    assert len(found) == 1 and found[0].mask.shape == (700, 760)
    assert "to fit its token budget" in caplog.text


def test_a_prompt_that_cannot_fit_beside_any_view_is_rejected_by_name(steered_checkpoint):
    model = GeoPixelSegmenter(steered_checkpoint, max_new_tokens=600)
    with pytest.raises(UnsupportedPrompt, match="prompt 'pond': needs .* over GeoPixel's budget of 512"):
        model.required_bands(PROMPTS[1:])


# -- jobs and the pipeline -----------------------------------------------------------------------------


def test_a_geopixel_job_with_a_bad_weights_folder_exits_2_naming_it(tmp_path):
    job = write_job(tmp_path / "job.yaml", model={"name": "geopixel", "weights": "missing"})
    result = CliRunner().invoke(app, ["run", str(job)])
    assert result.exit_code == 2
    assert f"GeoPixel weights folder {tmp_path / 'missing'} does not exist" in result.output
    assert not (tmp_path / "out").exists()


def test_job_weights_are_relative_to_the_job_file_and_given_once(tmp_path):
    job = write_job(tmp_path / "job.yaml", model={"name": "geopixel", "weights": "weights/GeoPixel-7B"})
    assert load_job(job).model.backend_options == {"weights": str(tmp_path / "weights" / "GeoPixel-7B")}
    twice = {"name": "geopixel", "weights": "a", "options": {"weights": "b"}}
    with pytest.raises(JobSpecError, match="field 'model': .*'weights' or as 'options.weights', not both"):
        load_job(write_job(tmp_path / "twice.yaml", model=twice))


@pytest.fixture(scope="module")
def naip_crop(tmp_path_factory) -> Path:
    """A 160 x 200 crop of a real NAIP scene (RGB + NIR, uint8, nodata 0)."""
    path = tmp_path_factory.mktemp("naip") / "naip_crop.tif"
    with rasterio.open(NAIP_2010) as source:
        window = Window(300, 200, 200, 160)
        profile = source.profile | {"width": 200, "height": 160, "transform": source.window_transform(window)}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        with rasterio.open(path, "w", **(profile | {"tiled": False})) as target:
            target.write(source.read(window=window))
    return path


def test_a_job_runs_geopixel_through_the_pipeline_to_zarr_and_geoparquet(
    ray_session, naip_crop, steered_checkpoint, tmp_path
):
    prompts = [{"text": p.text, "kind": p.kind, "label": p.label} for p in PROMPTS]
    model = {"name": "geopixel", "weights": str(steered_checkpoint), "options": {"max_new_tokens": 2, "batch_size": 2}}
    job = write_job(
        tmp_path / "job.yaml", scenes=[str(naip_crop)], prompts=prompts, model=model, tiling={"core": 96, "overlap": 16}
    )
    summary = run_job(load_job(job))
    assert not summary.failed and summary.tiles_inferred == 6  # 2 x 3 tiles of 96 px
    mosaic = open_mosaic(summary.output / "mosaics" / f"{naip_crop.stem}.zarr")
    assert mosaic["label"].shape == (160, 200)
    objects = gpd.read_parquet(summary.tables["objects"])
    assert len(objects) and set(objects["label"]) <= {"scene", "pond"} and (objects["model"] == "geopixel").all()
    assert (objects["phrase"].str.len() > 0).all()
    # the mosaic paints catalog objects: ids 1..N in object order, labels among the objects', pixels theirs
    instance, label = mosaic["instance"].values, mosaic["label"].values
    shown = instance != 0
    assert shown.any() and set(np.unique(instance[shown]).tolist()) <= set(range(1, len(objects) + 1))
    codes = {["scene", "pond"].index(name) + 1 for name in objects["label"]}
    assert set(np.unique(label[shown]).tolist()) <= codes and not label[~shown & (label != 255)].any()
    assert shown.sum() <= objects["pixels"].sum()
    tiles = gpd.read_parquet(summary.tables["tiles"])
    assert tiles["caption"].notna().all() and tiles["caption"].str.contains(r"\[SEG\]").all()


def test_the_gpu_benchmark_runs_end_to_end_on_a_tiny_configuration(tmp_path, monkeypatch):
    script = Path(__file__).resolve().parents[1] / "bench" / "geopixel_gpu.py"
    spec = importlib.util.spec_from_file_location("geopixel_gpu", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, config = tmp_path / "bench.json", tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(vocab_size=512)))
    arguments = ["--config", str(config), "--device", "cpu", "--batch", "1", "--batch", "2", "--tile", "64"]
    arguments += ["--tokens", "3", "--reencode-tokens", "2"]
    monkeypatch.setattr("sys.argv", ["geopixel_gpu.py", *arguments, "--repeat", "1", "--out", str(out)])
    bench.main()
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and [r["batch"] for r in report["results"]] == [1, 2]
    figures = ("prefill_s", "decode_tok_s", "reencode_tok_s", "mask_s", "tile_s_cached", "speedup_vs_published_batch1")
    for result in report["results"]:  # values only exist: timings are the benchmark's business, not a test's
        assert result["generated_tokens"] == 3 and all(isinstance(result[key], float) for key in figures)


def test_token_ids_equal_the_official_tokenizers():
    """Reference ids made once by the official InternLM2 tokenizer (transformers 4.33.2) from the same files."""
    folder = Path(__file__).parent / "data" / "geopixel_tokenizer"
    official = json.loads((folder / "official_ids.json").read_text())
    ours = GeoPixelTokenizer(folder)
    assert [ours.bos_id] == official["bos"]
    assert {"[SEG]": ours.seg_id, "<p>": ours.phrase_start_id, "</p>": ours.phrase_end_id} == official["added"]
    for case in official["encodings"]:
        assert ours.encode(case["text"]) == case["ids"], case["text"]


def test_the_geopixel_job_template_loads_and_names_its_weights():
    spec = load_job(Path(__file__).resolve().parents[1] / "jobs" / "geopixel.yaml")
    assert spec.model.name == "geopixel" and spec.model.backend_options["weights"] == "/models/GeoPixel-7B"
    assert [p.kind for p in spec.prompts] == ["gcg", "referring"] and spec.tiling.overlap > 0
