"""Durable, resumable runs on real local Ray: killed workers, a killed driver, reruns, failing models."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import geopandas as gpd
import numpy as np
import pytest
from conftest import NAIP_2010, open_mosaic, write_job

from geobatch import catalog
from geobatch.jobs import load_job
from geobatch.pipeline import run_job

SLOW = {"name": "fixed-cost", "options": {"seconds": 0.05}}  # spectral's answers at a known model cost
TILING = {"core": 128, "overlap": 16}  # 6 x 8 = 48 tiles of NAIP 2010


@pytest.fixture(scope="module")
def clean(ray_session, tmp_path_factory):
    """An uninterrupted run: what every interrupted or repeated one must reproduce."""
    folder = tmp_path_factory.mktemp("clean")
    spec = load_job(write_job(folder / "job.yaml", model=SLOW, tiling=TILING))
    summary = run_job(spec)
    assert not summary.failed and summary.tiles_inferred == 48
    return outputs(spec.output)


def outputs(folder):
    """What a run leaves that users read, minus who processed each tile."""
    label = open_mosaic(folder / "mosaics" / f"{NAIP_2010.stem}.zarr")["label"].values
    objects = catalog.read_table(folder, "objects").sort_values("object_id")
    tiles = catalog.read_table(folder, "tiles").drop(columns="worker").sort_values("tile_id")
    return label, objects.reset_index(drop=True), tiles.reset_index(drop=True)


def assert_same_outputs(actual, expected, same_run=False):
    label, objects, tiles = actual
    assert np.array_equal(label, expected[0])
    columns = [c for c in objects.columns if same_run or c != "run_id"]
    assert objects[columns].equals(expected[1][columns])
    assert tiles.tile_id.is_unique and len(tiles) == 48 and (tiles.status == "done").all()


def test_a_rerun_of_a_finished_job_runs_no_inference_and_changes_nothing(ray_session, tmp_path):
    spec = load_job(write_job(tmp_path / "job.yaml", model=SLOW, tiling=TILING))
    first = run_job(spec)
    before = outputs(spec.output)
    second = run_job(spec)
    assert (first.tiles_inferred, second.tiles_inferred) == (48, 0)
    assert second.resumed and second.run_id == first.run_id
    assert_same_outputs(outputs(spec.output), before, same_run=True)


def test_a_killed_worker_costs_nothing_every_tile_once_and_the_clean_outputs(clean, tmp_path):
    spec = load_job(write_job(tmp_path / "job.yaml", model=SLOW, tiling=TILING))
    killed = []

    def kill_the_first_worker(outcome):
        if not killed:
            pid = int(outcome.worker.split("@")[0])
            os.kill(pid, signal.SIGKILL)  # mid-run: it has more batches in flight
            killed.append(pid)

    summary = run_job(spec, on_tile=kill_the_first_worker)
    assert killed and not summary.failed
    workers = json.loads((spec.output / "run" / "summary.json").read_text())["inference"]["workers"]
    assert killed[0] not in [int(w["worker"].split("@")[0]) for w in workers]  # Ray restarted that actor
    assert_same_outputs(outputs(spec.output), clean)


def test_a_driver_killed_mid_run_resumes_with_only_the_unfinished_tiles(clean, tmp_path):
    job = write_job(tmp_path / "job.yaml", model={"name": "fixed-cost", "options": {"seconds": 0.2}}, tiling=TILING)
    command = [os.path.join(os.path.dirname(sys.executable), "geobatch"), "run", str(job)]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # it starts its own Ray
    driver = subprocess.Popen(command, start_new_session=True, env=environment, stderr=subprocess.DEVNULL)
    ledger = tmp_path / "out" / "run" / "ledger.sqlite"
    deadline = time.monotonic() + 120
    while done_tiles(ledger) < 10:
        assert driver.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, as kill -9 of the job would
    driver.wait()
    recorded = done_tiles(ledger)
    assert recorded < 48
    summary = run_job(load_job(job))
    assert summary.resumed and summary.tiles_inferred == 48 - recorded
    assert_same_outputs(outputs(tmp_path / "out"), clean)


def done_tiles(ledger) -> int:
    if not ledger.exists():
        return 0
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
        try:
            return db.execute("select count(*) from tiles where status = 'done'").fetchone()[0]
        except sqlite3.OperationalError:  # the table is not created yet
            return 0


def test_a_model_error_fails_its_tile_only(ray_session, tmp_path):
    bad = f"{NAIP_2010.stem}/c128o16/r2c3"
    model = {"name": "fixed-cost", "options": {"seconds": 0, "batch_size": 4, "fail_tiles": [bad]}}
    summary = run_job(load_job(write_job(tmp_path / "job.yaml", model=model, tiling=TILING)))
    tiles = gpd.read_parquet(summary.tables["tiles"]).set_index("tile_id")
    assert (tiles.status == "failed").sum() == 1 and tiles.loc[bad, "status"] == "failed"
    assert tiles.loc[bad, "reason"] == f"RuntimeError: injected model failure on tile {bad}"
    assert summary.failed and summary.scenes[0].status == "partial"


def test_out_of_memory_splits_the_batch_until_it_fits(ray_session, tmp_path, clean):
    model = {"name": "fixed-cost", "options": {"seconds": 0, "batch_size": 8, "max_batch": 3}}
    spec = load_job(write_job(tmp_path / "job.yaml", model=model, tiling=TILING))
    summary = run_job(spec)
    assert not summary.failed
    assert np.array_equal(outputs(spec.output)[0], clean[0])
    inference = json.loads((spec.output / "run" / "summary.json").read_text())["inference"]
    assert inference["batch_size"] == 8


def test_the_summary_file_reports_busy_fractions_and_throughput(ray_session, tmp_path):
    spec = load_job(write_job(tmp_path / "job.yaml", model=SLOW, tiling=TILING, ray={"num_actors": 2}))
    run_job(spec)
    summary = json.loads((spec.output / "run" / "summary.json").read_text())
    inference = summary["inference"]
    assert inference["num_actors"] == 2 and len(inference["workers"]) == 2
    assert sum(w["tiles"] for w in inference["workers"]) == 48 == summary["tiles"]["done"]
    for worker in inference["workers"]:
        assert worker["device"] == "cpu"
        assert 0.5 < worker["busy_fraction"] <= 1  # a 50 ms model dominates a 128 px tile's I/O
        assert worker["busy_s"] == pytest.approx(0.05 * worker["tiles"], rel=0.5)
    assert inference["tiles_per_s"] > 0 and 0 < inference["mean_batches_in_flight"] <= 4
