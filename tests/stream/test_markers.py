"""The verified-file markers on their own (agent/stream/markers.py): what is written, what a stale
marker does, and that their number stays bounded. Real files in a temporary directory."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path, PurePosixPath

import pytest

from agent.config import MediaRoot
from agent.media import MediaFile
from agent.stream.markers import VerifiedMarkers, apache_etag

from .support import wait_for

OLD = 1_600_000_000


@pytest.fixture
def setup(tmp_path: Path) -> tuple[VerifiedMarkers, Path, Path]:
    media, verified = tmp_path / "video", tmp_path / "verified"
    media.mkdir()
    verified.mkdir()
    return VerifiedMarkers(verified, 16, {"video": media}), media, verified


def media_file(media: Path, n: int, size: int = 10) -> tuple[MediaFile, Path]:
    data = n.to_bytes(4, "big") * (size // 4 + 1)
    data = data[:size]
    name = f"{hashlib.sha256(data).hexdigest()}.mp4"
    path = media / name
    path.write_bytes(data)
    os.utime(path, (OLD + n, OLD + n))
    root = MediaRoot(name="video", path=media, content_addressed=True)
    return MediaFile(root, PurePosixPath(name)), path


def names(verified: Path) -> set[str]:
    return {p.name for p in (verified / "video").iterdir()}


def test_a_gate_and_an_identity_per_verified_file(setup) -> None:
    markers, media, verified = setup
    mf, path = media_file(media, 1)
    st = path.stat()
    markers.vouch(mf, st)
    assert names(verified) == {f"{path.name}.{st.st_size}", f"{path.name}.{apache_etag(st)}"}
    for p in (verified / "video").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644 and p.stat().st_size == 0
    markers.vouch(mf, st)  # again: nothing new
    assert len(names(verified)) == 2
    markers.withdraw(mf, st.st_size)
    assert names(verified) == {f"{path.name}.{apache_etag(st)}"}


def test_a_file_changed_a_moment_ago_gets_no_markers(setup) -> None:
    """Apache's ETag for it would be weak, and never match the identity."""
    markers, media, verified = setup
    mf, path = media_file(media, 2)
    os.utime(path)  # now
    markers.vouch(mf, path.stat())
    assert not (verified / "video").exists() or names(verified) == set()


def test_sweep_removes_markers_of_changed_or_gone_files(setup) -> None:
    markers, media, verified = setup
    kept, kept_path = media_file(media, 3)
    changed, changed_path = media_file(media, 4)
    gone, gone_path = media_file(media, 5)
    for mf, p in ((kept, kept_path), (changed, changed_path), (gone, gone_path)):
        markers.vouch(mf, p.stat())
    (verified / "video" / "stray").write_text("")
    changed_path.write_bytes(b"x" * 10)  # same size, another write
    os.utime(changed_path, (OLD, OLD))
    gone_path.unlink()
    assert markers.sweep() == 2
    st = kept_path.stat()
    # The changed file's gate went with its identity: the server answers it again.
    assert names(verified) == {f"{kept_path.name}.{st.st_size}", f"{kept_path.name}.{apache_etag(st)}"}


def test_their_number_stays_bounded(setup) -> None:
    markers, media, verified = setup
    made = []
    for n in range(40):
        mf, path = media_file(media, 100 + n)
        markers.vouch(mf, path.stat())
        made.append(path)
        assert len(names(verified)) < markers.limit + 2
    # The newest file's markers are always there.
    st = made[-1].stat()
    assert f"{made[-1].name}.{st.st_size}" in names(verified)


def test_an_unwritable_directory_is_reported_once_and_costs_nothing(tmp_path: Path, caplog) -> None:
    media = tmp_path / "video"
    media.mkdir()
    markers = VerifiedMarkers(tmp_path / "missing", 16, {"video": media})
    for n in range(3):
        mf, path = media_file(media, 200 + n)
        markers.vouch(mf, path.stat())
    assert caplog.text.count("cannot write verified-file markers") == 1


def test_the_running_server_drops_the_gate_of_a_file_rewritten_at_the_same_size(setup) -> None:
    """Without a request reaching the server: the periodic sweep does it (the next request then
    goes to the server, which vouches again once the agent has hashed the new file)."""
    markers, media, verified = setup
    mf, path = media_file(media, 7)
    markers.vouch(mf, path.stat())
    gate = verified / "video" / f"{path.name}.{path.stat().st_size}"
    assert gate.exists()
    stop = threading.Event()
    sweeper = markers.keep_sweeping(0.05, stop)
    try:
        path.write_bytes(b"y" * 10)  # same size, in place
        os.utime(path, (OLD, OLD))
        wait_for(lambda: not gate.exists(), what="the sweep to drop the gate")
        assert names(verified) == set()
    finally:
        stop.set()
        sweeper.join()
