"""Nightly runs over a growing folder of scenes: only new or changed scenes are processed, superseded
objects leave the catalog, one run of a job at a time, stale locks of killed runs are taken over."""

import functools
import http.server
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import shapely
from conftest import SHARED_DATA, write_job
from servers import s3_server
from typer.testing import CliRunner

from geobatch import catalog
from geobatch.cli import EXIT_LOCKED, app
from geobatch.identity import file_identity
from geobatch.jobs import load_job
from geobatch.ledger import JobLock, JobLocked
from geobatch.pipeline import run_job

NAIP = SHARED_DATA / "naip"
DATES = ["20090818", "20100629", "20120731", "20140720", "20150926", "20160816", "20170827", "20180716"]
TILES_PER_SCENE = 12  # 724 x 934 px in 256 px cores: 3 x 4
runner = CliRunner()


def naip(date: str) -> Path:
    return NAIP / f"m_4709963_se_14_1_{date}.tif"


def add_scenes(archive: Path, *dates: str) -> None:
    archive.mkdir(parents=True, exist_ok=True)
    for date in dates:
        shutil.copyfile(naip(date), archive / naip(date).name)


def nightly_job(folder: Path, **fields) -> Path:
    scenes = [{"uri": str(folder / "archive" / "*.tif"), "date_from_name": True}]
    return write_job(folder / "job.yaml", scenes=scenes, **fields)


def catalog_objects(output: Path):
    return catalog.read_table(output, "objects")


def test_a_second_night_processes_only_the_new_scenes_and_the_catalog_has_no_duplicates(ray_session, tmp_path):
    add_scenes(tmp_path / "archive", *DATES[:2])
    spec = load_job(nightly_job(tmp_path))
    first = run_job(spec)
    assert first.tiles_inferred == 2 * TILES_PER_SCENE and not first.failed
    assert [s.status for s in first.scenes] == ["done", "done"]

    add_scenes(tmp_path / "archive", *DATES[2:5])  # three more dates arrive
    second = run_job(spec)
    assert second.run_id != first.run_id and not second.resumed
    assert second.tiles_inferred == 3 * TILES_PER_SCENE  # the model saw only the new scenes
    assert sorted(s.scene_id for s in second.scenes) == sorted(naip(d).stem for d in DATES[2:5])
    assert second.unchanged == 2

    objects = catalog_objects(spec.output)
    assert objects["object_id"].is_unique
    runs = objects.groupby("scene_id")["run_id"].agg(set).to_dict()
    assert runs == {naip(d).stem: {first.run_id if d in DATES[:2] else second.run_id} for d in DATES[:5]}
    assert len(objects) == sum(first.objects_per_label.values()) + sum(second.objects_per_label.values())
    assert sorted(objects["acquired_at"].dt.strftime("%Y%m%d").unique()) == DATES[:5]  # dates from the names

    third = run_job(spec)  # nothing new: the last run is reported again, nothing is inferred
    assert third.tiles_inferred == 0 and third.run_id == second.run_id and third.resumed
    assert catalog_objects(spec.output)["object_id"].is_unique


def test_a_replaced_scene_file_is_processed_again_and_its_old_objects_are_superseded(ray_session, tmp_path):
    archive = tmp_path / "archive"
    add_scenes(archive, DATES[0], DATES[1])
    spec = load_job(nightly_job(tmp_path))
    first = run_job(spec)
    replaced = archive / naip(DATES[1]).name
    before = catalog_objects(spec.output)
    old_count = int((before["scene_id"] == replaced.stem).sum())

    shutil.copyfile(naip(DATES[-1]), replaced)  # a reprocessed delivery under the same name: other pixels
    second = run_job(spec)
    assert second.run_id != first.run_id
    assert second.tiles_inferred == TILES_PER_SCENE and [s.scene_id for s in second.scenes] == [replaced.stem]
    after = catalog_objects(spec.output)
    assert after["object_id"].is_unique
    mine = after[after["scene_id"] == replaced.stem]
    assert set(mine["run_id"]) == {second.run_id} and len(mine) == second.scenes[0].objects != old_count
    untouched = after[after["scene_id"] != replaced.stem]
    assert set(untouched["run_id"]) == {first.run_id} and len(untouched) == len(before) - old_count
    superseded = list((spec.output / "catalog" / "superseded").rglob(f"{first.run_id}_{replaced.stem}.parquet"))
    assert superseded and sum(len(catalog.gpd.read_parquet(p)) for p in superseded) == old_count

    os.utime(replaced)  # touched again (mtime): processed again, same pixels, same objects
    third = run_job(spec)
    assert third.tiles_inferred == TILES_PER_SCENE
    again = catalog_objects(spec.output)
    assert again["object_id"].is_unique and len(again) == len(after)
    assert set(again[again["scene_id"] == replaced.stem]["run_id"]) == {third.run_id}


