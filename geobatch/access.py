"""Access: how a scene's bytes are reached (local files, HTTP(S) range reads, S3) and retried.

GDAL does the I/O: its ``/vsicurl/`` and ``/vsis3/`` drivers fetch only the byte ranges a window needs.
This module turns job URIs into GDAL paths, builds the GDAL configuration for the job's storage settings,
and retries operations that failed for a transient network reason, with exponential backoff.
Credentials are never part of that configuration: GDAL reads them from each machine's environment or
the named profile, so they cannot reach a log or an output.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import rasterio
from rasterio.errors import RasterioError

from geobatch.jobs import StorageSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

_BUCKET_PREFIXES = {"s3://": "/vsis3/", "gs://": "/vsigs/"}

# Read a COG's header in one request, never list a "directory" of a URL, merge adjacent tile ranges.
_REMOTE_DEFAULTS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "VSI_CACHE": "TRUE",
}

# What a network hiccup looks like in GDAL's messages (curl errors, 5xx, 429, timeouts, resets).
_TRANSIENT = re.compile(
    r"curl error|HTTP (?:error )?(?:code )?(?:: )?(?:429|5\d\d)|timed? ?out|connection|empty reply|"
    r"couldn't connect|recv failure|send failure|reset by peer",
    re.IGNORECASE,
)


def gdal_path(uri: str) -> str:
    """The path GDAL opens for ``uri``: ``s3://b/k`` becomes ``/vsis3/b/k``, URLs go through ``/vsicurl/``."""
    if uri.startswith(("http://", "https://")):
        return f"/vsicurl/{uri}"
    for scheme, prefix in _BUCKET_PREFIXES.items():
        if uri.startswith(scheme):
            return prefix + uri.removeprefix(scheme)
    return uri


def is_remote(uri: str) -> bool:
    return "://" in uri


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or its GDAL cause) looks like a network failure worth retrying."""
    return bool(_TRANSIENT.search(f"{exc} {exc.__cause__ or ''}"))


@dataclass(frozen=True, slots=True)
class Access:
    """GDAL settings and retry policy for one job's scenes; cheap to pass to every worker."""

    gdal_options: dict[str, str] = field(default_factory=dict)
    retries: int = 4
    backoff_s: float = 0.5

    @classmethod
    def from_spec(cls, storage: StorageSpec) -> Access:
        options = dict(_REMOTE_DEFAULTS)
        if storage.s3_endpoint:
            scheme, _, host = storage.s3_endpoint.rpartition("://")
            options |= {"AWS_S3_ENDPOINT": host, "AWS_VIRTUAL_HOSTING": "FALSE"}
            options["AWS_HTTPS"] = "NO" if scheme == "http" else "YES"
        if storage.s3_region:
            options["AWS_REGION"] = storage.s3_region
        if storage.s3_profile:
            options["AWS_PROFILE"] = storage.s3_profile
        if storage.requester_pays:
            options["AWS_REQUEST_PAYER"] = "requester"
        return cls(options | storage.gdal_options, storage.retries, storage.retry_backoff_s)

    @contextmanager
    def env(self) -> Iterator[None]:
        """GDAL configured for this job; every GDAL call on a scene runs inside it."""
        with rasterio.Env(**self.gdal_options):
            yield

    def retrying(self, operation: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
        """Run ``operation``; retry transient failures ``retries`` times, waiting ``backoff_s`` x 2^k.

        ``on_retry`` runs before each new attempt (e.g. to reopen a dataset whose connection broke).
        Non-transient errors (a corrupt block, a missing file) are raised at once.
        """
        attempt = 0
        while True:
            try:
                with self.env():
                    return operation()
            except RasterioError as exc:
                if attempt == self.retries or not is_transient(exc):
                    raise
                delay = self.backoff_s * 2**attempt
                attempt += 1
                log.info("%s failed (%s); retry %d/%d in %.1f s", what, exc, attempt, self.retries, delay)
                time.sleep(delay)
                if on_retry:
                    on_retry()
