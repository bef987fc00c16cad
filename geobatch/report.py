"""The run report printed at the end of ``geobatch run``: scenes, tiles, objects, time, outputs."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from geobatch.pipeline import RunSummary

_STATUS_STYLE = {"done": "green", "partial": "yellow", "failed": "red"}


def print_summary(summary: RunSummary, console: Console) -> None:
    table = Table(title=f"geobatch run {summary.run_id} — job '{summary.job}'", title_justify="left")
    table.add_column("scene", no_wrap=True)
    for column in ("status", "tiles done", "tiles failed", "objects"):
        table.add_column(column, no_wrap=True)
    with_reasons = any(scene.reason for scene in summary.scenes)
    if with_reasons:
        table.add_column("reason", overflow="fold")
    for scene in summary.scenes:
        style = _STATUS_STYLE.get(scene.status, "")
        counts = (str(scene.tiles_done), str(scene.tiles_failed), str(scene.objects))
        reason = (scene.reason or "",) if with_reasons else ()
        table.add_row(scene.scene_id, f"[{style}]{scene.status}[/]", *counts, *reason)
    console.print(table)
    statuses = {s: sum(1 for x in summary.scenes if x.status == s) for s in ("done", "partial", "failed")}
    per_label = ", ".join(f"{label}: {n}" for label, n in sorted(summary.objects_per_label.items())) or "none"
    scene_counts = ", ".join(f"{n} {status}" for status, n in statuses.items())
    lines = [
        f"scenes: {len(summary.scenes)} ({scene_counts})   "
        + f"tiles: {summary.tiles['done']} done, {summary.tiles['failed']} failed",
        f"objects: {per_label}   time: {summary.seconds:.1f} s",
        f"mosaics: {summary.output / 'mosaics'}",
        *(f"{name}: {path}" for name, path in summary.tables.items()),
    ]
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)  # paths stay whole, to be copied
