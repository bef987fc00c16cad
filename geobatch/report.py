"""The run report printed at the end of ``geobatch run``: scenes, tiles, objects, time, outputs."""

from __future__ import annotations

import re
from collections import Counter

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from geobatch.pipeline import RunSummary

_WINDOW = re.compile(r"window \(col \d+, row \d+, \d+x\d+\)")  # tiles differ only in it: group them

_STATUS_STYLE = {"done": "green", "skipped": "dim", "partial": "yellow", "failed": "red"}


def print_summary(summary: RunSummary, console: Console) -> None:
    table = Table(
        title=f"geobatch run {summary.run_id} — job '{summary.job}'",
        title_justify="left",
        caption="done / skipped (nodata) / failed: tiles",
        caption_justify="left",
    )
    table.add_column("scene", no_wrap=True)
    for column in ("status", "done", "skipped", "failed", "objects"):  # the middle three count tiles
        table.add_column(column, no_wrap=True)
    for scene in summary.scenes:
        style = _STATUS_STYLE.get(scene.status, "")
        counts = (str(scene.tiles_done), str(scene.tiles_skipped), str(scene.tiles_failed), str(scene.objects))
        table.add_row(scene.scene_id, f"[{style}]{scene.status}[/]", *counts)
    console.print(table)
    _print_problems(summary, console)
    statuses = {s: sum(1 for x in summary.scenes if x.status == s) for s in _STATUS_STYLE}
    per_label = ", ".join(f"{label}: {n}" for label, n in sorted(summary.objects_per_label.items())) or "none"
    scene_counts = ", ".join(f"{n} {status}" for status, n in statuses.items())
    lines = [
        f"scenes: {len(summary.scenes)} ({scene_counts})   "
        + f"tiles: {summary.tiles['done']} done, {summary.tiles['skipped']} skipped, {summary.tiles['failed']} failed",
        f"objects: {per_label}   time: {summary.seconds:.1f} s",
        *(
            [f"resumed: {summary.tiles_inferred} tile(s) inferred now, the rest finished earlier"]
            if summary.resumed
            else []
        ),
        *([f"unchanged: {summary.unchanged} scene(s) processed by earlier runs"] if summary.unchanged else []),
        f"mosaics: {summary.output / 'mosaics'}",
        *([f"report: {summary.report}"] if summary.report else []),
        *(f"{name}: {path}" for name, path in summary.tables.items()),
    ]
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)  # paths stay whole, to be copied


def _print_problems(summary: RunSummary, console: Console) -> None:
    """One row per scene and reason: scenes that could not be used, then tiles grouped by why they failed
    (their reasons differ only in the window they name)."""
    rows = Counter((t.scene_id, _WINDOW.sub("window", t.reason or "")) for t in summary.failed_tiles)
    whole_scenes = [s for s in summary.scenes if s.status in ("failed", "skipped") and not s.tiles_failed]
    if not rows and not whole_scenes:
        return
    table = Table(title="problems", title_justify="left")
    for column in ("scene", "status", "tiles", "reason"):
        table.add_column(column, overflow="fold", no_wrap=column != "reason")
    for scene in whole_scenes:
        style = _STATUS_STYLE[scene.status]
        table.add_row(scene.scene_id, f"[{style}]{scene.status}[/]", "all", escape(scene.reason or ""))
    for (scene_id, reason), count in rows.items():
        table.add_row(scene_id, "[red]failed[/]", str(count), escape(reason))
    console.print(table)
