"""Command line: ``geobatch run JOB.yaml``, ``geobatch query OUT --bbox ...``, ``geobatch models``.

Exit status: 0 when everything ran; 2 for a bad job or bad arguments (nothing was written);
3 when the job completed but some scenes or tiles failed (each named on stderr and in the catalog).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from geobatch import catalog
from geobatch.errors import GeobatchError
from geobatch.jobs import load_job
from geobatch.models.base import MODELS

EXIT_BAD_JOB = 2
EXIT_FAILURES = 3

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Map prompts over satellite scenes at scale.",
)


class OutputFormat(str, enum.Enum):
    table = "table"
    geojson = "geojson"
    parquet = "parquet"


def _fail(message: str, code: int = EXIT_BAD_JOB) -> typer.Exit:
    print(f"geobatch: error: {message}", file=sys.stderr)
    return typer.Exit(code)


@app.command()
def run(
    job: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder; overrides the job's 'output'.")] = None,
    address: Annotated[str | None, typer.Option(envvar="RAY_ADDRESS", help="Ray cluster to join.")] = None,
) -> None:
    """Run a job: tiles through the model on Ray, mosaics to Zarr, objects to GeoParquet."""
    from geobatch.pipeline import run_job  # the pipeline pulls in Ray; keep `--help` and `query` fast
    from geobatch.report import print_summary

    logging.basicConfig(level=logging.WARNING, format="geobatch: %(levelname)s: %(message)s")
    try:
        spec = load_job(job)
        updates = {"output": out.resolve()} if out else {}
        if address:
            updates["ray"] = spec.ray.model_copy(update={"address": address})
        spec = spec.model_copy(update=updates)
        with _tile_progress(Console(stderr=True)) as (on_tile, total_tiles):
            summary = run_job(spec, on_tile=on_tile, total_tiles=total_tiles)
    except GeobatchError as exc:
        raise _fail(str(exc)) from None
    print_summary(summary, Console())
    for scene in summary.scenes:
        if scene.status != "done":
            kind = "note" if scene.status == "skipped" else "error"
            print(f"geobatch: {kind}: scene {scene.uri}: {scene.status}: {scene.reason}", file=sys.stderr)
    if summary.failed:
        raise typer.Exit(EXIT_FAILURES)


class _TileRate(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:.1f} tiles/s", style="progress.data.speed")


@contextlib.contextmanager
def _tile_progress(console: Console) -> Iterator[tuple[Callable, Callable]]:
    """A progress bar of tiles (finished by an earlier run count as done) with failures, rate and ETA."""
    columns = (
        TextColumn("tiles"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed[/] {task.fields[skipped]} skipped"),
        _TileRate(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("tiles", total=None, failed=0, skipped=0)
        counts = Counter()

        def on_tile(outcome) -> None:
            counts[outcome.status] += 1
            progress.update(task, advance=1, failed=counts["failed"], skipped=counts["skipped"])

        def total_tiles(total: int, finished: int) -> None:
            progress.reset(task, total=total, completed=finished, failed=0, skipped=0)

        yield on_tile, total_tiles


def _parse_bbox(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not four numbers minx,miny,maxx,maxy") from None
    if len(values) != 4 or values[0] > values[2] or values[1] > values[3]:
        raise typer.BadParameter(f"'{text}' is not minx,miny,maxx,maxy with min <= max")
    return values  # type: ignore[return-value]


@app.command()
def query(
    output: Annotated[Path, typer.Argument(help="A job's output folder.")],
    bbox: Annotated[str, typer.Option(help="minx,miny,maxx,maxy in EPSG:4326 (lon/lat).")],
    label: Annotated[str | None, typer.Option(help="Only objects with this label.")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.table,
    to: Annotated[Path | None, typer.Option(help="Write to this file (required for parquet).")] = None,
) -> None:
    """Objects of a job's catalog that intersect a region."""
    region = _parse_bbox(bbox)
    if fmt is OutputFormat.parquet and to is None:
        raise _fail("--format parquet needs --to FILE")
    try:
        found = catalog.query(output, region, label)
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None
    if fmt is OutputFormat.parquet:
        catalog.write_geoparquet(found, to)
    elif fmt is OutputFormat.geojson:
        text = found.to_json(drop_id=True)
        if to:
            to.write_text(text)
        else:
            print(text)
    else:
        _print_objects(found)


def _print_objects(found) -> None:
    table = Table(title=f"{len(found)} object(s)", title_justify="left")
    columns = ("object_id", "label", "score", "area_m2", "scene_id", "acquired_at")
    for column in columns:
        table.add_column(column)
    for row in found[list(columns)].itertuples(index=False):
        table.add_row(
            row.object_id, row.label, f"{row.score:.3f}", f"{row.area_m2:,.0f}", row.scene_id, str(row.acquired_at)
        )
    Console(width=200).print(table)


@app.command()
def models() -> None:
    """List the model backends this installation knows."""
    for name, target in sorted(MODELS.items()):
        print(f"{name}\t{target}")


def main() -> None:
    app()
