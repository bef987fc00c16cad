"""GeoPixel's weights: find them in one local folder, load them safely, check them, convert them.

A checkpoint folder holds ``config.json``, the tokenizer files (``tokenizer.model``,
``added_tokens.json``) and the weights, in the official names, as one of:

* ``model.safetensors``, or shards listed by ``model.safetensors.index.json`` (preferred: read without
  unpickling, tensor by tensor);
* ``pytorch_model.bin``, or shards listed by ``pytorch_model.bin.index.json`` (the official release):
  read with ``torch.load(weights_only=True)`` only, one shard at a time, so memory holds the model plus
  one shard, never a second copy of the model.

Every official tensor must be either mapped onto exactly one of our parameters (by the model's
``checkpoint_names()``), with the same shape, or lie under one of its ``unused_official_prefixes``
(SAM2's video-memory modules, unused LoRA adapters); every parameter must be filled exactly once.
Anything else is a one-line :class:`CheckpointError` naming the file and the tensor. Nothing here
opens a network connection. :func:`convert` writes safetensors once, so later loads are fast and safe.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from geobatch.models.geopixel.tokenizer import CheckpointError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SAFETENSORS_INDEX, SAFETENSORS_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json")
# small files a converted folder keeps besides the weights (tokenizer settings; never code)
KEPT_FILES = ("config.json", *TOKENIZER_FILES, "special_tokens_map.json", "tokenizer_config.json")
WeightFormat = Literal["safetensors", "bin"]


@dataclass(frozen=True, slots=True)
class CheckpointFiles:
    """Where a checkpoint's weights are: its format and shard files, in order."""

    directory: Path
    format: WeightFormat
    shards: tuple[Path, ...]

    @property
    def config_path(self) -> Path:
        return self.directory / "config.json"


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a load used: tensors mapped onto the model, tensors skipped as unused by design, from where."""

    files: CheckpointFiles
    loaded: int
    ignored: int


def find_checkpoint(directory: str | Path) -> CheckpointFiles:
    """The weight files of the checkpoint in ``directory``: safetensors when present, else ``.bin``.

    Raises :class:`CheckpointError` when the folder, ``config.json``, the tokenizer files or a listed
    shard is missing.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"GeoPixel weights folder {directory} does not exist")
    for name in ("config.json", *TOKENIZER_FILES):
        if not (directory / name).is_file():
            raise CheckpointError(f"GeoPixel weights folder {directory} has no {name}")
    for weight_format, index, single in (
        ("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE),
        ("bin", BIN_INDEX, BIN_SINGLE),
    ):
        if (directory / index).is_file():
            return CheckpointFiles(directory, weight_format, _indexed_shards(directory / index))
        if (directory / single).is_file():
            return CheckpointFiles(directory, weight_format, (directory / single,))
    raise CheckpointError(
        f"GeoPixel weights folder {directory} has no weights: expected {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
        f"{BIN_INDEX} or {BIN_SINGLE}"
    )


def _indexed_shards(index: Path) -> tuple[Path, ...]:
    weight_map = _read_index(index)
    shards = tuple(index.parent / name for name in sorted(set(weight_map.values())))
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index} lists shard {shard.name}, which is missing")
    return shards


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a shard index with a 'weight_map' ({exc})") from None
    return {str(k): str(v) for k, v in weight_map.items()}


