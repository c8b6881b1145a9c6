"""From a request target to the one file (and blob) it may name, or to nothing.

This is the only gate between a URL and the file system or the container, so it allows a
small, explicit shape and refuses everything else instead of trying to clean paths up:
no percent-encoding at all (so no encoded slashes, dots or NUL bytes), no '.' or '..'
segments, no hidden names, no empty segments, nothing longer than a media name can be.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from .config import Config
from .media import SHA256_NAME_RE, MediaFile, media_file_for_blob, name_problem

# A content-addressed URL is at most /<root:32>/thumbnails/<sha256:64>.<ext:10> (~120
# characters); other roots get room for a few directory levels, never more than a blob name.
MAX_PATH = 1024
MAX_DEPTH = 4

_PATH_CHARS_RE = re.compile(r"^/[A-Za-z0-9._/-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_THUMBNAIL_DIR = "thumbnails"
_THUMBNAIL_RE = re.compile(r"^[0-9a-f]{64}\.png$")


def path_of_target(target: str) -> str | None:
    """The path of an origin-form or absolute-form request target, without the query."""
    if target.startswith(("http://", "https://")):
        # Absolute form (RFC 9112 3.2.2): servers must accept it; only the path matters here.
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        if slash < 0:
            return None
        target = rest[slash:]
    if not target.startswith("/"):
        return None
    # A query cannot change which file is read (cache busters like ?v=2 are common); drop it.
    path = target.split("?", 1)[0]
    return path


def media_file_for_target(config: Config, target: str) -> MediaFile | None:
    """The MediaFile a request target names, or None (the server answers 404)."""
    path = path_of_target(target)
    if path is None or len(path) > MAX_PATH or not _PATH_CHARS_RE.match(path):
        return None
    parts = path[1:].split("/")
    if len(parts) < 2 or len(parts) > MAX_DEPTH + 1:
        return None
    if any(not _SEGMENT_RE.match(p) for p in parts):
        # Also refuses '', '.', '..' and hidden names: a segment must start with a letter or digit.
        return None
    root = config.root_named(parts[0])
    if root is None:
        return None
    rel = parts[1:]
    if root.content_addressed:
        top_level = len(rel) == 1 and SHA256_NAME_RE.match(rel[0])
        thumbnail = len(rel) == 2 and rel[0] == _THUMBNAIL_DIR and _THUMBNAIL_RE.match(rel[1])
        if not (top_level or thumbnail):
            return None
    elif name_problem(PurePosixPath(*rel)):
        return None
    media = media_file_for_blob(config, "/".join(parts))
    if media is None or media.blob_name != "/".join(parts):
        return None
    return media
