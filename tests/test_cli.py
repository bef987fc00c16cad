"""The command line as a user meets it: exit codes, one-line errors, nothing written for bad parts."""

import json
import os
import subprocess
import sys

import geopandas as gpd
import pytest
import ray
from conftest import NAIP_2010, REPO, SHARED_DATA, write_job
from typer.testing import CliRunner

from geobatch import catalog
from geobatch.cli import EXIT_BAD_JOB, EXIT_FAILURES, app

runner = CliRunner()


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("geobatch: error:")]


def test_malformed_job_file_exits_2_with_one_line_and_writes_nothing(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: x\noutput: out\nscenes: [a.tif\n")
    result = runner.invoke(app, ["run", str(job)])
    assert result.exit_code == EXIT_BAD_JOB
    (line,) = error_lines(result)
    assert "job.yaml is not valid YAML" in line
    assert not (tmp_path / "out").exists()


def test_invalid_field_exits_2_naming_the_field(tmp_path):
    result = runner.invoke(app, ["run", str(write_job(tmp_path / "job.yaml", tiling={"core": 0}))])
    assert result.exit_code == EXIT_BAD_JOB
    (line,) = error_lines(result)
    assert "field 'tiling.core'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"model": "samm"},
            "unknown model 'samm'; choose from ['fixed-cost', 'geopixel', 'spectral', 'synthetic-instances']",
        ),
        ({"prompts": ["buildings"]}, "prompt 'buildings' matches no class"),
    ],
)
def test_a_job_the_model_cannot_run_exits_2_before_writing(tmp_path, fields, message):
    result = runner.invoke(app, ["run", str(write_job(tmp_path / "job.yaml", **fields))])
    assert result.exit_code == EXIT_BAD_JOB
    (line,) = error_lines(result)
    assert message in line
    assert not (tmp_path / "out").exists()


def test_missing_scene_fails_alone_the_rest_completes_and_the_exit_status_says_so(ray_session, tmp_path):
    missing = tmp_path / "gone" / "m_missing.tif"
    job = write_job(tmp_path / "job.yaml", scenes=[str(missing), str(NAIP_2010)])
    result = runner.invoke(app, ["run", str(job)])
    assert result.exit_code == EXIT_FAILURES, result.output
    (line,) = error_lines(result)
    assert str(missing) in line and "file not found" in line
    mosaics = tmp_path / "out" / "mosaics"
    assert sorted(p.name for p in mosaics.iterdir()) == [f"{NAIP_2010.stem}.zarr"]
    scenes = catalog.read_table(tmp_path / "out", "scenes").set_index("scene_id")
    assert scenes.loc["m_missing", "status"] == "failed"
    assert "file not found" in scenes.loc["m_missing", "reason"]
    assert scenes.loc["m_missing", "geometry"] is None
    assert scenes.loc[NAIP_2010.stem, "status"] == "done"
    objects = catalog.read_table(tmp_path / "out", "objects")
    assert len(objects) > 0 and set(objects["scene_id"]) == {NAIP_2010.stem}


def test_failures_are_tabled_by_reason_and_nodata_scenes_are_a_note_not_an_error(ray_session, tmp_path):
    samples = SHARED_DATA / "samples"
    scenes = [{"uri": str(samples / name), "bands": {"nir": 1}} for name in ("corrupt.tif", "cogeo.tif")]
    scenes.append(str(samples / "all-nodata.tif"))
    result = runner.invoke(app, ["run", str(write_job(tmp_path / "job.yaml", scenes=scenes, bands={}))])
    assert result.exit_code == EXIT_FAILURES, result.output
    problems = result.stdout[result.stdout.index("problems") :]
    assert "corrupt" in problems and "IReadBlock failed" in problems and "all-nodata" in problems
    assert "cogeo " not in problems
    assert [line.split(": ")[2] for line in error_lines(result)] == [f"scene {samples / 'corrupt.tif'}"]
    assert f"geobatch: note: scene {samples / 'all-nodata.tif'}: skipped: no valid pixels" in result.stderr


def test_a_job_whose_only_problem_is_nodata_exits_0(ray_session, tmp_path):
    job = write_job(tmp_path / "job.yaml", scenes=[str(SHARED_DATA / "samples" / "all-nodata.tif")], bands={})
    result = runner.invoke(app, ["run", str(job)])
    assert result.exit_code == 0, result.output
    assert "scenes: 1 (0 done, 1 skipped, 0 partial, 0 failed)" in result.stdout