def read_config(files: CheckpointFiles) -> dict:
    """``config.json`` as a dict."""
    try:
        config = json.loads(files.config_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{files.config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{files.config_path}: expected a JSON object")
    return config


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file, on the CPU; ``.bin`` files through ``weights_only`` unpickling only."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        state = _torch_load(path)
    except pickle.UnpicklingError as exc:  # what weights_only raises for anything but plain tensors
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"{path}: refused: not loadable as plain tensors with weights_only=True ({detail})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable PyTorch weight file ({' '.join(str(exc).split())[:300]})"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors")
    return dict(state)


def _torch_load(path: Path):
    """``torch.load`` with ``weights_only``, memory-mapped (a legacy non-zip file cannot be: read whole)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def iter_tensors(files: CheckpointFiles) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Each shard's tensors in turn (one shard in memory at a time)."""
    for shard in files.shards:
        yield shard, read_shard(shard)


def load_weights(model: torch.nn.Module, files: CheckpointFiles) -> LoadReport:
    """Copy the checkpoint's tensors into ``model`` (converting to each parameter's dtype), checked.

    ``model`` provides ``checkpoint_names()`` (our state-dict key -> official key) and
    ``unused_official_prefixes``. Raises :class:`CheckpointError` for an official tensor that maps to
    nothing, one seen twice, a shape that differs, or a parameter no tensor filled.
    """
    import torch

    targets = model.state_dict()
    official_to_ours = _official_to_ours(model.checkpoint_names(), targets)
    unused = tuple(model.unused_official_prefixes)
    filled: dict[str, Path] = {}
    ignored = 0
    with torch.no_grad():
        for shard, tensors in iter_tensors(files):
            for key, tensor in tensors.items():
                ours = official_to_ours.get(key)
                if ours is None:
                    if not key.startswith(unused):
                        raise CheckpointError(f"{shard}: tensor '{key}' is not part of GeoPixel's architecture")
                    ignored += 1
                    continue
                if key in filled:
                    raise CheckpointError(f"{shard}: tensor '{key}' appears again (first in {filled[key].name})")
                target = targets[ours]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"{shard}: tensor '{key}' has shape {list(tensor.shape)}, the model expects "
                        f"{list(target.shape)} (does config.json match these weights?)"
                    )
                target.copy_(tensor)
                filled[key] = shard
            del tensors  # before the next shard is read
    missing = sorted(set(official_to_ours) - set(filled))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{files.directory}: no tensor for {missing[:3]}{more}")
    return LoadReport(files, loaded=len(filled), ignored=ignored)


def _official_to_ours(names: Mapping[str, str], targets: Mapping[str, object]) -> dict[str, str]:
    """The inverse of ``checkpoint_names()``, checked to cover every state-dict entry exactly once."""
    uncovered = sorted(set(targets) - set(names))
    unknown = sorted(set(names) - set(targets))
    if uncovered or unknown:
        raise CheckpointError(
            f"checkpoint_names() does not match the model: uncovered {uncovered[:3]}, unknown {unknown[:3]}"
        )
    inverse: dict[str, str] = {}
    for ours, official in names.items():
        if official in inverse:
            raise CheckpointError(f"checkpoint_names() maps both '{inverse[official]}' and '{ours}' to '{official}'")
        inverse[official] = ours
    return inverse


@dataclass(frozen=True, slots=True)
class CheckpointSummary:
    """What a weights folder holds, read from its index and file headers only (no tensor is loaded)."""

    files: CheckpointFiles
    tensors: int | None  # None for a single .bin file, whose names are only known by unpickling it
    size_bytes: int

    def describe(self) -> str:
        tensors = f"{self.tensors} tensors" if self.tensors is not None else "tensors not listed"
        return f"{self.files.format}, {len(self.files.shards)} file(s), {tensors}, {self.size_bytes / 2**30:.2f} GiB"


def summarize(directory: str | Path) -> CheckpointSummary:
    """A weights folder's format, shard count, tensor count and size; raises :class:`CheckpointError`."""
    files = find_checkpoint(directory)
    read_config(files)
    if files.format == "safetensors":
        tensors = sum(len(_safetensors_names(shard)) for shard in files.shards)
    elif len(files.shards) > 1 or (files.directory / BIN_INDEX).is_file():
        tensors = len(_read_index(files.directory / BIN_INDEX))
    else:
        tensors = None
    return CheckpointSummary(files, tensors, sum(shard.stat().st_size for shard in files.shards))


def _safetensors_names(path: Path) -> list[str]:
    """Tensor names in a safetensors file's JSON header (8-byte little-endian length, then the header)."""
    with path.open("rb") as stream:
        try:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(length))
        except (struct.error, ValueError) as exc:
            raise CheckpointError(f"{path}: not a safetensors file ({exc})") from None
    return [name for name in header if name != "__metadata__"]


def convert(source: str | Path, target: str | Path) -> CheckpointFiles:
    """Write the checkpoint in ``source`` to ``target`` as safetensors shards (one per source shard) + index.

    Names, dtypes and values are kept as they are; ``config.json`` and the tokenizer files are copied
    (no code files). ``target`` may be ``source`` itself: the safetensors then sit beside the ``.bin``
    files, and loads prefer them. Memory: one shard at a time.
    """
    from safetensors.torch import save_file

    files = find_checkpoint(source)
    target = Path(target).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    if files.format == "safetensors" and files.directory.resolve() == target.resolve():
        return files
    weight_map: dict[str, str] = {}
    total = 0
    count = len(files.shards)
    for number, (shard, tensors) in enumerate(iter_tensors(files), start=1):
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        tensors = _unshared(tensors)
        save_file(tensors, target / name, metadata={"format": "pt"})
        log.info("converted %s -> %s (%d tensors)", shard.name, name, len(tensors))
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    for kept in KEPT_FILES:
        if (files.directory / kept).is_file() and files.directory.resolve() != target.resolve():
            shutil.copyfile(files.directory / kept, target / kept)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (target / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return find_checkpoint(target)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with storage of its own (safetensors refuses shared storage)."""
    seen: set[int] = set()
    result = {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        result[key] = tensor.contiguous().clone() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    return result


def load_geopixel(files: CheckpointFiles, *, device: str, dtype: str):
    """The GeoPixel model of ``files``, built from its ``config.json`` on ``device`` in ``dtype``, weights loaded."""
    from geobatch.models.geopixel.config import GeoPixelConfig

    config = GeoPixelConfig.from_dict(read_config(files), source=str(files.config_path))
    model = build_model(config, device=device, dtype=dtype)
    report = load_weights(model, files)
    log.info("GeoPixel loaded from %s: %d tensors, %d unused by design", files.directory, report.loaded, report.ignored)
    return model.eval()


def build_model(config, *, device: str, dtype: str):
    """Our GeoPixel for ``config`` (a ``GeoPixelConfig``), built directly on ``device`` in ``dtype``.

    Its parameters are *not* initialised (they hold whatever memory held): the caller fills every one,
    from a checkpoint (:func:`load_weights` checks that) or with random values (``bench/``). Building in
    the target dtype on the target device means a 7B model never passes through float32 or CPU memory.
    """
    import torch
    from transformers.initialization import no_init_weights

    from geobatch.models.geopixel.engine import GeoPixel

    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # no layer computes a persistent float32 buffer at build time
    try:
        with torch.device(device), no_init_weights():
            return GeoPixel(config)
    finally:
        torch.set_default_dtype(default)
