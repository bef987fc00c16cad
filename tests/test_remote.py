"""Scenes over the network, from real servers on 127.0.0.1: HTTP range reads, flaky and failing hosts, S3."""

import os
import socket
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from conftest import NAIP_2010, NAIP_BANDS, open_mosaic, write_job
from rasterio.windows import Window
from servers import s3_server, serve_files

from geobatch.access import Access
from geobatch.jobs import StorageSpec, load_job
from geobatch.pipeline import run_job
from geobatch.scenes import BandSource, SceneReader, SceneRef, open_scene
from geobatch.stitch import LABEL_NODATA

FAST_RETRIES = {"retries": 3, "retry_backoff_s": 0.01}  # the policy under test, without the waiting


@pytest.fixture(scope="module")
def local_label(ray_session, tmp_path_factory):
    """The label mosaic of NAIP 2010 read from the local file: what every remote read must reproduce."""
    folder = tmp_path_factory.mktemp("local")
    spec = load_job(write_job(folder / "job.yaml"))
    assert not run_job(spec).failed
    return open_mosaic(spec.output / "mosaics" / f"{NAIP_2010.stem}.zarr")["label"].values


def run_remote(folder, uri, **fields):
    spec = load_job(write_job(folder / "job.yaml", scenes=[uri], **{"storage": FAST_RETRIES, **fields}))
    summary = run_job(spec)
    mosaic = spec.output / "mosaics" / f"{NAIP_2010.stem}.zarr"
    return summary, (open_mosaic(mosaic)["label"].values if mosaic.exists() else None)


def test_a_cog_over_http_gives_the_mosaic_of_the_local_file(local_label, tmp_path):
    with serve_files(NAIP_2010.parent) as server:
        summary, label = run_remote(tmp_path, server.url(NAIP_2010.name))
        ranged = [r for r in server.requests if r[2]]
    assert [s.status for s in summary.scenes] == ["done"]
    assert np.array_equal(label, local_label)
    assert ranged and all(method == "GET" for method, _, _ in ranged)  # byte ranges, not whole-file downloads


def test_a_server_that_drops_connections_still_gives_the_same_mosaic(local_label, tmp_path):
    with serve_files(NAIP_2010.parent, drop_every=3) as server:
        summary, label = run_remote(tmp_path, server.url(NAIP_2010.name))
    assert [(s.status, s.tiles_failed) for s in summary.scenes] == [("done", 0)]
    assert np.array_equal(label, local_label)


def test_a_server_whose_data_reads_fail_gives_failed_tiles_never_an_empty_mask(ray_session, tmp_path):
    with serve_files(NAIP_2010.parent, fail_from_byte=64 * 1024) as server:  # header served, tiles 503
        summary, label = run_remote(tmp_path, server.url(NAIP_2010.name))
        data_requests = [r for r in server.requests if r[2] and int(r[2].split("=")[1].split("-")[0]) >= 64 * 1024]
    (scene,) = summary.scenes
    assert scene.status == "failed" and scene.tiles_done == 0 and label is None
    tiles = gpd.read_parquet(summary.tables["tiles"])
    assert (tiles.status == "failed").all()
    assert tiles.reason.str.contains("cannot read window .* IReadBlock failed", regex=True).all()
    assert tiles.reason.str.contains("response_code=503").any()  # GDAL's warning, when it gives one
    assert len(data_requests) >= 4 * len(tiles)  # each tile tried once and retried 3 times
    assert summary.failed


