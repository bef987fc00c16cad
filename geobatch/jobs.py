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


class SceneSpec(_Frozen):
    """One scene entry: a path, glob or URL, optionally with its acquisition time."""

    uri: str = Field(min_length=1)
    acquired_at: UtcDatetime | None = None


class PromptSpec(_Frozen):
    """A prompt as given in the job; ``label`` is the short name used in outputs."""

    text: str = Field(min_length=1)
    kind: Literal["class", "referring", "gcg"] = "class"
    label: str | None = None

    @model_validator(mode="after")
    def _default_label(self) -> PromptSpec:
        if self.label is None:
            slug = re.sub(r"[^a-z0-9]+", "_", self.text.lower()).strip("_")
            object.__setattr__(self, "label", slug or "object")
        return self


class ModelSpec(_Frozen):
    """Which backend to run (a name from the model registry) and its options."""

    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


class TilingSpec(_Frozen):
    """Tile grid: each tile owns a ``core`` x ``core`` block and sees ``overlap`` more pixels per side."""

    core: Annotated[int, Field(gt=0, le=16384)] = 512
    overlap: Annotated[int, Field(ge=0, le=4096)] = 32


class RaySpec(_Frozen):
    """Where inference runs: a local Ray by default, or a cluster address."""

    address: str | None = None
    num_actors: Annotated[int, Field(gt=0)] | None = None


class JobSpec(_Frozen):
    """A validated job. Build it with :func:`load_job`."""

    name: str = Field(min_length=1)
    output: Path
    scenes: list[SceneSpec] = Field(min_length=1)
    prompts: list[PromptSpec] = Field(min_length=1)
    model: ModelSpec
    bands: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    tiling: TilingSpec = TilingSpec()
    ray: RaySpec = RaySpec()
    acquired_at: UtcDatetime | None = None

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

    @field_validator("bands")
    @classmethod
    def _known_bands(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(BAND_NAMES))
        if unknown:
            raise ValueError(f"unknown band name(s) {unknown}; choose from {list(BAND_NAMES)}")
        return value

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
    return spec.model_copy(update={"scenes": scenes, "output": output.resolve()})


def _resolve_uri(uri: str, base: Path) -> str:
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())
