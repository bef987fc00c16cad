"""Instance models end to end: every synthetic instance, cut by tiles and overlapping others, appears once."""

import shutil
from pathlib import Path
from typing import NamedTuple

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from conftest import open_mosaic, write_job
from rasterio.transform import from_origin
from rasterio.windows import Window
from scipy import ndimage

from geobatch.errors import JobSpecError
from geobatch.instances import MatchThresholds, match_masks, merge_instances
from geobatch.jobs import JobSpec, load_job
from geobatch.models.base import Prompt, TileInput, load_model
from geobatch.models.synthetic import SyntheticInstances
from geobatch.pipeline import RunSummary, run_job
from geobatch.scenes import discover, open_scene
from geobatch.stitch import LABEL_NODATA, Mosaic
from geobatch.tiling import TileGrid, plan_tiles

HEIGHT, WIDTH = 200, 260
PIXEL_M = 2.0
INVALID = (slice(144, HEIGHT), slice(0, 96))  # a nodata corner: whole tiles are skipped, instances cut
GAP = (slice(None), slice(150, 153))  # a nodata stripe (a scan gap): instances across it are disjoint
PROMPTS = [{"text": "buildings", "label": "building"}, {"text": "trees", "label": "tree"}]
SHAPES = {"seed": 3, "count": 30, "extent": [HEIGHT, WIDTH], "max_size": 70}
RUNS = {  # name -> (core, overlap, edge_erosion)
    "core48-overlap12": (48, 12, 0),
    "core64-overlap20": (64, 20, 0),
    "core48-overlap12-eroded": (48, 12, 8),
}


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory) -> Path:
    """A small 4-band UTM GeoTIFF with a nodata corner (the synthetic model reads only validity)."""
    path = tmp_path_factory.mktemp("scene") / "synthetic_scene.tif"
    data = np.random.default_rng(0).integers(1, 255, (4, HEIGHT, WIDTH), dtype=np.uint8)
    data[:, INVALID[0], INVALID[1]] = 0
    data[:, GAP[0], GAP[1]] = 0
    profile = {"driver": "GTiff", "width": WIDTH, "height": HEIGHT, "count": 4, "dtype": "uint8", "nodata": 0}
    grid = {"crs": "EPSG:32614", "transform": from_origin(500000, 5200000, PIXEL_M, PIXEL_M)}
    with rasterio.open(path, "w", **profile, **grid) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def truth():
    """The synthetic instances over the whole scene, restricted to valid pixels (what a tile can see)."""
    valid = np.ones((HEIGHT, WIDTH), bool)
    valid[INVALID] = False
    valid[GAP] = False
    prompts = [Prompt(p["text"], "class", p["label"]) for p in PROMPTS]
    shapes = SyntheticInstances(**SHAPES).shapes(prompts)
    masks = {s.phrase: s.mask(Window(0, 0, WIDTH, HEIGHT)) & valid for s in shapes}
    return {"shapes": [s for s in shapes if masks[s.phrase].any()], "masks": masks, "valid": valid}


class Run(NamedTuple):
    summary: RunSummary
    mosaic: Path  # the published mosaic
    grid: TileGrid
    spec: JobSpec


@pytest.fixture(scope="module")
def runs(ray_session, scene_file, tmp_path_factory) -> dict[str, Run]:
    """Each run of ``RUNS``, once."""
    done = {}
    for name, (core, overlap, erosion) in RUNS.items():
        folder = tmp_path_factory.mktemp(name)
        model = {"name": "synthetic-instances", "options": {**SHAPES, "edge_erosion": erosion}}
        job = write_job(
            folder / "job.yaml", scenes=[str(scene_file)], prompts=PROMPTS, model=model,
            tiling={"core": core, "overlap": overlap},
        )  # fmt: skip
        spec = load_job(job)
        summary = run_job(spec)
        done[name] = Run(summary, spec.output / "mosaics" / f"{scene_file.stem}.zarr", TileGrid(core, overlap), spec)
    return done


@pytest.fixture(params=list(RUNS))
def run(request, runs) -> Run:
    return runs[request.param]


