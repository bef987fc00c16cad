"""Shared fixtures: the project's real sample data and one local Ray for the whole test session."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import ray
import xarray as xr
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SPECS = REPO.parent / "shared" / "specs"
NAIP_2010 = SHARED_DATA / "naip" / "m_4709963_se_14_1_20100629.tif"
NAIP_BANDS = {"red": 1, "green": 2, "blue": 3, "nir": 4}


def pytest_sessionstart(session: pytest.Session) -> None:
    if not SHARED_DATA.is_dir():
        raise pytest.UsageError(f"tests need the shared sample data at {SHARED_DATA}")


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for every test that runs the pipeline."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def sample(tmp_path: Path):
    """Copy a file from the shared data into the test's folder (the shared copy is read-only)."""

    def copy(relative: str) -> Path:
        target = tmp_path / "data" / Path(relative).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_DATA / relative, target)
        return target

    return copy


def write_job(path: Path, **fields) -> Path:
    """Write a job file with sensible defaults for one NAIP water run, overridden by ``fields``."""
    job = {
        "name": "test",
        "output": "out",
        "scenes": [str(NAIP_2010)],
        "bands": NAIP_BANDS,
        "prompts": [{"text": "water bodies", "label": "water"}],
        "model": "spectral",
        "tiling": {"core": 256, "overlap": 32},
    }
    job.update(fields)
    path.write_text(yaml.safe_dump(job))
    return path


def open_mosaic(path: Path | str) -> xr.Dataset:
    """A mosaic as an independent reader sees it: xarray over Zarr, with the CRS decoded."""
    return xr.open_zarr(path, decode_coords="all", consolidated=False)