SLOW = {"name": "fixed-cost", "options": {"seconds": 0.15}}
SMALL_TILES = {"core": 128, "overlap": 16}  # 48 tiles per scene


def geobatch_command(*arguments: str) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "geobatch"), *arguments]


def lock_holder(output: Path) -> int | None:
    ledger = output / "run" / "ledger.sqlite"
    if not ledger.exists():
        return None
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
        try:
            row = db.execute("select pid from lock").fetchone()
        except sqlite3.OperationalError:
            return None
    return row[0] if row else None


def wait_for_lock(process: subprocess.Popen, output: Path) -> int:
    deadline = time.monotonic() + 120
    while (pid := lock_holder(output)) is None:
        assert process.poll() is None, "the run ended before it took its lock"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return pid


def test_two_runs_of_one_job_one_exits_with_a_clear_message_one_waits_and_outputs_equal_one_run(ray_session, tmp_path):
    address = ray.get_runtime_context().gcs_address
    add_scenes(tmp_path / "archive", DATES[0])
    job = nightly_job(tmp_path, model=SLOW, tiling=SMALL_TILES)
    output = tmp_path / "out"
    first = subprocess.Popen(geobatch_command("run", str(job), "--address", address), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert wait_for_lock(first, output) == first.pid

    refused = runner.invoke(app, ["run", str(job)])  # a second run, started by hand or by a late cron
    assert refused.exit_code == EXIT_LOCKED
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("geobatch: error: another run of this job is running") and f"pid {first.pid}" in line
    waiting = subprocess.run(geobatch_command("run", str(job), "--address", address, "--wait"),
                             capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert waiting.returncode == 0, waiting.stderr
    assert "resumed: 0 tile(s) inferred now" in waiting.stdout  # it waited, then found nothing left to do
    assert lock_holder(output) is None

    alone = tmp_path / "alone"  # the same job run once, by itself
    single = run_job(load_job(job).model_copy(update={"output": alone}))
    concurrent, once = catalog_objects(output), catalog_objects(alone)
    assert concurrent["object_id"].is_unique and len(concurrent) == len(once) == sum(single.objects_per_label.values())
    columns = [c for c in once.columns if c != "run_id"]
    key = "object_id"
    assert (
        concurrent.sort_values(key)[columns]
        .reset_index(drop=True)
        .equals(once.sort_values(key)[columns].reset_index(drop=True))
    )


def test_the_stale_lock_of_a_killed_run_is_taken_over_and_the_run_resumes(ray_session, tmp_path):
    address = ray.get_runtime_context().gcs_address
    add_scenes(tmp_path / "archive", DATES[0])
    job = nightly_job(tmp_path, model=SLOW, tiling=SMALL_TILES)
    output = tmp_path / "out"
    driver = subprocess.Popen(geobatch_command("run", str(job), "--address", address), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_lock(driver, output)
    time.sleep(2)  # some tiles get done
    os.killpg(driver.pid, signal.SIGKILL)  # kill -9: no chance to release the lock
    driver.wait()
    assert lock_holder(output) == driver.pid  # left behind

    summary = run_job(load_job(job))
    assert summary.resumed and not summary.failed
    assert 0 < summary.tiles_inferred <= 48
    assert lock_holder(output) is None
    assert catalog_objects(output)["object_id"].is_unique


def test_remote_identity_follows_the_servers_last_modified_and_size(tmp_path):
    served = tmp_path / "scene.tif"
    shutil.copyfile(naip(DATES[0]), served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/scene.tif"
    try:
        first = file_identity(url)
        assert first == file_identity(url) and str(served.stat().st_size) in first
        shutil.copyfile(naip(DATES[1]), served)
        os.utime(served, (time.time() + 5, time.time() + 5))  # Last-Modified has whole seconds
        assert file_identity(url) != first
        assert file_identity(url.replace("scene.tif", "gone.tif")) == ""  # no identity: counts as unchanged
    finally:
        server.shutdown()


def test_a_lock_without_heartbeat_is_stale_a_live_one_is_not(tmp_path):
    held = JobLock.acquire(tmp_path)
    with pytest.raises(JobLocked, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        JobLock.acquire(tmp_path)  # alive and beating
    with pytest.raises(JobLocked, match="gave up waiting"):
        JobLock.acquire(tmp_path, wait=True, timeout_s=0.3, poll_s=0.1)
    ledger = tmp_path / "run" / "ledger.sqlite"
    with sqlite3.connect(ledger) as db:  # as if held by a machine that died an hour ago
        db.execute("update lock set host = 'crashed-node', heartbeat = ?", (time.time() - 3600,))
    with JobLock.acquire(tmp_path, stale_after_s=600) as taken:
        assert taken.token != held.token
    assert lock_holder(tmp_path) is None
    held.release()  # its row is gone: releasing touches nothing


@pytest.fixture(scope="module")
def two_dates(ray_session, tmp_path_factory):
    """Water on the 2009 and 2020 NAIP dates of one place, in one catalog."""
    folder = tmp_path_factory.mktemp("changes")
    scenes = [{"uri": str(naip(d)), "acquired_at": f"{d[:4]}-{d[4:6]}-{d[6:]}"} for d in ("20090818", "20200831")]
    job = write_job(folder / "job.yaml", scenes=scenes)
    summary = run_job(load_job(job))
    assert [s.status for s in summary.scenes] == ["done", "done"]
    return folder / "out"


def brute_force_changes(before, after, min_iou=0.1, changed_iou=0.5, area_change=0.2):
    """Every before object against every after object (no index), then one-to-one by best IoU first."""
    shapes_b = before.geometry.to_crs(32614).to_numpy()
    shapes_a = after.geometry.to_crs(32614).to_numpy()
    pairs = []
    for i, shape_b in enumerate(shapes_b):
        for j in np.flatnonzero(shapely.intersects(shape_b, shapes_a)):
            inter = shape_b.intersection(shapes_a[j]).area
            iou = inter / (shape_b.area + shapes_a[j].area - inter)
            if iou >= min_iou:
                pairs.append((-iou, before["object_id"][i], after["object_id"][j], i, j))
    taken_b, taken_a, changed = set(), set(), 0
    for negative_iou, _, _, i, j in sorted(pairs):
        if i in taken_b or j in taken_a:
            continue
        taken_b.add(i)
        taken_a.add(j)
        ratio = after["area_m2"][j] / before["area_m2"][i]
        changed += -negative_iou < changed_iou or abs(ratio - 1) > area_change
    return {"appeared": len(after) - len(taken_a), "disappeared": len(before) - len(taken_b), "changed": changed}


def test_changes_between_2009_and_2020_equal_a_brute_force_matching(two_dates, tmp_path):
    target = tmp_path / "water_changes.parquet"
    arguments = ["changes", str(two_dates), "--label", "water", "--before", "2009", "--after", "2020-08"]
    result = runner.invoke(app, [*arguments, "--to", str(target)])
    assert result.exit_code == 0, result.output
    found = catalog.gpd.read_parquet(target)
    counts = found["change"].value_counts().to_dict()
    objects = catalog_objects(two_dates)
    before = objects[objects["acquired_at"].dt.year == 2009].reset_index(drop=True)
    after = objects[objects["acquired_at"].dt.year == 2020].reset_index(drop=True)
    expected = brute_force_changes(before, after)
    assert {k: counts.get(k, 0) for k in expected} == expected
    assert expected["appeared"] > 0 and expected["disappeared"] > 0  # ponds come and go over 11 years
    appeared = found[found["change"] == "appeared"]
    assert appeared["after_id"].isin(after["object_id"]).all() and appeared["before_id"].isna().all()
    disappeared = found[found["change"] == "disappeared"]
    assert disappeared["before_id"].isin(before["object_id"]).all() and disappeared["after_id"].isna().all()
    changed = found[found["change"] == "changed"]
    assert changed["before_id"].notna().all() and changed["after_id"].notna().all()
    shape_changed = changed["iou"] < 0.5
    area_changed = (changed["area_ratio"] - 1).abs() > 0.2
    assert (shape_changed | area_changed).all()
    assert (changed["why"].str.contains("shape") == shape_changed).all()
    assert (changed["why"].str.contains("area") == area_changed).all()
    assert found["before_id"].dropna().is_unique and found["after_id"].dropna().is_unique
    assert f"appeared: {expected['appeared']}, disappeared: {expected['disappeared']}" in result.stdout


def test_changes_within_a_bbox_and_by_unknown_selections(two_dates, tmp_path):
    box = "-99.16,47.00,-99.15,47.02"
    target = tmp_path / "box.parquet"
    arguments = ["changes", str(two_dates), "--label", "water", "--before", "2009-08-18", "--after", "2020"]
    result = runner.invoke(app, [*arguments, "--bbox", box, "--to", str(target)])
    assert result.exit_code == 0, result.output
    found = catalog.gpd.read_parquet(target)
    region = shapely.box(-99.16, 47.00, -99.15, 47.02)
    objects = catalog.open(two_dates).query(bbox=(-99.16, 47.00, -99.15, 47.02), label="water")
    before = objects[objects["acquired_at"].dt.year == 2009].reset_index(drop=True)
    after = objects[objects["acquired_at"].dt.year == 2020].reset_index(drop=True)
    expected = brute_force_changes(before, after)
    assert found["change"].value_counts().reindex(list(expected), fill_value=0).to_dict() == expected
    assert shapely.intersects(found.geometry.to_numpy(), region).all()
    bad = runner.invoke(app, [*arguments[:-2], "--after", "yesterday"])
    assert bad.exit_code == 2 and "neither a run id" in bad.stderr
    empty = runner.invoke(app, [*arguments[:-2], "--after", "1999"])
    assert empty.exit_code == 2 and "no 'water' objects for '1999'" in empty.stderr


def test_a_bucket_prefix_gets_its_new_and_replaced_objects_processed_each_night(tmp_path):
    """The console script in its own process (its own Ray: its workers need the S3 credentials file)."""
    credentials = tmp_path / "credentials"
    credentials.write_text("[archive]\naws_access_key_id = geobatch-test\naws_secret_access_key = test\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    environment["AWS_SHARED_CREDENTIALS_FILE"] = str(credentials)
    output = tmp_path / "out"

    def night() -> dict:
        done = subprocess.run(geobatch_command("run", str(job)), capture_output=True, text=True, timeout=300,
                              env=environment, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads((output / "run" / "summary.json").read_text())

    with s3_server() as s3:
        s3.upload("archive", f"naip/{naip(DATES[0]).name}", naip(DATES[0]))
        s3.upload("archive", "elsewhere/not-a-scene.tif", naip(DATES[1]))  # outside the prefix
        storage = {"s3_endpoint": s3.endpoint_url, "s3_profile": "archive", "s3_region": "us-east-1"}
        scenes = [{"uri": "s3://archive/naip/", "date_from_name": True}]
        job = write_job(tmp_path / "job.yaml", scenes=scenes, storage=storage)
        first = night()
        assert first["tiles_inferred"] == TILES_PER_SCENE and [s["scene_id"] for s in first["scenes"]] == [
            naip(DATES[0]).stem
        ]
        s3.upload("archive", f"naip/{naip(DATES[1]).name}", naip(DATES[1]))  # a new object
        second = night()
        assert second["tiles_inferred"] == TILES_PER_SCENE and second["unchanged"] == 1
        assert [s["scene_id"] for s in second["scenes"]] == [naip(DATES[1]).stem]
        s3.upload("archive", f"naip/{naip(DATES[0]).name}", naip(DATES[-1]))  # replaced: a new ETag
        third = night()
        assert third["tiles_inferred"] == TILES_PER_SCENE and third["unchanged"] == 1
        assert [s["scene_id"] for s in third["scenes"]] == [naip(DATES[0]).stem]
    objects = catalog_objects(output)
    assert objects["object_id"].is_unique
    assert objects.groupby("scene_id")["run_id"].agg(set).to_dict() == {
        naip(DATES[0]).stem: {third["run_id"]},
        naip(DATES[1]).stem: {second["run_id"]},
    }