def expected_mosaics(truth) -> tuple[np.ndarray, np.ndarray, list]:
    """The ground truth rasterised by the documented rules: ids by first pixel, the higher score on top."""
    labels = [p["label"] for p in PROMPTS]
    shapes = truth["shapes"]

    def order(s):
        mask = truth["masks"][s.phrase]
        return (np.flatnonzero(mask.ravel())[0], labels.index(s.label), -s.score, -mask.sum())

    by_id = sorted(shapes, key=order)
    instance = np.zeros((HEIGHT, WIDTH), np.uint32)
    label = np.where(truth["valid"], 0, LABEL_NODATA).astype(np.uint8)
    for object_id, shape in sorted(enumerate(by_id, 1), key=lambda pair: (pair[1].score, -pair[0])):
        mask = truth["masks"][shape.phrase]
        instance[mask], label[mask] = object_id, labels.index(shape.label) + 1
    return instance, label, by_id


def test_the_synthetic_scene_has_every_hard_case(run, truth):
    """Preconditions, so the other tests test something: instances larger than a tile, overlapping each
    other, and lying whole inside the overlap of two read windows."""
    grid = run.grid
    tiles = list(plan_tiles("s", (HEIGHT, WIDTH), grid))
    masks = [truth["masks"][s.phrase] for s in truth["shapes"]]

    def holding_whole(mask):
        rows, cols = np.nonzero(mask)
        return [
            t for t in tiles
            if t.read_window.row_off <= rows.min() and rows.max() < t.read_window.row_off + t.read_window.height
            and t.read_window.col_off <= cols.min() and cols.max() < t.read_window.col_off + t.read_window.width
        ]  # fmt: skip

    def cores_reached(mask):
        return sum(mask[t.core_window.toslices()].any() for t in tiles)

    assert max(cores_reached(m) for m in masks) >= 6
    assert any((a & b).any() for i, a in enumerate(masks) for b in masks[i + 1 :])
    assert any(len(holding_whole(m)) >= 2 and cores_reached(m) >= 2 for m in masks)
    assert len(truth["shapes"]) >= 20


def test_every_instance_appears_once_with_its_pixels(run, truth):
    summary = run.summary
    assert not summary.failed
    objects = gpd.read_parquet(summary.tables["objects"]).set_index("phrase")
    assert sorted(objects.index) == sorted(s.phrase for s in truth["shapes"])
    for shape in truth["shapes"]:
        row = objects.loc[shape.phrase]
        assert row["label"] == shape.label
        assert row["pixels"] == truth["masks"][shape.phrase].sum(), shape.phrase
        assert row["score"] == pytest.approx(shape.score, abs=1e-6)
    assert objects["object_id"].is_unique and objects.is_valid.all()
    assert np.allclose(objects.to_crs(32614).area, objects["pixels"] * PIXEL_M**2, rtol=1e-9)
    assert np.allclose(objects["area_m2"], objects.to_crs(32614).area, rtol=1e-3)  # UTM's scale error is < 1e-3
    assert summary.objects_per_label == {
        label: sum(s.label == label for s in truth["shapes"]) for label in ("building", "tree")
    }


def test_disjoint_instances_are_multipolygons(run, truth):
    """An instance cut in two (by the scan gap, or by another's hole) keeps all its parts in one row."""
    summary = run.summary
    objects = gpd.read_parquet(summary.tables["objects"]).set_index("phrase")
    parts = {s.phrase: ndimage.label(truth["masks"][s.phrase])[1] for s in truth["shapes"]}
    assert any(n > 1 for n in parts.values())
    for phrase, n in parts.items():
        geometry = objects.loc[phrase, "geometry"]
        assert len(getattr(geometry, "geoms", [geometry])) == n
        assert geometry.geom_type == ("MultiPolygon" if n > 1 else "Polygon")


def test_mosaics_equal_the_truth_rasterised(run, truth):
    summary, mosaic_path = run.summary, run.mosaic
    mosaic = open_mosaic(mosaic_path)
    instance, label, by_id = expected_mosaics(truth)
    assert np.array_equal(mosaic["label"].values, label)
    assert np.array_equal(mosaic["instance"].values, instance)
    scores = np.array([0.0] + [s.score for s in by_id], np.float32)[instance]
    assert np.array_equal(mosaic["score"].values, np.where(truth["valid"], scores, np.nan), equal_nan=True)
    objects = gpd.read_parquet(summary.tables["objects"]).set_index("phrase")
    first = [np.unravel_index(np.flatnonzero(truth["masks"][s.phrase].ravel())[0], (HEIGHT, WIDTH)) for s in by_id]
    ids = [objects.loc[s.phrase, "object_id"] for s in by_id]
    assert ids == [f"synthetic_scene:{s.label}:{r}:{c}" for s, (r, c) in zip(by_id, first)]


