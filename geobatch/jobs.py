"""Job specs: what to run, on which scenes, and where the outputs go.

A job is a YAML file validated into a frozen :class:`JobSpec`. Relative paths in it are resolved against
the job file's folder, so a scheduled run does not depend on the working directory. Every validation
problem is reported as one line that names the file and the field.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from geobatch.errors import JobSpecError

BAND_NAMES = ("red", "green", "blue", "nir", "swir1", "swir2")


def as_utc(value: dt.datetime) -> dt.datetime:
    """Times without a zone are taken as UTC; all times are kept in UTC."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


UtcDatetime = Annotated[dt.datetime, AfterValidator(as_utc)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _known_band_names(value: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(value) - set(BAND_NAMES))
    if unknown:
        raise ValueError(f"unknown band name(s) {unknown}; choose from {list(BAND_NAMES)}")
    return value


BandIndexes = Annotated[dict[str, Annotated[int, Field(gt=0)]], AfterValidator(_known_band_names)]


class SceneSpec(_Frozen):
    """One scene entry: a path, glob, ``http(s)://`` or ``s3://`` URL, or a STAC ItemCollection / Item file.

    ``bands`` names this entry's bands, overriding the job's: a band index in the file (or in the STAC
    ``asset``), or for a STAC entry the key of a single-band asset (``{nir: B08}``).
    """

    uri: str = Field(min_length=1)
    acquired_at: UtcDatetime | None = None
    bands: Annotated[dict[str, Annotated[int, Field(gt=0)] | str], AfterValidator(_known_band_names)] = Field(
        default_factory=dict
    )
    asset: str | None = None
    date_from_name: bool = False  # files without acquired_at: the date YYYYMMDD / YYYY-MM-DD in the file name

    @property
    def is_stac(self) -> bool:
        return self.uri.lower().endswith((".json", ".geojson"))

    @model_validator(mode="after")
    def _band_references_fit_the_source(self) -> SceneSpec:
        keys = sorted(name for name, value in self.bands.items() if isinstance(value, str))
        if not self.is_stac and (self.asset or keys):
            raise ValueError("'asset' and band asset keys apply only to STAC entries (a .json file)")
        if self.asset and keys:
            raise ValueError(f"bands {keys} name assets, but with 'asset' set they must be band indexes in it")
        if self.is_stac and not self.asset and len(keys) != len(self.bands):
            raise ValueError("band indexes in a STAC entry need 'asset' (the asset they index)")
        return self


class PromptSpec(_Frozen):
    """A prompt as given in the job; ``label`` is the short name used in outputs."""

    text: str = Field(min_length=1)
    kind: Literal["class", "referring", "gcg"] = "class"
    label: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] | None = None  # names catalog folders

    @model_validator(mode="after")
    def _default_label(self) -> PromptSpec:
        if self.label is None:
            slug = re.sub(r"[^a-z0-9]+", "_", self.text.lower()).strip("_")
            object.__setattr__(self, "label", slug or "object")
        return self


class ModelSpec(_Frozen):
    """Which backend to run (a name from the model registry), its weights folder if it takes one, and options."""

    name: str = Field(min_length=1)
    weights: Path | None = None  # a local folder (relative to the job file); given to the backend as 'weights'
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _weights_once(self) -> ModelSpec:
        if self.weights is not None and "weights" in self.options:
            raise ValueError("give the weights folder as 'weights' or as 'options.weights', not both")
        return self

    @property
    def backend_options(self) -> dict[str, Any]:
        """The keyword arguments the backend is made with: ``options``, plus ``weights`` when set."""
        return {**self.options, "weights": str(self.weights)} if self.weights is not None else dict(self.options)


class TilingSpec(_Frozen):
    """Tile grid: each tile owns a ``core`` x ``core`` block and sees ``overlap`` more pixels per side."""

    core: Annotated[int, Field(gt=0, le=16384)] = 512
    overlap: Annotated[int, Field(ge=0, le=4096)] = 32


class StorageSpec(_Frozen):
    """How remote scenes are reached, and how hard to retry them.

    Credentials never go here: GDAL takes them from each machine's environment (``AWS_ACCESS_KEY_ID``...)
    or from the named profile, so they cannot end up in a job file, a log or an output.
    """

    s3_endpoint: str | None = None  # an S3-compatible server, e.g. http://minio.local:9000
    s3_region: str | None = None
    s3_profile: str | None = None
    requester_pays: bool = False
    retries: Annotated[int, Field(ge=0, le=20)] = 4
    retry_backoff_s: Annotated[float, Field(ge=0, le=60)] = 0.5
    gdal_options: dict[str, str] = Field(default_factory=dict)  # further GDAL config, e.g. GDAL_HTTP_PROXY

    @field_validator("gdal_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        secret = sorted(k for k in value if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|USERPWD", k.upper()))
        if secret:
            raise ValueError(f"{secret} look like credentials; set them in the environment or a profile instead")
        return value


class RaySpec(_Frozen):
    """Where inference runs (a local Ray by default, or a cluster address) and how the actor pool is shaped.

    One model actor per GPU when the cluster has GPUs, else one per CPU; ``num_actors`` overrides.
    ``batch_size`` defaults to the model backend's. A batch whose actor died is retried ``max_retries``
    times on the restarted actor before its tiles count as failed.
    """

    address: str | None = None
    num_actors: Annotated[int, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(gt=0, le=1024)] | None = None
    max_retries: Annotated[int, Field(ge=0, le=20)] = 3


