"""Fixtures for the stream server: a media library with files that are local only, in Blob only,
or both; config files; the server as a process; nginx in front of it."""

from __future__ import annotations

import grp
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient, ContentSettings

from agent.state import StateStore
from tests.support.apache import ApacheFront, basic_auth, grant_read
from tests.support.azurite import Azurite
from tests.support.media import make_media_roots, make_thumbnail, pseudo_random_bytes

from .support import FRONT, Address, Nginx, ServerProcess, front_snippet, write_config

# Odd sizes, so reads cross the server's chunk boundaries at unaligned offsets.
MATRIX_SIZE = 3 * 1024 * 1024 + 4321


@dataclass
class MediaItem:
    """One media file: its URL, its bytes, and where it lives."""

    url: str
    data: bytes
    sha256: str | None  # the sha in the name (content-addressed) or None
    local: Path | None
    blob: str | None

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class MediaLibrary:
    roots: dict[str, Path]
    container: ContainerClient
    connection_string: str
    items: dict[str, MediaItem] = field(default_factory=dict)

    def add(
        self,
        key: str,
        data: bytes,
        *,
        local: bool,
        blob: bool,
        root: str = "video",
        ext: str = "mp4",
        verified: bool = True,
    ) -> MediaItem:
        sha = hashlib.sha256(data).hexdigest()
        rel = f"{sha}.{ext}"
        path = None
        if local:
            path = self.roots[root] / rel
            path.write_bytes(data)
            # Old enough that Last-Modified is a strong validator (If-Range by date).
            os.utime(path, (1_700_000_000, 1_700_000_000))
        name = f"{root}/{rel}"
        if blob:
            self.upload(name, data, sha)
        item = MediaItem(url=f"/{name}", data=data, sha256=sha, local=path, blob=name if blob else None)
        self.items[key] = item
        if verified and (local or blob):
            self.vouch(item)
        return item

    @property
    def state_dir(self) -> Path:
        return self.roots["root"] / "state"

    @property
    def verified_dir(self) -> Path:
        return verified_dir(self.roots)

    def vouch(self, item: MediaItem) -> None:
        """What the agent's upload records once it has hashed the file (and, for a blob, checked
        the commit): only then may the name's promise (sha256 ETag, immutable) be sent for it."""
        assert item.sha256 is not None
        name = item.url.lstrip("/")
        store = StateStore.open(self.state_dir)
        try:
            if item.local is not None:
                st = item.local.stat()
                store.observe(name, name.split("/")[0], str(item.local), st, 0)
                identity = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
            else:
                store.adopt_blob(
                    name,
                    name.split("/")[0],
                    name,
                    size=item.size,
                    sha256=item.sha256,
                    md5=None,
                    etag='"0x1"',
                    pointer="none",
                )
                return
            store.mark_uploaded(
                name,
                **identity,
                sha256=item.sha256,
                md5=hashlib.md5(item.data).hexdigest(),  # noqa: S324 - what the upload records
                etag='"0x1"',
                verified_at=time.time(),
                pointer="none",
                blocks_reused=0,
            )
        finally:
            store.close()

    def upload(self, name: str, data: bytes, sha: str | None = None, content_type: str = "video/mp4") -> None:
        self.container.upload_blob(
            name,
            data,
            overwrite=True,
            metadata={"sha256": sha} if sha else None,
            content_settings=ContentSettings(content_type=content_type),
        )

    def config_values(self, **extra: str) -> dict[str, str]:
        values = {
            "MEDIA_STORAGE_BACKEND": "azure_blob",
            "AZURE_AUTH_MODE": "connection_string",
            "AZURE_STORAGE_CONNECTION_STRING": self.connection_string,
            "AZURE_STORAGE_CONTAINER_NAME": self.container.container_name,
            "MEDIA_ROOTS": f"audio={self.roots['audio']},video={self.roots['video']}",
            "STATE_DIRECTORY": str(self.roots["root"] / "state"),
            "STREAM_VERIFIED_DIR": str(self.verified_dir),
        }
        values.update(extra)
        return values


def verified_dir(roots: dict[str, Path]) -> Path:
    """The servers' marker directory for a library (/run/gighive-media-agent/verified on a host):
    what the service's RuntimeDirectory= makes, written by the server, readable by Apache."""
    d = roots["root"] / "verified"
    if not d.is_dir():
        d.mkdir(mode=0o755)
        grant_read(d)
    return d


def _library(root: Path, azurite: Azurite) -> MediaLibrary:
    roots = make_media_roots(root)
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = service.create_container(f"s-{uuid.uuid4().hex[:20]}")
    return MediaLibrary(roots=roots, container=container, connection_string=azurite.connection_string)


def populate(lib: MediaLibrary) -> MediaLibrary:
    lib.add("local", pseudo_random_bytes(MATRIX_SIZE, seed=11), local=True, blob=False)
    lib.add("blob", pseudo_random_bytes(MATRIX_SIZE, seed=12), local=False, blob=True)
    lib.add("both", pseudo_random_bytes(MATRIX_SIZE, seed=13), local=True, blob=True)
    lib.add("audio", pseudo_random_bytes(200_003, seed=14), local=False, blob=True, root="audio", ext="mp3")
    lib.add("tiny", b"x", local=True, blob=False, root="audio", ext="mp3")
    lib.add("empty", b"", local=False, blob=True, root="audio", ext="m4a")
    # Thumbnails are named by the video's sha, so their ETag cannot come from the name.
    video_sha = lib.items["both"].sha256
    assert video_sha
    thumb = make_thumbnail(lib.roots["video"], video_sha)
    data = thumb.read_bytes()
    lib.items["thumb_local"] = MediaItem(f"/video/thumbnails/{video_sha}.png", data, None, thumb, None)
    blob_thumb_sha = lib.items["blob"].sha256
    blob_thumb = pseudo_random_bytes(5000, seed=15)
    lib.upload(f"video/thumbnails/{blob_thumb_sha}.png", blob_thumb, content_type="image/png")
    lib.items["thumb_blob"] = MediaItem(
        f"/video/thumbnails/{blob_thumb_sha}.png", blob_thumb, None, None, f"video/thumbnails/{blob_thumb_sha}.png"
    )
    return lib


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, azurite: Azurite) -> MediaLibrary:
    """A populated media library shared by one test module (read-only for its tests)."""
    return populate(_library(tmp_path_factory.mktemp("library"), azurite))


