"""Sample files shaped like GigHive's media library: `<sha256>.<ext>` under audio/ and video/, and
`video/thumbnails/<video sha256>.png`."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

_CHUNK = 1 << 20


def _blocks(size: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    remaining = size
    while remaining:
        n = min(_CHUNK, remaining)
        yield rng.randbytes(n)
        remaining -= n


def pseudo_random_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes: exactly what make_content_addressed(root, size, ext, seed) writes."""
    return b"".join(_blocks(size, seed))


def make_content_addressed(
    root: os.PathLike[str] | str, size: int, ext: str = "mp4", seed: int = 0
) -> tuple[Path, str]:
    """Write a file named after the sha256 of its (pseudo-random) content. Returns (path, sha256).

    Large sizes are written in 1 MiB chunks so multi-GiB test files do not need that much memory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    tmp = root / f".tmp-{os.getpid()}-{seed}-{size}.{ext}"
    with open(tmp, "wb") as f:
        for block in _blocks(size, seed):
            h.update(block)
            f.write(block)
    sha = h.hexdigest()
    path = root / f"{sha}.{ext.lstrip('.')}"
    # Rename so a watcher under test never sees a half-written content-addressed name.
    os.replace(tmp, path)
    return path, sha


def _png(width: int = 4, height: int = 4, rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def make_thumbnail(video_root: os.PathLike[str] | str, video_sha: str) -> Path:
    """Write video_root/thumbnails/<video_sha>.png (a real, tiny PNG)."""
    d = Path(video_root) / "thumbnails"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{video_sha}.png"
    # Colour derived from the sha, so thumbnails of different videos differ in content too.
    data = _png(rgb=tuple(bytes.fromhex(video_sha[:6])))  # type: ignore[arg-type]
    tmp = d / f".tmp-{video_sha}.png"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def sha256_file(path: os.PathLike[str] | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def make_media_roots(root: Path) -> dict[str, Path]:
    """GigHive's library layout under root: {"root", "audio", "video", "thumbnails"}, created."""
    roots = {
        "root": root,
        "audio": root / "audio",
        "video": root / "video",
        "thumbnails": root / "video" / "thumbnails",
    }
    for p in roots.values():
        p.mkdir(parents=True, exist_ok=True)
    return roots
