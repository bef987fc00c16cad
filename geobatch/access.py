"""Access: how a scene's bytes are reached (local files, HTTP(S) range reads, S3) and retried.

GDAL does the I/O: its ``/vsicurl/`` and ``/vsis3/`` drivers fetch only the byte ranges a window needs.
This module turns job URIs into GDAL paths, builds the GDAL configuration for the job's storage settings,
and retries remote operations that failed, with exponential backoff.
Credentials are never part of that configuration: GDAL reads them from each machine's environment or
the named profile, so they cannot reach a log or an output.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import rasterio
from rasterio.errors import RasterioError

from geobatch.errors import SceneUnreadable
from geobatch.jobs import StorageSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

_BUCKET_PREFIXES = {"s3://": "/vsis3/", "gs://": "/vsigs/"}

# Read a COG's header in one request, never list a "directory" of a URL, merge adjacent tile ranges;
# and a block cache of a few tiles' blocks: GDAL's default (5 % of the machine's memory per process)
# makes every reader grow with the scene until it holds over a gigabyte.
_GDAL_DEFAULTS = {
    "GDAL_CACHEMAX": "64",  # MiB (a job's gdal_options may set another number of MiB)
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "VSI_CACHE": "TRUE",
}

# Remote errors that retrying cannot fix: client errors other than timeout / too many requests, and
# S3's answers for a missing key, bucket or identity. Anything else remote is retried: GDAL reports a
# dropped connection during a read only as "Read failed" / "IReadBlock failed", like a corrupt block.
_PERMANENT = re.compile(
    r"HTTP response code: 4(?!08|29)\d\d|specified (?:key|bucket) does not exist|not exist in our records|"
    r"AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch",
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


def is_permanent(exc: BaseException) -> bool:
    """Whether a remote failure (``exc`` or its GDAL cause) is one that no retry can fix."""
    return bool(_PERMANENT.search(f"{exc} {exc.__cause__ or ''}"))


@dataclass(frozen=True, slots=True)
class Access:
    """GDAL settings and retry policy for one job's scenes; cheap to pass to every worker."""

    gdal_options: dict[str, str] = field(default_factory=lambda: dict(_GDAL_DEFAULTS))
    retries: int = StorageSpec.model_fields["retries"].default  # the job's defaults, in one place
    backoff_s: float = StorageSpec.model_fields["retry_backoff_s"].default

    @classmethod
    def from_spec(cls, storage: StorageSpec) -> Access:
        options: dict[str, str] = {}
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
        return cls(_GDAL_DEFAULTS | options | storage.gdal_options, storage.retries, storage.retry_backoff_s)

    @contextmanager
    def env(self, **extra: str) -> Iterator[None]:
        """GDAL configured for this job (plus ``extra``); every GDAL call on a scene runs inside it."""
        options = {**self.gdal_options, **_credential_files(), **extra}
        if "GDAL_CACHEMAX" in options:  # rasterio sets GDAL's cache size itself, from a number of bytes
            options["GDAL_CACHEMAX"] = int(options["GDAL_CACHEMAX"]) * 2**20
        with rasterio.Env(**options):
            yield

    def retrying(self, uri: str, operation: Callable[[], T], on_retry: Callable[[], None] | None = None) -> T:
        """Run ``operation`` on ``uri``; if remote, retry failures ``retries`` times, waiting ``backoff_s`` x 2^k.

        Local files and permanent remote errors (404, access denied) fail at once. Retries bypass GDAL's
        per-process cache of the URL, which would otherwise replay a failed open without asking the server.
        ``on_retry`` runs before each new attempt (e.g. to reopen a dataset whose connection broke).
        """
        attempt, extra = 0, {}
        while True:
            try:
                with self.env(**extra):
                    return operation()
            except RasterioError as exc:
                if not is_remote(uri) or attempt == self.retries or is_permanent(exc):
                    raise
                delay = self.backoff_s * 2**attempt
                attempt += 1
                log.info("%s failed (%s); retry %d/%d in %.2f s", uri, exc, attempt, self.retries, delay)
                time.sleep(delay)
                extra = {"CPL_VSIL_CURL_NON_CACHED": gdal_path(uri)}
                if on_retry:
                    on_retry()


@contextmanager
def gdal_warnings() -> Iterator[list[str]]:
    """Collect what GDAL warns while the block runs: the HTTP status behind a bare "Read failed", say."""
    warnings: list[str] = []
    handler = _Collector(warnings)
    logger = logging.getLogger("rasterio._err")  # where rasterio sends GDAL's non-fatal messages
    logger.addHandler(handler)
    try:
        yield warnings
    finally:
        logger.removeHandler(handler)


def describe_error(exc: RasterioError, warnings: list[str]) -> str:
    """One line: rasterio's message, GDAL's reason (the exception's cause) and GDAL's last warning."""
    parts = [str(exc), f"({exc.__cause__})" if exc.__cause__ else "", f"[GDAL: {warnings[-1]}]" if warnings else ""]
    return " ".join(" ".join(part.split()) for part in parts if part)


class _Collector(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _credential_files() -> dict[str, str]:
    """Point GDAL at the AWS credential and config files that boto3 users name (GDAL has its own names)."""
    names = {"AWS_SHARED_CREDENTIALS_FILE": "CPL_AWS_CREDENTIALS_FILE", "AWS_CONFIG_FILE": "CPL_AWS_CONFIG_FILE"}
    return {gdal: os.environ[aws] for aws, gdal in names.items() if aws in os.environ and gdal not in os.environ}


def s3_client(access: Access):
    """A boto3 S3 client configured like GDAL for this job (endpoint, region, profile); credentials from
    the environment, the profile or the instance role, as for GDAL. Needs boto3 (``pip install geobatch[s3]``)."""
    try:
        import boto3
    except ImportError:
        raise SceneUnreadable("listing or checking s3:// objects needs boto3: pip install 'geobatch[s3]'") from None
    options = access.gdal_options
    endpoint = options.get("AWS_S3_ENDPOINT")
    if endpoint:
        endpoint = ("http://" if options.get("AWS_HTTPS") == "NO" else "https://") + endpoint
    session = boto3.Session(profile_name=options.get("AWS_PROFILE"), region_name=options.get("AWS_REGION"))
    return session.client("s3", endpoint_url=endpoint)


def list_bucket(uri: str, access: Access) -> list[str]:
    """The ``s3://`` URIs of the GeoTIFFs under a prefix (``s3://bucket/path/``) or matching a glob
    (``s3://bucket/path/*_2024*.tif``; ``*`` does not cross ``/``), sorted. One LIST request per 1000 keys."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, pattern = uri.removeprefix("s3://").partition("/")
    prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    if pattern.endswith("/") or not pattern:  # a prefix: the GeoTIFFs directly under it
        matcher = re.compile(re.escape(pattern) + r"[^/]+\.tiff?", re.IGNORECASE)
    else:
        matcher = re.compile(fnmatch.translate(pattern).replace(".*", "[^/]*"))
    found = []
    try:
        for page in s3_client(access).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [item["Key"] for item in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as exc:
        raise SceneUnreadable(f"cannot list {uri}: {' '.join(str(exc).split())}") from None
    return [f"s3://{bucket}/{key}" for key in sorted(found) if matcher.fullmatch(key)]
