"""Scene identity: what a scene's files are now, so that a nightly run knows which scenes changed.

A scene's identity is a short hash of each of its files' identities (local: size and modification time;
HTTP(S): ``ETag``, else ``Last-Modified`` and ``Content-Length`` from a HEAD request; S3: the object's
``ETag``) together with what discovery decided about the scene (band sources, acquisition time, grid).
A file replaced in place therefore changes its scene's identity, and the scene is processed again.
Costs one ``stat`` per local file and one HEAD request per remote one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.request

from geobatch.access import Access, is_remote, s3_client
from geobatch.errors import SceneUnreadable
from geobatch.scenes import Scene

log = logging.getLogger(__name__)


def scene_identity(scene: Scene, access: Access | None = None) -> str:
    """A hash that changes when any of the scene's files changes (size, mtime or ETag) or its description does."""
    files = sorted({scene.uri, *(source.uri for source in scene.bands.values())} - {""})
    described = {
        "files": {uri: file_identity(uri, access) for uri in files},
        "bands": {name: repr(source) for name, source in sorted(scene.bands.items())},
        "acquired_at": scene.acquired_at.isoformat() if scene.acquired_at else None,
        "grid": [list(scene.shape), list(scene.geobox.affine)[:6], str(scene.geobox.crs)],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def file_identity(uri: str, access: Access | None = None) -> str:
    """``size:mtime_ns`` of a local file, the ETag (or Last-Modified and size) of a remote one.

    A remote file whose server answers no identity gives ``""``: it counts as unchanged once processed.
    """
    if not is_remote(uri):
        try:
            info = os.stat(uri)
        except OSError:
            return ""  # a STAC item's own href or a missing file: the scene failed at open anyway
        return f"{info.st_size}:{info.st_mtime_ns}"
    if uri.startswith(("http://", "https://")):
        return _http_identity(uri)
    if uri.startswith("s3://"):
        return _s3_identity(uri, access)
    return ""


def _http_identity(uri: str) -> str:
    try:
        with urllib.request.urlopen(urllib.request.Request(uri, method="HEAD"), timeout=30) as response:
            headers = response.headers
    except OSError as exc:
        log.warning("no identity for %s (%s): it counts as unchanged once processed", uri, exc)
        return ""
    if headers.get("ETag"):
        return f"etag:{headers['ETag']}"
    return f"{headers.get('Content-Length', '')}:{headers.get('Last-Modified', '')}"


def _s3_identity(uri: str, access: Access | None) -> str:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        head = s3_client(access or Access()).head_object(Bucket=bucket, Key=key)
    except (ImportError, SceneUnreadable, BotoCoreError, ClientError) as exc:
        log.warning("no identity for %s (%s): it counts as unchanged once processed", uri, exc)
        return ""
    return f"etag:{head.get('ETag', '')}"