def test_overviews_are_written(run):
    mosaic_path = run.mosaic
    assert zarr.open_group(str(mosaic_path), mode="r").attrs["overviews"]["factors"] == [2, 4, 8]
    coarse = xr.open_zarr(mosaic_path, group="overviews/2", consolidated=False)
    assert np.array_equal(coarse["instance"].values, open_mosaic(mosaic_path)["instance"].values[::2, ::2])


def test_merging_again_gives_the_same_objects_and_mosaic(run, scene_file):
    """The stage is idempotent: the staged instances stay with the mosaic, and chunks are repainted whole."""
    summary, mosaic_path, grid, spec = run
    before = open_mosaic(mosaic_path).load()
    mosaic = Mosaic(scene_file.stem, str(mosaic_path), (HEIGHT, WIDTH), grid.core, ("building", "tree"), "instances")
    (ref,), _ = discover(spec)
    again = merge_instances(mosaic, open_scene(ref, ("red",)), grid)
    objects = gpd.read_parquet(summary.tables["objects"]).sort_values("object_id")
    again = again.sort_values("object_id")
    assert list(again["object_id"]) == list(objects["object_id"])
    assert list(again["pixels"]) == list(objects["pixels"])
    after = open_mosaic(mosaic_path)
    for name in ("label", "instance", "score"):
        assert np.array_equal(after[name].values, before[name].values, equal_nan=True)


def test_eroded_views_need_the_thresholds(runs, scene_file, tmp_path):
    """Without IoU / IoS tolerance the eroded views of one instance stay apart: the thresholds do the work."""
    summary, mosaic_path, grid, spec = runs["core48-overlap12-eroded"]
    copy = tmp_path / "mosaics"
    shutil.copytree(mosaic_path.parent, copy)
    labels = ("building", "tree")
    mosaic = Mosaic(scene_file.stem, str(copy / mosaic_path.name), (HEIGHT, WIDTH), grid.core, labels, "instances")
    (ref,), _ = discover(spec)
    strict = merge_instances(mosaic, open_scene(ref, ("red",)), grid, MatchThresholds(iou=1.0, ios=1.01))
    assert len(strict) > summary.objects_per_label["building"] + summary.objects_per_label["tree"]


def test_tilings_give_the_same_catalog(runs):
    catalogs = [
        gpd.read_parquet(summary.tables["objects"]).sort_values("object_id").reset_index(drop=True)
        for summary, *_ in runs.values()
    ]
    reference = catalogs[0]
    for other in catalogs[1:]:
        columns = ["object_id", "label", "phrase", "score", "pixels"]
        assert other[columns].equals(reference[columns])
        assert other.geometry.normalize().geom_equals_exact(reference.geometry.normalize(), 1e-9).all()


def test_a_scene_without_instances_has_no_objects_and_a_background_mosaic(ray_session, scene_file, tmp_path, truth):
    model = {"name": "synthetic-instances", "options": {**SHAPES, "count": 0}}
    job = write_job(tmp_path / "job.yaml", scenes=[str(scene_file)], prompts=PROMPTS, model=model)
    summary = run_job(load_job(job))
    assert not summary.failed and summary.objects_per_label == {}
    mosaic = open_mosaic(summary.output / "mosaics" / f"{scene_file.stem}.zarr")
    assert np.array_equal(mosaic["label"].values, np.where(truth["valid"], 0, LABEL_NODATA))
    assert not mosaic["instance"].values.any()


