"""Command line: ``geobatch run JOB.yaml``, ``geobatch query OUT --bbox ...``, ``geobatch models``.

Exit status: 0 when everything ran; 2 for a bad job or bad arguments (nothing was written);
3 when the job completed but some scenes or tiles failed (each named on stderr and in the catalog);
4 when another run of the same job holds its output folder (nothing was done; try again or ``--wait``).
"""

from __future__ import annotations

import contextlib
import enum
import gc
import importlib
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import geopandas as gpd
import pandas as pd
import shapely
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
EXIT_LOCKED = 4

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Map prompts over satellite scenes at scale.",
)


class OutputFormat(str, enum.Enum):
    table = "table"
    geojson = "geojson"
    gpkg = "gpkg"
    fgb = "fgb"
    parquet = "parquet"
    csv = "csv"


_FILE_FORMATS = {OutputFormat.gpkg: "GPKG", OutputFormat.fgb: "FlatGeobuf"}


def _fail(message: str, code: int = EXIT_BAD_JOB) -> typer.Exit:
    print(f"geobatch: error: {message}", file=sys.stderr)
    return typer.Exit(code)


@app.command()
def run(
    job: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder; overrides the job's 'output'.")] = None,
    address: Annotated[str | None, typer.Option(envvar="RAY_ADDRESS", help="Ray cluster to join.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="If another run of this job is running, wait for it.")] = False,
) -> None:
    """Run a job: tiles through the model on Ray, mosaics to Zarr, objects to GeoParquet."""
    from geobatch.ledger import JobLocked
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
            summary = run_job(spec, on_tile=on_tile, total_tiles=total_tiles, wait=wait)
    except JobLocked as exc:
        raise _fail(str(exc), EXIT_LOCKED) from None
    except GeobatchError as exc:
        raise _fail(str(exc)) from None
    print_summary(summary, Console())
    for feature_id in summary.prompts_outside:
        print(f"geobatch: note: prompt feature {feature_id} is outside every scene", file=sys.stderr)
    for feature_id in summary.prompts_without_object:
        print(f"geobatch: note: prompt feature {feature_id} got no object", file=sys.stderr)
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


def _parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not four numbers minx,miny,maxx,maxy") from None
    if len(values) != 4 or values[0] > values[2] or values[1] > values[3]:
        raise typer.BadParameter(f"'{text}' is not minx,miny,maxx,maxy with min <= max")
    return values  # type: ignore[return-value]


def _open_catalog(path: Path) -> catalog.Catalog:
    try:
        return catalog.open(path)
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None


@app.command()
def query(
    output: Annotated[Path, typer.Argument(help="A job's output folder (or its catalog folder).")],
    bbox: Annotated[str | None, typer.Option(help="minx,miny,maxx,maxy in EPSG:4326 (lon/lat).")] = None,
    within: Annotated[Path | None, typer.Option(help="A vector file: only objects meeting its shapes.")] = None,
    label: Annotated[str | None, typer.Option(help="Only objects with this label.")] = None,
    since: Annotated[str | None, typer.Option(help="Acquired at or after (ISO date or time).")] = None,
    until: Annotated[str | None, typer.Option(help="Acquired at or before (ISO date or time).")] = None,
    min_score: Annotated[float | None, typer.Option(help="Only objects scoring at least this.")] = None,
    min_area_m2: Annotated[float | None, typer.Option(help="Only objects at least this large (m²).")] = None,
    table: Annotated[str, typer.Option(help="objects, scenes or tiles.")] = "objects",
    fmt: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.table,
    to: Annotated[Path | None, typer.Option(help="Write to this file (required for gpkg, fgb, parquet).")] = None,
) -> None:
    """Objects (or scenes, tiles) of a catalog that meet a region and filters."""
    region = _parse_bbox(bbox)
    if fmt in (*_FILE_FORMATS, OutputFormat.parquet) and to is None:
        raise _fail(f"--format {fmt.value} needs --to FILE")
    shapes = shapely.union_all(gpd.read_file(within).to_crs(4326).geometry.to_numpy()) if within else None
    found = _open_catalog(output).query(
        bbox=region,
        geometry=shapes,
        label=label,
        since=since,
        until=until,
        min_score=min_score,
        min_area_m2=min_area_m2,
        table=table,
    )
    _export(found, fmt, to)


def _export(found: gpd.GeoDataFrame, fmt: OutputFormat, to: Path | None) -> None:
    if fmt is OutputFormat.table:
        _print_rows(found, [c for c in _OBJECT_SUMMARY if c in found])
    elif fmt is OutputFormat.parquet:
        catalog.write_geoparquet(found, to)
    elif fmt in _FILE_FORMATS:
        found.to_file(to, driver=_FILE_FORMATS[fmt], engine="pyogrio")
    else:
        text = found.to_json(drop_id=True, default=str) if fmt is OutputFormat.geojson else _csv(found)
        if to:
            to.write_text(text)
        else:
            sys.stdout.write(text)


def _csv(found: gpd.GeoDataFrame) -> str:
    return pd.DataFrame(found.drop(columns="geometry")).assign(wkt=found.geometry.to_wkt()).to_csv(index=False)


_OBJECT_SUMMARY = ("object_id", "label", "score", "area_m2", "scene_id", "status", "acquired_at")


def _print_rows(frame: pd.DataFrame, columns: list[str]) -> None:
    """``columns`` of ``frame`` as a table on stdout, wide enough that ids and paths stay whole."""
    table = Table(title=f"{len(frame)} row(s)", title_justify="left")
    for column in columns:
        table.add_column(str(column))
    for row in frame[columns].itertuples(index=False):
        table.add_row(*(_cell(value) for value in row))
    Console(width=200).print(table)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


@app.command()
def stats(
    output: Annotated[Path, typer.Argument(help="A job's output folder (or its catalog folder).")],
    regions: Annotated[Path, typer.Option(help="Region polygons (any vector file), e.g. admin boundaries.")],
    by: Annotated[str, typer.Option(help="Group by these, comma-separated: label, month, scene_id, model.")] = "label",
    to: Annotated[Path | None, typer.Option(help="Also write the table as GeoParquet (with region shapes).")] = None,
) -> None:
    """Object count and area per region polygon (and per label, month...)."""
    keys = [key.strip() for key in by.split(",") if key.strip()]
    unknown = sorted(set(keys) - {"label", "month", "scene_id", "model", "run_id"})
    if unknown:
        raise _fail(f"--by: cannot group by {unknown}; choose from label, month, scene_id, model, run_id")
    table = _open_catalog(output).stats(gpd.read_file(regions), keys)
    if to:
        catalog.write_geoparquet(table, to)
    _print_rows(table, [c for c in table.columns if c != "geometry"])


@app.command()
def sql(
    output: Annotated[Path, typer.Argument(help="A job's output folder (or its catalog folder).")],
    statement: Annotated[str, typer.Argument(help="SQL over the views objects, scenes, tiles.")],
    fmt: Annotated[str, typer.Option("--format", help="table or csv.")] = "table",
) -> None:
    """Run DuckDB SQL on the catalog (views: objects, scenes, tiles; spatial functions when available)."""
    import duckdb

    root = _open_catalog(output).root
    try:
        with catalog.duckdb_connection(root) as connection:
            result = connection.sql(statement)
            frame = result.df() if result is not None else pd.DataFrame()
    except duckdb.Error as exc:
        raise _fail(f"sql: {' '.join(str(exc).split())}") from None
    if fmt == "csv":
        sys.stdout.write(frame.to_csv(index=False))
        return
    _print_rows(frame, list(frame.columns))


@app.command()
def changes(
    output: Annotated[Path, typer.Argument(help="A job's output folder (or its catalog folder).")],
    label: Annotated[str, typer.Option(help="The objects' label, e.g. water.")],
    before: Annotated[str, typer.Option(help="Earlier objects: a run id, or a date YYYY[-MM[-DD]] of acquisition.")],
    after: Annotated[str, typer.Option(help="Later objects: a run id, or a date YYYY[-MM[-DD]] of acquisition.")],
    bbox: Annotated[str | None, typer.Option(help="minx,miny,maxx,maxy in EPSG:4326 (lon/lat).")] = None,
    min_iou: Annotated[float, typer.Option(help="Least IoU for two objects to be the same object.")] = 0.1,
    changed_iou: Annotated[float, typer.Option(help="Matched objects with a lower IoU changed shape.")] = 0.5,
    area_change: Annotated[float, typer.Option(help="Matched objects whose area changed by more (0.2 = 20%).")] = 0.2,
    to: Annotated[Path | None, typer.Option(help="GeoParquet file to write (default OUT/changes/...).")] = None,
) -> None:
    """Objects that appeared, disappeared or changed between two acquisitions (IoU matching) -> GeoParquet."""
    from geobatch import changes as change_detection

    region = _parse_bbox(bbox)
    opened = _open_catalog(output)
    try:
        thresholds = change_detection.Thresholds(min_iou, changed_iou, area_change)
        earlier = change_detection.select(opened, label, before, region)
        later = change_detection.select(opened, label, after, region)
    except ValueError as exc:  # BadSelection, or thresholds out of range
        raise _fail(str(exc)) from None
    found = change_detection.changes(earlier, later, thresholds)
    target = to or opened.root.parent / "changes" / f"{label}_{before}_{after}.parquet"
    catalog.write_geoparquet(found, target)
    counts = found["change"].value_counts()
    kinds = ", ".join(f"{kind}: {counts.get(kind, 0)}" for kind in ("appeared", "disappeared", "changed"))
    print(f"{label} {before} -> {after}: {len(earlier)} before, {len(later)} after; {kinds}")
    print(f"changes: {target}")


@app.command()
def report(
    output: Annotated[Path, typer.Argument(help="A job's output folder.")],
    run_id: Annotated[str | None, typer.Argument(help="The run (default: the latest run in OUTPUT).")] = None,
) -> None:
    """Write a run's HTML report with PNG quicklooks (OUTPUT/reports/RUN_ID/index.html); runs do it themselves."""
    from geobatch.run_report import write_report

    try:
        page = write_report(output, run_id)
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None
    print(f"report: {page}")


catalog_app = typer.Typer(help="Maintain a catalog.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")


@catalog_app.command("compact")
def compact(
    output: Annotated[Path, typer.Argument(help="A job's output folder (or its catalog folder).")],
    rows_per_file: Annotated[int, typer.Option(help="Rows per rewritten file.")] = 1_000_000,
) -> None:
    """Rewrite the small object files of each label and month into few large ones."""
    written = _open_catalog(output).compact(rows_per_file)
    print(f"compacted into {len(written)} file(s)")


models_app = typer.Typer(help="Model backends: list them, convert weights.", invoke_without_command=True)
app.add_typer(models_app, name="models")


@models_app.callback()
def models(
    context: typer.Context,
    weights: Annotated[
        Path | None, typer.Option(help="A weights folder to check for the backends that take one.")
    ] = None,
) -> None:
    """List the model backends this installation knows, and whether their weights are present."""
    if context.invoked_subcommand is not None:
        return
    for name, target in sorted(MODELS.items()):
        describe = getattr(importlib.import_module(target.split(":")[0]), "describe_weights", None)
        print(f"{name}\t{target}\t{describe(weights) if describe else 'no weights needed'}")


@models_app.command("convert")
def convert(
    source: Annotated[Path, typer.Argument(help="A checkpoint folder (official .bin shards or safetensors).")],
    target: Annotated[Path, typer.Argument(help="Folder to write safetensors shards into (may be SOURCE).")],
) -> None:
    """Write a GeoPixel checkpoint's weights as safetensors once, so later loads are fast and unpickle nothing."""
    from geobatch.models.geopixel.loading import convert as convert_checkpoint
    from geobatch.models.geopixel.loading import summarize

    try:
        written = convert_checkpoint(source, target)
    except GeobatchError as exc:
        raise _fail(str(exc)) from None
    print(f"{written.directory}: {summarize(written.directory).describe()}")


def main() -> None:
    try:
        app()
    finally:
        # Python's last garbage collection walks every object the libraries made (0.6-0.8 s after a run);
        # what the commands write is closed by then, so it is skipped: frozen objects are not collected.
        gc.freeze()
