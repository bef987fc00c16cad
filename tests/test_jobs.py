import datetime as dt
from pathlib import Path

import pytest
from conftest import REPO, write_job

from geobatch.errors import JobSpecError
from geobatch.jobs import load_job


def test_example_job_loads_with_paths_relative_to_its_folder():
    spec = load_job(REPO / "jobs" / "example.yaml")
    assert spec.output == REPO / "out" / "example"
    assert all(Path(s.uri).is_file() for s in spec.scenes)
    assert spec.scenes[0].acquired_at == dt.datetime(2010, 6, 29, tzinfo=dt.UTC)
    assert spec.model.name == "spectral"
    assert spec.prompts[0].label == "water"


def test_shorthands_expand_and_labels_default_to_a_slug(tmp_path):
    spec = load_job(write_job(tmp_path / "job.yaml", prompts=["Segment all Water bodies!"], scenes=["*.tif"]))
    assert spec.prompts[0].label == "segment_all_water_bodies"
    assert spec.prompts[0].kind == "class"
    assert spec.scenes[0].uri == str(tmp_path / "*.tif")


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(JobSpecError, match=r"broken\.yaml is not valid YAML"):
        load_job(path)


def test_missing_job_file_is_named(tmp_path):
    with pytest.raises(JobSpecError, match="nope.yaml not found"):
        load_job(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "fields, field_name",
    [
        ({"tiling": {"core": -1, "overlap": 0}}, "tiling.core"),
        ({"prompts": []}, "prompts"),
        ({"bands": {"infrared": 4}}, "bands"),
        ({"scenes": "not-a-list"}, "scenes"),
        ({"tiling": {"core": 64, "overlap": 0, "typo": 1}}, "tiling.typo"),
        ({"prompts": ["water", {"text": "lakes", "label": "water"}]}, "prompts"),
        ({"prompts": [{"text": "lakes", "label": "../lakes"}]}, "prompts.0.label"),  # labels name folders
        ({"storage": {"gdal_options": {"AWS_SECRET_ACCESS_KEY": "x"}}}, "storage.gdal_options"),
        ({"ray": {"batch_size": 0}}, "ray.batch_size"),
    ],
)
def test_invalid_field_is_named_in_one_line(tmp_path, fields, field_name):
    with pytest.raises(JobSpecError) as caught:
        load_job(write_job(tmp_path / "job.yaml", **fields))
    message = str(caught.value)
    assert f"field '{field_name}'" in message
    assert "job.yaml" in message
    assert "\n" not in message


def test_a_job_that_is_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(JobSpecError, match="expected a mapping"):
        load_job(path)
