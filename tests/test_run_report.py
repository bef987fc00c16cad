"""The run report: a self-contained HTML page with PNG quicklooks, checked in headless Chromium offline."""

import functools
import http.server
import json
import re
import shutil
import subprocess
import threading
from typing import ClassVar

import numpy as np
import pytest
import rasterio
import shapely
from conftest import NAIP_2010, SHARED_DATA, open_mosaic, write_job
from typer.testing import CliRunner

from geobatch.cli import app
from geobatch.jobs import load_job
from geobatch.pipeline import run_job
from geobatch.quicklook import OUTLINE, PALETTE
from geobatch.run_report import _visible_rings

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # PNGs have no CRS


@pytest.fixture(scope="module")
def reported(ray_session, tmp_path_factory):
    """A run with a good scene, a scene with corrupt blocks (failed tiles) and a missing file."""
    folder = tmp_path_factory.mktemp("report")
    scenes = [
        str(NAIP_2010),
        {"uri": str(SHARED_DATA / "samples" / "corrupt.tif"), "bands": {"green": 2, "nir": 3}},
        str(folder / "missing.tif"),
    ]
    summary = run_job(load_job(write_job(folder / "job.yaml", scenes=scenes)))
    assert summary.failed and summary.report is not None
    return summary


def test_each_run_writes_a_report_with_its_numbers_reasons_and_a_quicklook_per_scene(reported):
    page = reported.report.read_text()
    assert reported.report == reported.output / "reports" / reported.run_id / "index.html"
    statuses = {s.scene_id: s.status for s in reported.scenes}
    assert statuses == {NAIP_2010.stem: "done", "corrupt": "partial", "missing": "failed"}
    assert "IReadBlock failed" in page and "file not found" in page  # reasons of failed tiles and scenes
    assert f"water: {reported.objects_per_label['water']:,}" in page
    tiles = reported.tiles
    assert f"{tiles['done']} done, {tiles['skipped']} skipped, {tiles['failed']} failed" in page
    assert re.search(r"[\d.]+ tiles/s", page) and re.search(r"model busy<td>[\d.]+% of the actors", page)
    look = reported.report.parent / "quicklooks" / f"{NAIP_2010.stem}.png"
    mosaic = next(s.mosaic for s in reported.scenes if s.scene_id == NAIP_2010.stem)
    assert f"src='quicklooks/{NAIP_2010.stem}.png'" in page
    with rasterio.open(look) as png:  # a real PNG on the mosaic's grid, masks tinted, polygons outlined
        assert png.driver == "PNG" and png.count == 3 and (png.height, png.width) == open_mosaic(mosaic).label.shape
        rgb = png.read().transpose(1, 2, 0)
    assert (rgb == OUTLINE).all(axis=2).sum() > 1000
    tint = 0.55 * PALETTE[0]
    assert ((rgb >= tint.astype(int) - 1).all(axis=2)).sum() > 10000  # water pixels blended with its colour
    assert "no quicklook" in page.split("missing")[-1]  # the missing file: said, not drawn
    assert not re.search(r"(?:https?:)?//", page.replace("<!doctype html>", ""))  # nothing to fetch


def test_geobatch_report_rebuilds_the_report_of_a_run(reported):
    folder = reported.report.parent
    before = {p.name: p.read_bytes() for p in (folder / "quicklooks").glob("*.png")}
    shutil.rmtree(folder / "quicklooks")
    (folder / "index.html").unlink()
    result = runner.invoke(app, ["report", str(reported.output), reported.run_id])
    assert result.exit_code == 0, result.output
    assert f"report: {folder / 'index.html'}" in result.stdout
    assert {p.name: p.read_bytes() for p in (folder / "quicklooks").glob("*.png")} == before
    missing = runner.invoke(app, ["report", str(reported.output), "20000101T000000Z-000000"])
    assert missing.exit_code == 2 and "no run 20000101T000000Z-000000" in missing.stderr


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-default-apps", "--enable-logging=stderr", "--v=0",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # nothing outside could be reached anyway
]  # fmt: skip


class _Recorder(http.server.SimpleHTTPRequestHandler):
    requests: ClassVar[list] = []

    def log_request(self, code="-", size="-"):
        self.requests.append((self.command, self.path, int(code)))

    def log_message(self, *args):
        pass


def test_the_report_renders_in_headless_chromium_and_requests_nothing_but_its_own_files(reported, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "headless Chromium is needed: apt-get install -y chromium (.ci/run installs it)"
    folder = reported.report.parent
    handler = functools.partial(_Recorder, directory=str(folder))
    _Recorder.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    shot, netlog = tmp_path / "report.png", tmp_path / "netlog.json"
    try:
        done = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--log-net-log={netlog}",
             "--window-size=1200,3000", f"--screenshot={shot}", f"{origin}/index.html"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    assert not re.search(r"CONSOLE|Uncaught|Failed to load resource", done.stderr)  # no page errors
    pngs = sorted(f"/quicklooks/{p.name}" for p in (folder / "quicklooks").glob("*.png"))
    assert len(pngs) == 2  # NAIP and the partly corrupt scene (grey where unreadable); the missing file has none
    assert sorted(_Recorder.requests) == sorted([("GET", "/index.html", 200)] + [("GET", p, 200) for p in pngs])
    events = json.loads(netlog.read_text())
    kinds = {value: key for key, value in events["constants"]["logEventTypes"].items()}
    page_requests = [
        e["params"]["url"]
        for e in events["events"]
        if kinds.get(e["type"]) == "URL_REQUEST_START_JOB"
        and "127.0.0.1" in e.get("params", {}).get("network_isolation_key", "")  # requests made for the page
    ]
    assert page_requests and all(url.startswith(origin + "/") for url in page_requests), page_requests
    with rasterio.open(shot) as screenshot:
        pixels = screenshot.read()
    assert (
        pixels.shape[1:] == (3000, 1200)
        and np.unique(pixels.reshape(pixels.shape[0], -1)[:, ::7], axis=1).shape[1] > 100
    )


def test_outlines_keep_the_rings_a_map_pixel_across_from_any_polygon_wkb():
    """Rings are measured in the WKB itself; polygons, multipolygons and big-endian WKB give shapely's rings."""
    shell = shapely.box(0, 0, 10, 10)
    holed = shell.difference(shapely.union_all([shapely.box(1, 1, 4, 4), shapely.box(6, 6, 6.5, 6.5)]))
    multi = shapely.MultiPolygon([shapely.box(20, 0, 20.5, 0.5), shapely.box(30, 0, 33, 2)])
    wkb = np.array(
        [shapely.to_wkb(holed), shapely.to_wkb(multi), shapely.to_wkb(shapely.box(40, 0, 42, 2), byte_order=0)],
        object,  # as Arrow gives them
    )
    rings = shapely.get_rings(shapely.get_parts(shapely.from_wkb(wkb)))
    bounds = shapely.bounds(rings)
    expected = rings[np.maximum(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]) >= 1]
    outlines = _visible_rings(wkb, 1.0)
    assert len(outlines) == 4  # the shell, the 3 x 3 hole, the 3 x 2 part, the big-endian box
    assert shapely.equals_exact(outlines, shapely.simplify(expected, 0.5, preserve_topology=False), 0).all()