class RegionSpec(_Frozen):
    """One regional grid that every scene of the job is composited onto, instead of a mosaic per scene.

    The grid is ``crs`` with pixels of ``resolution`` (CRS units; one number, or ``[x, y]``) anchored at the
    top-left corner of ``bounds`` (``[xmin, ymin, xmax, ymax]`` in ``bounds_crs``, the region's CRS unless
    given); with ``snap``, pixel edges fall on multiples of the resolution instead, a standard grid that
    every region of that CRS and resolution shares. ``overlap`` is the rule where scenes overlap: ``newest`` - the newest acquisition wins a
    pixel, scenes of one date (or none) in job order; older scenes fill only the pixels it leaves nodata.
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]  # names the mosaic folder and the catalog files
    crs: str = Field(min_length=1)
    resolution: Annotated[float, Field(gt=0)] | tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]
    bounds: tuple[float, float, float, float]
    bounds_crs: str | None = None
    snap: bool = False
    overlap: Literal["newest"] = "newest"

    @field_validator("crs", "bounds_crs")
    @classmethod
    def _known_crs(cls, value: str | None) -> str | None:
        from pyproj import CRS  # here, so that loading a job without a region stays light
        from pyproj.exceptions import CRSError

        if value is not None:
            try:
                CRS.from_user_input(value)
            except CRSError:
                raise ValueError(f"'{value}' is not a CRS PROJ knows (e.g. EPSG:32618, or WKT)") from None
        return value

    @field_validator("bounds")
    @classmethod
    def _ordered_bounds(cls, value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        xmin, ymin, xmax, ymax = value
        if not (xmin < xmax and ymin < ymax):
            raise ValueError(f"expected [xmin, ymin, xmax, ymax] with xmin < xmax and ymin < ymax, got {list(value)}")
        return value

    @property
    def resolution_xy(self) -> tuple[float, float]:
        return self.resolution if isinstance(self.resolution, tuple) else (self.resolution, self.resolution)


class JobSpec(_Frozen):
    """A validated job. Build it with :func:`load_job`."""

    name: str = Field(min_length=1)
    output: Path
    scenes: list[SceneSpec] = Field(min_length=1)
    prompts: list[PromptSpec] = Field(min_length=1)
    model: ModelSpec
    bands: BandIndexes = Field(default_factory=dict)
    resolution: Annotated[float, Field(gt=0)] | None = None  # target ground sample distance, metres
    tiling: TilingSpec = TilingSpec()
    storage: StorageSpec = StorageSpec()
    ray: RaySpec = RaySpec()
    acquired_at: UtcDatetime | None = None
    region: RegionSpec | None = None  # composite every scene onto this grid (one mosaic) instead of one per scene

    @field_validator("scenes", "prompts", mode="before")
    @classmethod
    def _string_shorthand(cls, value: Any, info: ValidationInfo) -> Any:
        """A plain string in these lists stands for its main field: a scene's uri, a prompt's text."""
        key = {"scenes": "uri", "prompts": "text"}[info.field_name]
        if isinstance(value, list):
            return [{key: v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("prompts")
    @classmethod
    def _unique_prompt_labels(cls, prompts: list[PromptSpec]) -> list[PromptSpec]:
        labels = [p.label for p in prompts]
        duplicated = sorted({label for label in labels if labels.count(label) > 1})
        if duplicated:
            raise ValueError(f"prompt labels must be unique, repeated: {duplicated}")
        return prompts


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job file; relative paths in it become relative to its folder.

    Raises :class:`JobSpecError` with a one-line message naming the file and field.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise JobSpecError(f"job file {path} not found") from None
    except (OSError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise JobSpecError(f"job file {path} is not valid YAML: {detail}") from None
    if not isinstance(raw, dict):
        raise JobSpecError(f"job file {path}: expected a mapping of fields, got {type(raw).__name__}")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise JobSpecError(f"job file {path}: {_describe(exc)}") from None
    return _resolve_paths(spec, path.parent)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problems.append(f"field '{field}': {error['msg']}")
    return "; ".join(problems)


def _resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    scenes = [s.model_copy(update={"uri": _resolve_uri(s.uri, base)}) for s in spec.scenes]
    output = spec.output if spec.output.is_absolute() else base / spec.output
    options = {
        key: _resolve_uri(value, base) if _names_a_file(key) and isinstance(value, str) else value
        for key, value in spec.model.options.items()
    }
    model = spec.model.model_copy(update={"options": options})
    if model.weights is not None:
        weights = model.weights.expanduser()
        model = model.model_copy(update={"weights": weights if weights.is_absolute() else (base / weights).resolve()})
    return spec.model_copy(update={"scenes": scenes, "output": output.resolve(), "model": model})


def _names_a_file(option: str) -> bool:
    """Model options that name a file or folder (resolved like scene paths): ``checkpoint``, ``*_file``, ``*_dir``."""
    return option == "checkpoint" or option.endswith(("_file", "_dir", "_path"))


def _resolve_uri(uri: str, base: Path) -> str:
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())
