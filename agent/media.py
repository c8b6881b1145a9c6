"""Which local files are media, and the blob name each one gets.

The blob name mirrors the site's URL path (`video/<sha256>.mp4`), so the stream server maps a
request to a blob without a lookup, and the DB pointer can be joined to `assets` by name.
"""

from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .config import Config, MediaRoot

SHA256_NAME_RE = re.compile(r"^(?P<sha>[0-9a-f]{64})\.(?P<ext>[A-Za-z0-9]{1,10})$")
MAX_BLOB_NAME = 1024
# One regex search instead of a Python loop per character: the scan runs this for every file.
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")

# Names that writers use while a file is incomplete (editors, rsync, curl, browsers, PHP
# temporary copies). Such a file is never uploaded; the final rename fires a new event.
_TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".swp", ".swx", ".download", "~")

_CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "m4a": "audio/mp4",
    "aac": "audio/aac",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "oga": "audio/ogg",
    "opus": "audio/opus",
    "mp4": "video/mp4",
    "m4v": "video/mp4",
    "mov": "video/quicktime",
    "webm": "video/webm",
    "mkv": "video/x-matroska",
    "avi": "video/x-msvideo",
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}


@dataclass(frozen=True)
class MediaFile:
    """A file under a media root, named the way the site and the container name it."""

    root: MediaRoot
    relpath: PurePosixPath

    @property
    def path(self) -> Path:
        return self.root.path.joinpath(*self.relpath.parts)

    @property
    def blob_name(self) -> str:
        return f"{self.root.name}/{self.relpath.as_posix()}"

    @property
    def expected_sha256(self) -> str | None:
        """The sha256 the name promises, for top-level files of content-addressed roots.

        Thumbnails (`video/thumbnails/<sha>.png`) carry the video's hash, not their own, so only
        files directly in the root are held to their name.
        """
        if not self.root.content_addressed or len(self.relpath.parts) != 1:
            return None
        m = SHA256_NAME_RE.match(self.relpath.name)
        return m.group("sha") if m else None

    @property
    def content_type(self) -> str:
        return content_type_for(self.relpath.name)


def content_type_for(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return _CONTENT_TYPES.get(ext) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def name_problem(relpath: PurePosixPath) -> str | None:
    """Why a relative path is not uploadable media, or None if it is."""
    for part in relpath.parts:
        if part.startswith("."):
            return "hidden file or directory"
        # Azure rejects path segments that end in a dot, and a trailing backslash would be
        # read as a separator by some clients.
        if part.endswith(".") or "\\" in part:
            return "name not representable as a blob name"
    name = relpath.name.lower()
    if name.endswith(_TEMP_SUFFIXES) or name.startswith("~"):
        return "temporary file"
    if _CONTROL_CHAR.search(relpath.as_posix()):
        return "control character in name"
    return None


def media_file_for_path(config: Config, path: Path) -> MediaFile | None:
    """The MediaFile for an absolute local path, or None when it lies outside every root."""
    for root in config.roots:
        try:
            rel = path.relative_to(root.path)
        except ValueError:
            continue
        if not rel.parts:
            return None
        return MediaFile(root=root, relpath=PurePosixPath(*rel.parts))
    return None


def media_file_for_blob(config: Config, blob_name: str) -> MediaFile | None:
    """The MediaFile a blob name (= URL path without the leading slash) refers to, if valid."""
    if len(blob_name) > MAX_BLOB_NAME or "\x00" in blob_name:
        return None
    parts = blob_name.split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return None
    root = config.root_named(parts[0])
    if root is None:
        return None
    rel = PurePosixPath(*parts[1:])
    if name_problem(rel):
        return None
    return MediaFile(root=root, relpath=rel)
