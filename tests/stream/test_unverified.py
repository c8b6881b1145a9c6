"""A file under its final name is not proof of its bytes: GigHive's zip import and copy() write in
place, rsync --partial leaves a cut file, bytes rot. Such a file is never answered with the name's
promise (its sha256 as ETag, the fixed Last-Modified, immutable), by the server, by nginx (which
sends only what the server hands over) or through Apache; If-Range with the name's ETag never
splices its bytes into a 206; and once the agent has verified the file, the promise comes back.

Every step is a state the test makes (bytes written, a state row recorded); nothing waits for time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.state import StateStore
from tests.support.media import pseudo_random_bytes

from .conftest import X_ACCEL_PREFIX, MediaItem, MediaLibrary, apache_address, apache_in_front, nginx_in_front
from .support import Address, request

FIXED_DATE = "Sat, 01 Jan 2000 00:00:00 GMT"
SIZE = 600_001


@pytest.fixture(params=["server", "nginx", "apache"])
def front(
    request: pytest.FixtureRequest, start_server, fresh_library: MediaLibrary, tmp_path: Path
) -> Iterator[Address]:
    """The place a client asks: the server itself, nginx (X-Accel handover) or Apache (from disk
    when the server's markers say the file is verified, else proxied)."""
    if request.param == "server":
        yield start_server(fresh_library).tcp
    elif request.param == "nginx":
        srv = start_server(fresh_library, STREAM_X_ACCEL_PREFIX=X_ACCEL_PREFIX)
        nginx = nginx_in_front(tmp_path / "nginx", srv.unix.path, roots=fresh_library.roots)
        yield nginx.addr
        nginx.stop()
    else:
        srv = start_server(fresh_library)
        apache = apache_in_front(tmp_path / "apache", srv.unix, fresh_library.roots)
        yield apache_address(apache)
        apache.stop()


def named(data: bytes) -> tuple[str, str]:
    sha = hashlib.sha256(data).hexdigest()
    return sha, f"/video/{sha}.mp4"


def assert_no_promise(addr: Address, url: str, sha: str, on_disk: bytes) -> None:
    """What a client gets for an unverified file: exactly the bytes there are, as what they are."""
    r = request(addr, url)
    assert r.status == 200 and r.body == on_disk
    assert r.header("etag") not in (f'"{sha}"', None)
    assert r.header("last-modified") != FIXED_DATE
    assert "immutable" not in (r.header("cache-control") or "")
    assert r.header("cache-control") == "no-cache"
    # A player holding the name's validators (from an earlier, verified answer) must not get a
    # 206 spliced from these bytes: the whole current file instead, as If-Range demands.
    for validator in (f'"{sha}"', FIXED_DATE):
        seek = request(addr, url, {"Range": "bytes=1-5", "If-Range": validator})
        assert seek.status == 200 and seek.body == on_disk, validator
    assert request(addr, url, {"If-None-Match": f'"{sha}"'}).status == 200
    assert request(addr, url, {"If-Modified-Since": FIXED_DATE}).status == 200
    # Its own validator works while the file stays as it is. It is the file's identity (inode,
    # size, mtime), the same from Apache and the server; Apache makes it weak for a file changed
    # in the last second (and a weak ETag never matches If-Range).
    head = request(addr, url, method="HEAD")
    own = head.header("etag") or ""
    assert own.removeprefix("W/") == (r.header("etag") or "").removeprefix("W/")
    assert head.header("cache-control") == "no-cache"
    seek = request(addr, url, {"Range": "bytes=1-5", "If-Range": own})
    if own.startswith("W/"):
        assert seek.status == 200 and seek.body == on_disk
    else:
        assert seek.status == 206 and seek.body == on_disk[1:6]


def assert_promise(addr: Address, url: str, sha: str, data: bytes) -> None:
    r = request(addr, url)
    assert r.status == 200 and r.body == data
    assert r.header("etag") == f'"{sha}"'
    assert r.header("last-modified") == FIXED_DATE
    assert "immutable" in (r.header("cache-control") or "")
    for validator in (f'"{sha}"', FIXED_DATE):
        seek = request(addr, url, {"Range": "bytes=1-5", "If-Range": validator})
        assert seek.status == 206 and seek.body == data[1:6], validator


def quarantine(lib: MediaLibrary, url: str, path: Path, actual_sha: str) -> None:
    """What the agent records for a file whose bytes do not match its name."""
    name = url.lstrip("/")
    store = StateStore.open(lib.state_dir)
    try:
        store.observe(name, "video", str(path), path.stat(), 0)
        store.mark_quarantined(name, "local corruption: sha256 differs from the name", sha256=actual_sha)
    finally:
        store.close()


def test_a_file_growing_under_its_final_name_never_gets_the_promise(
    front: Address, fresh_library: MediaLibrary
) -> None:
    data = pseudo_random_bytes(SIZE, seed=21)
    sha, url = named(data)
    path = fresh_library.roots["video"] / f"{sha}.mp4"
    written = 0
    with open(path, "wb") as f:  # a zip import: open, then stream the bytes in
        for cut in (1000, 300_000, SIZE):
            f.write(data[written:cut])
            f.flush()
            written = cut
            assert_no_promise(front, url, sha, data[:cut])
    # Complete, but not yet hashed by the agent: still no promise.
    assert_no_promise(front, url, sha, data)
    # The agent hashed it (upload verified): the name's validators come back.
    fresh_library.items["growing"] = item = MediaItem(url, data, sha, path, None)
    fresh_library.vouch(item)
    assert_promise(front, url, sha, data)


def test_a_verified_file_rewritten_in_place_loses_the_promise(front: Address, fresh_library: MediaLibrary) -> None:
    """A re-import that writes the same bytes in place over the verified file (same inode)."""
    item = fresh_library.add("v", pseudo_random_bytes(SIZE, seed=22), local=True, blob=False)
    assert item.local is not None and item.sha256 is not None
    assert_promise(front, item.url, item.sha256, item.data)
    inode = item.local.stat().st_ino
    with open(item.local, "r+b") as f:
        f.truncate(0)
        f.write(item.data[:250_000])
        f.flush()
        assert item.local.stat().st_ino == inode
        assert_no_promise(front, item.url, item.sha256, item.data[:250_000])
        f.write(item.data[250_000:])
    # The same bytes again, but the agent has not hashed this write: no promise until it has.
    assert_no_promise(front, item.url, item.sha256, item.data)
    fresh_library.vouch(item)
    assert_promise(front, item.url, item.sha256, item.data)


def test_a_reimport_being_written_is_answered_from_the_verified_blob(
    front: Address, fresh_library: MediaLibrary
) -> None:
    """Evicted media imported again under its name: while the local copy is being written, the
    verified blob answers, so a player's If-Range keeps its 206s (the iOS requirement)."""
    item = fresh_library.add("both", pseudo_random_bytes(SIZE, seed=23), local=True, blob=True)
    assert item.local is not None and item.sha256 is not None
    assert_promise(front, item.url, item.sha256, item.data)
    item.local.unlink()  # evicted
    assert_promise(front, item.url, item.sha256, item.data)
    with open(item.local, "wb") as f:  # the re-import, half done
        f.write(item.data[:100_000])
        f.flush()
        assert_promise(front, item.url, item.sha256, item.data)
        # The agent's scan notices the new file: its row goes back to `pending` (no sha256).
        store = StateStore.open(fresh_library.state_dir)
        try:
            store.observe(item.url.lstrip("/"), "video", str(item.local), item.local.stat(), 0)
            assert store.get(item.url.lstrip("/")).state == "pending"  # type: ignore[union-attr]
        finally:
            store.close()
        assert_promise(front, item.url, item.sha256, item.data)
    # Done (cut short of the last byte here): still the blob's verified bytes, never the file's.
    with open(item.local, "r+b") as f:
        f.truncate(SIZE - 1)
    assert_promise(front, item.url, item.sha256, item.data)


def test_a_corrupt_file_never_gets_the_promise(front: Address, fresh_library: MediaLibrary) -> None:
    data = pseudo_random_bytes(SIZE, seed=24)
    sha, url = named(data)
    path = fresh_library.roots["video"] / f"{sha}.mp4"
    corrupt = bytearray(data)
    corrupt[SIZE // 2] ^= 0xFF  # one flipped byte: settled, old, and wrong
    path.write_bytes(corrupt)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    assert_no_promise(front, url, sha, bytes(corrupt))
    # The agent hashed it and quarantined it: still never the promise.
    quarantine(fresh_library, url, path, hashlib.sha256(corrupt).hexdigest())
    assert_no_promise(front, url, sha, bytes(corrupt))


def test_a_corrupt_copy_swapped_in_under_a_verified_record_gets_no_promise(
    front: Address, fresh_library: MediaLibrary
) -> None:
    """Same name, same size, same mtime as the verified file, but another file (inode): the
    agent's record vouches for the file it hashed, not for the name."""
    item = fresh_library.add("v", pseudo_random_bytes(SIZE, seed=25), local=True, blob=False)
    assert item.local is not None and item.sha256 is not None
    st = item.local.stat()
    corrupt = bytearray(item.data)
    corrupt[7] ^= 0x01
    swap = item.local.with_name("incoming.tmp")
    swap.write_bytes(corrupt)
    os.utime(swap, ns=(st.st_atime_ns, st.st_mtime_ns))
    swap.rename(item.local)
    assert_no_promise(front, item.url, item.sha256, bytes(corrupt))


def test_without_a_readable_state_nothing_local_is_verified(start_server, fresh_library: MediaLibrary) -> None:
    """No state database, or a broken one: local files are still served, without the promise."""
    srv = start_server(fresh_library)
    data = pseudo_random_bytes(50_001, seed=26)
    sha, url = named(data)
    path = fresh_library.roots["video"] / f"{sha}.mp4"
    path.write_bytes(data)
    assert_no_promise(srv.tcp, url, sha, data)  # no database yet
    fresh_library.state_dir.mkdir(parents=True, exist_ok=True)
    broken = fresh_library.state_dir / "state.sqlite3"
    broken.write_bytes(b"not a database" * 100)
    assert_no_promise(srv.tcp, url, sha, data)
    assert srv.log_text().count("cannot read the agent's state") == 1
    assert_no_promise(srv.tcp, url, sha, data)
    assert srv.log_text().count("cannot read the agent's state") == 1  # said once, not per request
    broken.unlink()
    item = MediaItem(url, data, sha, path, None)
    fresh_library.vouch(item)
    assert_promise(srv.tcp, url, sha, data)