@pytest.fixture(scope="module")
def catalogued(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("query")
    result = runner.invoke(app, ["run", str(write_job(folder / "job.yaml"))])
    assert result.exit_code == 0, result.output
    return folder / "out"


def test_running_a_finished_job_again_says_it_resumed_and_infers_nothing(catalogued):
    result = runner.invoke(app, ["run", str(catalogued.parent / "job.yaml")])
    assert result.exit_code == 0, result.output
    assert "resumed: 0 tile(s) inferred now, the rest finished earlier" in result.stdout


def test_run_prints_a_summary_with_counts_and_output_paths(catalogued):
    objects = catalog.read_table(catalogued, "objects")
    result = runner.invoke(app, ["query", str(catalogued), "--bbox", "-180,-90,180,90"])
    assert result.exit_code == 0
    assert f"{len(objects)} row(s)" in result.stdout


def test_query_formats_agree(catalogued, tmp_path):
    objects = catalog.read_table(catalogued, "objects")
    minx, miny, maxx, maxy = objects.total_bounds
    bbox = f"{minx},{miny},{(minx + maxx) / 2},{(miny + maxy) / 2}"
    geojson = runner.invoke(app, ["query", str(catalogued), "--bbox", bbox, "--label", "water", "--format", "geojson"])
    assert geojson.exit_code == 0
    features = json.loads(geojson.stdout)["features"]
    assert 0 < len(features) < len(objects)
    exported = tmp_path / "subset.parquet"
    parquet = runner.invoke(
        app, ["query", str(catalogued), "--bbox", bbox, "--format", "parquet", "--to", str(exported)]
    )
    assert parquet.exit_code == 0
    assert sorted(gpd.read_parquet(exported)["object_id"]) == sorted(f["properties"]["object_id"] for f in features)
    none = runner.invoke(app, ["query", str(catalogued), "--bbox", bbox, "--label", "forest", "--format", "geojson"])
    assert json.loads(none.stdout)["features"] == []


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--bbox", "1,2,3"], "not minx,miny,maxx,maxy"),
        (["--bbox", "3,2,1,4"], "not minx,miny,maxx,maxy"),
        (["--bbox", "0,0,1,1", "--format", "parquet"], "--format parquet needs --to FILE"),
    ],
)
def test_bad_query_arguments_exit_2(catalogued, arguments, message):
    result = runner.invoke(app, ["query", str(catalogued), *arguments])
    assert result.exit_code == 2
    assert message in result.output + result.stderr


def test_query_on_a_folder_without_catalog_says_so(tmp_path):
    result = runner.invoke(app, ["query", str(tmp_path), "--bbox", "0,0,1,1"])
    assert result.exit_code == 2
    assert f"no catalog at {tmp_path}" in error_lines(result)[0]


def test_example_job_runs_from_the_console_script_on_a_ray_cluster_address(ray_session, tmp_path):
    """The real entry point, in its own process, joining the test session's Ray through --address."""
    address = ray.get_runtime_context().gcs_address
    command = [os.path.join(os.path.dirname(sys.executable), "geobatch"), "run", str(REPO / "jobs" / "example.yaml")]
    done = subprocess.run(
        [*command, "--out", str(tmp_path), "--address", address],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "scenes: 3 (3 done, 0 skipped, 0 partial, 0 failed)" in done.stdout
    assert "tiles: 36 done, 0 skipped, 0 failed" in done.stdout
    assert str(tmp_path / "catalog" / "objects") in done.stdout
    scenes = catalog.read_table(tmp_path, "scenes")
    assert sorted(scenes["acquired_at"].dt.year) == [2010, 2015, 2020]


def test_a_job_whose_every_scene_fails_still_writes_its_catalog_and_exits_3(tmp_path):
    job = write_job(tmp_path / "job.yaml", scenes=[str(tmp_path / "a.tif"), str(tmp_path / "none" / "*.tif")])
    result = runner.invoke(app, ["run", str(job)])
    assert result.exit_code == EXIT_FAILURES, result.output
    assert len(error_lines(result)) == 2
    scenes = catalog.read_table(tmp_path / "out", "scenes")
    assert sorted(scenes["reason"]) == ["file not found", "no file matches this pattern"]
    objects = catalog.open(tmp_path / "out").query()
    assert len(objects) == 0 and {"object_id", "label", "area_m2", "geometry"} <= set(objects.columns)