@pytest.fixture
def fresh_library(tmp_path: Path, azurite: Azurite) -> MediaLibrary:
    """An empty library (roots + container) a test may change freely."""
    return _library(tmp_path / "library", azurite)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `serve` with a config built from a library; stopped at teardown."""
    started: list[ServerProcess] = []

    def start(lib: MediaLibrary, listen: list[str] | None = None, env: dict[str, str] | None = None, **extra: str):
        n = len(started)
        config = write_config(tmp_path / f"agent-{n}.env", lib.config_values(**extra))
        listen = listen or ["127.0.0.1:0", f"unix:{tmp_path}/stream-{n}.sock"]
        server = ServerProcess(config, tmp_path / f"server-{n}.log", listen, env=env)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, library: MediaLibrary) -> Iterator[ServerProcess]:
    """One server for a module's read-only tests (TCP on loopback and a unix socket)."""
    d = tmp_path_factory.mktemp("server")
    config = write_config(d / "agent.env", library.config_values())
    s = ServerProcess(config, d / "server.log", ["127.0.0.1:0", f"unix:{d}/stream.sock"])
    yield s
    s.stop()


X_ACCEL_PREFIX = "/_gighive_media_internal"


def nginx_in_front(workdir: Path, socket_path: str, roots: dict[str, Path] | None = None) -> Nginx:
    """nginx with the shipped upstream and locations snippets, and (optionally) the X-Accel internal
    locations for `roots`: with them, and a server started with STREAM_X_ACCEL_PREFIX, nginx sends
    the verified files on disk itself when the server hands them over."""
    server_block = front_snippet("nginx-locations.conf")
    if roots is not None:
        server_block += front_snippet("nginx-internal.conf", roots=roots)
    # A site-wide regex location like GigHive's would have must not capture media URLs.
    server_block += '\nlocation ~* "\\.(png|mp4|mp3)$" { return 418; }\n'
    return Nginx(workdir, server_block, http_extra=front_snippet("nginx-upstream.conf", socket_path=socket_path))


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, library: MediaLibrary) -> Iterator[Nginx]:
    """nginx as the shipped snippets run it, with its own server handing verified files on disk
    back to nginx (X-Accel-Redirect)."""
    d = tmp_path_factory.mktemp("nginx-server")
    config = write_config(d / "agent.env", library.config_values(STREAM_X_ACCEL_PREFIX=X_ACCEL_PREFIX))
    srv = ServerProcess(config, d / "server.log", [f"unix:{d}/stream.sock"])
    n = nginx_in_front(tmp_path_factory.mktemp("nginx"), srv.unix.path, roots=library.roots)
    yield n
    n.stop()
    srv.stop()


def apache_in_front(workdir: Path, upstream: Address, roots: dict[str, Path]) -> ApacheFront:
    """A GigHive-like Apache (tests/support/apache.py) with the shipped snippet included, proxying
    to `upstream` and serving local media itself. A unix socket gets what the socket unit gives
    it (root:www-data, 0660 when run as root); a TCP address replaces the socket in the snippet."""
    snippet = (FRONT / "apache-proxy.conf").read_text()
    snippet = snippet.replace("/run/gighive-media-agent/verified", str(verified_dir(roots)))
    if upstream.kind == "unix":
        snippet = snippet.replace("/run/gighive-media-agent/stream.sock", upstream.path)
        socket_like_the_unit(Path(upstream.path))
    else:
        snippet = snippet.replace(
            "unix:/run/gighive-media-agent/stream.sock|http://localhost/", f"http://{upstream.host}:{upstream.port}/"
        )
    grant_read(roots["audio"], roots["video"])
    return ApacheFront(workdir, {"audio": roots["audio"], "video": roots["video"]}, site_extra=snippet)


def socket_like_the_unit(path: Path) -> None:
    """SocketUser=root, SocketGroup=www-data, SocketMode=0660 (units/gighive-media-stream.socket)."""
    if os.geteuid() == 0:
        os.chown(path, 0, grp.getgrnam("www-data").gr_gid)
        path.chmod(0o660)
        grant_read(path.parent)


def apache_address(front: ApacheFront, auth: bool = True) -> Address:
    """The front as the matrix reaches it: HTTPS, with Basic Auth unless told otherwise."""
    return Address(
        "https",
        port=front.port,
        ca=str(front.tls.ca),
        headers=(("Authorization", basic_auth()),) if auth else (),
        media_cache_control="public, max-age=604800, immutable",
        # Apache sends a verified file on disk itself from the second request on (its own 416s).
        local_first="apache",
    )


@pytest.fixture(scope="module")
def apache(
    tmp_path_factory: pytest.TempPathFactory, server: ServerProcess, library: MediaLibrary
) -> Iterator[ApacheFront]:
    front = apache_in_front(tmp_path_factory.mktemp("apache"), server.unix, library.roots)
    yield front
    front.stop()