def test_a_failed_tile_stays_nodata_and_its_neighbours_instances_appear_once(ray_session, scene_file, tmp_path, truth):
    grid = TileGrid(48, 12)
    failed = next(t for t in plan_tiles(scene_file.stem, (HEIGHT, WIDTH), grid) if (t.row, t.col) == (1, 2))
    lost = np.zeros((HEIGHT, WIDTH), bool)
    lost[failed.core_window.toslices()] = True
    masks = {phrase: mask & ~lost for phrase, mask in truth["masks"].items()}
    shapes = [s for s in truth["shapes"] if masks[s.phrase].any()]
    assert any(masks[s.phrase].sum() < truth["masks"][s.phrase].sum() for s in shapes)  # instances were cut
    model = {"name": "synthetic-instances", "options": {**SHAPES, "fail_tiles": [failed.tile_id]}}
    job = write_job(
        tmp_path / "job.yaml", scenes=[str(scene_file)], prompts=PROMPTS, model=model,
        tiling={"core": grid.core, "overlap": grid.overlap},
    )  # fmt: skip
    summary = run_job(load_job(job))
    assert [t.tile_id for t in summary.failed_tiles] == [failed.tile_id]
    objects = gpd.read_parquet(summary.tables["objects"]).set_index("phrase")
    assert sorted(objects.index) == sorted(s.phrase for s in shapes)
    assert all(objects.loc[s.phrase, "pixels"] == masks[s.phrase].sum() for s in shapes)
    mosaic = open_mosaic(summary.output / "mosaics" / f"{scene_file.stem}.zarr")
    instance, label, _ = expected_mosaics({"shapes": shapes, "masks": masks, "valid": truth["valid"] & ~lost})
    assert np.array_equal(mosaic["label"].values, label) and (label[lost] == LABEL_NODATA).all()
    assert np.array_equal(mosaic["instance"].values, instance)


def test_an_instance_model_without_overlap_is_a_bad_job(scene_file, tmp_path):
    model = {"name": "synthetic-instances", "options": SHAPES}
    job = write_job(tmp_path / "job.yaml", scenes=[str(scene_file)], model=model, tiling={"core": 64, "overlap": 0})
    with pytest.raises(JobSpecError, match="tiling.overlap must be > 0"):
        run_job(load_job(job))
    assert not (tmp_path / "out").exists()


def square(top: int, left: int, size: int, shape=(12, 12)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_identical_views_match():
    assert match_masks([("a", square(2, 2, 5))], [("a", square(2, 2, 5))]) == [(0, 0)]


def test_a_view_cut_short_matches_by_intersection_over_smaller():
    whole, cut = square(2, 0, 6), square(2, 0, 6) & (np.arange(12) < 2)[None, :]  # a third of it: IoU 1/3
    assert match_masks([("a", cut)], [("a", whole)]) == [(0, 0)]
    assert match_masks([("a", cut)], [("a", whole)], MatchThresholds(iou=0.5, ios=1.01)) == []
    assert match_masks([("a", cut)], [("a", whole)], MatchThresholds(iou=0.3, ios=1.01)) == [(0, 0)]


def test_views_of_different_labels_or_little_overlap_do_not_match():
    assert match_masks([("a", square(2, 2, 5))], [("b", square(2, 2, 5))]) == []
    assert match_masks([("a", square(0, 0, 6))], [("a", square(3, 3, 6))]) == []  # IoU 9/63, IoS 9/36
    assert match_masks([("a", square(0, 0, 3))], [("a", square(6, 6, 3))]) == []
    assert match_masks([], [("a", square(0, 0, 3))]) == []


def test_matching_is_one_to_one_so_a_small_instance_inside_a_large_one_keeps_its_own():
    large, small = square(0, 0, 10), square(3, 3, 2)
    assert sorted(match_masks([("a", small), ("a", large)], [("a", large), ("a", small)])) == [(0, 1), (1, 0)]
    assert match_masks([("a", small)], [("a", large)]) == [(0, 0)]  # alone, the small one is a partial view


def test_the_model_never_labels_nodata_and_erodes_only_cut_edges():
    model = load_model("synthetic-instances", {"count": 40, "extent": [40, 40], "max_size": 200, "edge_erosion": 3})
    tile = next(t for t in plan_tiles("s", (40, 40), TileGrid(16, 4)) if (t.row, t.col) == (0, 1))
    valid = np.ones((tile.read_window.height, tile.read_window.width), bool)
    valid[10:12, 8:12] = False
    result = model(TileInput(tile, {}, valid), [Prompt("x", "class", "x")])
    seen = np.logical_or.reduce([instance.mask for instance in result.instances["x"]])
    assert not seen[~valid].any()
    assert not seen[:, :3].any() and not seen[:, -3:].any() and not seen[-3:].any()  # left, right, bottom: cuts
    assert seen[0].any() and seen[:, 3].any() and seen[-4].any()  # the top is the scene's edge, not a cut