def test_a_partly_failing_server_leaves_nodata_where_tiles_failed(local_label, tmp_path):
    with rasterio.open(NAIP_2010) as src:  # 934 x 723 px in 2 x 2 blocks of 512 px, stored in order
        last_block = int(src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
    with serve_files(NAIP_2010.parent, fail_from_byte=last_block) as server:
        summary, label = run_remote(tmp_path, server.url(NAIP_2010.name))
    (scene,) = summary.scenes
    tiles = gpd.read_parquet(summary.tables["tiles"])
    needs_last_block = (tiles.row >= 1) & (tiles.col >= 1)  # their read windows reach x, y >= 512
    assert (tiles.status == np.where(needs_last_block, "failed", "done")).all()
    assert scene.status == "partial"
    for tile in tiles.itertuples():
        core = label[tile.row * 256 : (tile.row + 1) * 256, tile.col * 256 : (tile.col + 1) * 256]
        expected = local_label[tile.row * 256 : (tile.row + 1) * 256, tile.col * 256 : (tile.col + 1) * 256]
        assert np.array_equal(core, expected) if tile.status == "done" else (core == LABEL_NODATA).all()


def test_an_outage_longer_than_gdals_own_repeats_is_outlasted_by_retries_with_backoff(local_label, tmp_path):
    # GDAL repeats a failed range 3 times; 4 readers (2 actors x 2 threads) share 17 failures, so some
    # reader meets at least 5: more than GDAL's own tries, within geobatch's (6 attempts x 4 tries here).
    with serve_files(NAIP_2010.parent, fail_first=17) as server:
        summary, label = run_remote(tmp_path, server.url(NAIP_2010.name), storage=FAST_RETRIES | {"retries": 5})
        data_requests = [r for r in server.requests if r[0] == "GET" and r[2] != "bytes=0-32767"]
    assert [(s.status, s.tiles_failed) for s in summary.scenes] == [("done", 0)]
    assert np.array_equal(label, local_label)
    assert len(data_requests) > 17


def test_a_server_that_is_down_fails_the_scene_with_the_reason(ray_session, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    summary, _ = run_remote(tmp_path, f"http://127.0.0.1:{port}/{NAIP_2010.name}")
    (scene,) = summary.scenes
    assert scene.status == "failed"
    assert scene.reason.startswith("cannot open: CURL error: Failed to connect to 127.0.0.1")
    assert "connect" in scene.reason.lower()


def test_reading_one_tile_of_a_remote_cog_costs_a_few_range_requests():
    with serve_files(NAIP_2010.parent) as server:
        url = server.url(NAIP_2010.name)
        sources = {name: BandSource(url, index) for name, index in NAIP_BANDS.items()}
        scene = open_scene(SceneRef("naip", url, None, sources, url), ("green", "nir"))
        opening = server.requests
        server.reset()
        SceneReader(Access()).read(scene, Window(256, 256, 256, 256), ("green", "nir"))
        reading = server.requests
    assert len(opening) <= 3, opening  # HEAD + one header range (+ nothing listed next to it)
    assert len(reading) <= 2, reading  # the blocks under the window, merged into one range
    assert fetched_bytes(reading) < NAIP_2010.stat().st_size / 2


def fetched_bytes(requests) -> int:
    """Bytes asked for by ranged GETs (every request GDAL makes for data is ranged)."""
    ranges = [r.split("=")[1].split("-") for method, _, r in requests if method == "GET" and r]
    return sum(int(end) - int(start) + 1 for start, end in ranges)


@pytest.mark.parametrize("overviews", [(), (2, 4, 8)], ids=["no-overviews", "overviews"])
def test_the_display_stretch_of_a_16_bit_scene_reads_an_overview_or_a_few_blocks(tmp_path, overviews):
    with rasterio.open(NAIP_2010) as src:
        data, profile = src.read(), src.profile
    big = np.tile(data, (1, 3, 3)).astype(np.uint16) * 257  # 2802 x 2169 px, 16-bit
    profile.update(
        dtype="uint16",
        height=big.shape[1],
        width=big.shape[2],
        blockxsize=256,
        blockysize=256,
        photometric="MINISBLACK",
    )
    with rasterio.open(tmp_path / "big16.tif", "w", **profile) as dst:
        dst.write(big)
        if overviews:
            dst.build_overviews(list(overviews))
    with serve_files(tmp_path) as server:
        url = server.url("big16.tif")
        sources = {name: BandSource(url, index) for name, index in NAIP_BANDS.items()}
        scene = open_scene(SceneRef("big16", url, None, sources, url), ("green",), values="display")
        fetched = fetched_bytes(server.requests)
    assert scene.values["green"].clip == (0.0, 255.0)  # a stretch was computed
    assert fetched < 0.25 * (tmp_path / "big16.tif").stat().st_size, fetched


def test_credentials_from_the_environment_read_a_scene_from_s3(monkeypatch):
    with s3_server() as s3:
        s3.upload("imagery", "naip/scene.tif", NAIP_2010)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
        access = Access.from_spec(StorageSpec(s3_endpoint=s3.endpoint_url))
        uri = "s3://imagery/naip/scene.tif"
        sources = {name: BandSource(uri, index) for name, index in NAIP_BANDS.items()}
        scene = open_scene(SceneRef("naip", uri, None, sources, uri), ("green", "nir"), access=access)
        pixels = SceneReader(access).read(scene, Window(0, 0, 128, 128), ("green", "nir"))
    with rasterio.open(NAIP_2010) as src:
        assert np.array_equal(pixels.bands["nir"], src.read(4, window=Window(0, 0, 128, 128)))


def test_a_job_reads_s3_with_a_named_profile_and_never_writes_the_secret(local_label, tmp_path):
    """The console script in its own process (its own Ray), credentials in a profile file, not the job."""
    secret = "s3cr3t-never-in-outputs"
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[archive]\naws_access_key_id = geobatch-test\naws_secret_access_key = {secret}\n")
    with s3_server() as s3:
        s3.upload("imagery", f"naip/{NAIP_2010.name}", NAIP_2010)
        job = write_job(
            tmp_path / "job.yaml",
            scenes=[f"s3://imagery/naip/{NAIP_2010.name}"],
            storage={"s3_endpoint": s3.endpoint_url, "s3_profile": "archive", "s3_region": "us-east-1"},
        )
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
        environment["AWS_SHARED_CREDENTIALS_FILE"] = str(credentials)
        done = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "geobatch"), "run", str(job)],
            capture_output=True, text=True, timeout=300, env=environment, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    label = open_mosaic(tmp_path / "out" / "mosaics" / f"{NAIP_2010.stem}.zarr")["label"].values
    assert np.array_equal(label, local_label)
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not any(secret.encode() in p.read_bytes() for p in written)
    assert secret not in done.stdout + done.stderr
    assert yaml.safe_load(job.read_text())["storage"].keys() == {"s3_endpoint", "s3_profile", "s3_region"}
