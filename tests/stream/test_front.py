"""The shipped front configs: nginx in front of a socket-activated server, the X-Accel-Redirect
internal locations, and the Apache snippet's syntax with only the modules it names (the snippet at
work in a GigHive-like Apache: test_apache_front.py)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import _proc
from tests.support.media import pseudo_random_bytes

from .conftest import X_ACCEL_PREFIX, MediaLibrary, nginx_in_front
from .support import FRONT, SERVE_ARGV, Nginx, ServerProcess, parse_multipart, request, wait_for, write_config


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="gms-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_nginx_in_front_of_a_socket_activated_server(library: MediaLibrary, short_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.env", library.config_values())
    sock = short_dir / "stream.sock"
    proc = _proc.spawn(
        ["systemd-socket-activate", "-l", str(sock), *SERVE_ARGV, "--config", str(config)], tmp_path / "server.log"
    )
    front = None
    try:
        wait_for(sock.exists, what="the socket")
        front = nginx_in_front(tmp_path / "nginx", str(sock))
        for key in ("local", "blob", "both"):
            item = library.items[key]
            r = request(front.addr, item.url, {"Range": "bytes=0-1"})
            assert r.status == 206 and r.body == item.data[:2], key
            assert r.header("content-range") == f"bytes 0-1/{item.size}"
            r = request(front.addr, item.url, {"Range": "bytes=1-2,-2"})
            assert r.status == 206
            assert [p[1] for p in parse_multipart(r.body, r.header("content-type") or "")] == [
                item.data[1:3],
                item.data[-2:],
            ]
            r = request(front.addr, item.url, {"If-None-Match": f'"{item.sha256}"'})
            assert r.status == 304
            r = request(front.addr, item.url)
            assert r.status == 200 and r.body == item.data
        # Everything passed through nginx, not around it.
        access_log = tmp_path / "nginx" / "logs" / "access.log"
        wait_for(lambda: access_log.read_text().count("GET /video/") == 12, what="nginx to log all 12 requests")
    finally:
        if front:
            front.stop()
        proc.send_signal(signal.SIGTERM)
        _proc.terminate(proc)


@pytest.fixture
def x_accel(start_server, library: MediaLibrary, tmp_path: Path) -> Iterator[tuple[ServerProcess, Nginx]]:
    srv = start_server(library, STREAM_X_ACCEL_PREFIX=X_ACCEL_PREFIX)
    front = nginx_in_front(tmp_path / "nginx", srv.unix.path, roots=library.roots)
    yield srv, front
    front.stop()


@pytest.mark.parametrize("key", ["local", "both", "thumb_local", "blob", "thumb_blob"])
def test_x_accel_redirect_gives_the_same_answers(
    x_accel: tuple[ServerProcess, Nginx], server: ServerProcess, library: MediaLibrary, key: str
) -> None:
    srv, front = x_accel
    item = library.items[key]
    direct = request(server.tcp, item.url)
    r = request(front.addr, item.url)
    assert r.status == 200 and r.body == item.data
    for name in ("etag", "cache-control", "content-type", "content-length", "last-modified"):
        assert r.header(name) == direct.header(name), name
    assert r.header("x-accel-redirect") is None
    etag = direct.header("etag") or ""
    r = request(front.addr, item.url, {"Range": "bytes=3-7", "If-Range": etag})
    assert r.status == 206 and r.body == item.data[3:8]
    assert r.header("content-range") == f"bytes 3-7/{item.size}"
    assert request(front.addr, item.url, {"Range": "bytes=3-7", "If-Range": '"stale"'}).body == item.data
    assert request(front.addr, item.url, {"If-None-Match": etag}).status == 304
    r = request(front.addr, item.url, {"Range": "bytes=0-0,-1"})
    assert [p[1] for p in parse_multipart(r.body, r.header("content-type") or "")] == [item.data[:1], item.data[-1:]]
    via_nginx = "via x-accel" in srv.log_text()
    assert via_nginx if item.local else True


def test_the_internal_location_is_not_reachable_from_outside(
    x_accel: tuple[ServerProcess, Nginx], library: MediaLibrary
) -> None:
    _srv, front = x_accel
    item = library.items["local"]
    assert request(front.addr, "/_gighive_media_internal" + item.url).status == 404
    assert request(front.addr, "/_gighive_media_internal/video/../../etc/passwd").status in (400, 404)


def test_nginx_does_not_let_traversal_reach_the_server(nginx: Nginx, server: ServerProcess) -> None:
    for target in ("/video/%2e%2e/%2e%2e/etc/passwd", "/video/..%2f..%2fetc%2fpasswd", "/audio/%00.mp3"):
        r = request(nginx.addr, target)
        assert r.status in (400, 404), target
        assert b"root:" not in r.body


def test_the_apache_snippet_parses(tmp_path: Path) -> None:
    modules = Path("/usr/lib/apache2/modules")
    conf = tmp_path / "apache2.conf"
    conf.write_text(
        f"""
ServerRoot {tmp_path}
PidFile {tmp_path}/apache.pid
Listen 127.0.0.1:{_proc.free_port()}
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule env_module {modules}/mod_env.so
LoadModule proxy_module {modules}/mod_proxy.so
LoadModule proxy_http_module {modules}/mod_proxy_http.so
LoadModule cache_module {modules}/mod_cache.so
LoadModule rewrite_module {modules}/mod_rewrite.so
LoadModule headers_module {modules}/mod_headers.so
ErrorLog {tmp_path}/error.log
<VirtualHost *:*>
    Include {FRONT / "apache-proxy.conf"}
</VirtualHost>
"""
    )
    r = subprocess.run(["apache2", "-t", "-f", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_nginx_sends_verified_files_on_disk_itself_with_the_same_validators_as_blob(
    start_server, fresh_library: MediaLibrary, tmp_path: Path
) -> None:
    srv = start_server(fresh_library, STREAM_X_ACCEL_PREFIX=X_ACCEL_PREFIX)
    front = nginx_in_front(tmp_path / "nginx", srv.unix.path, roots=fresh_library.roots)
    try:
        item = fresh_library.add("both", pseudo_random_bytes(400_003, seed=3), local=True, blob=True)
        assert item.local is not None
        on_disk = request(front.addr, item.url)
        assert on_disk.status == 200 and on_disk.body == item.data
        # The server decided (the agent verified this file) and nginx sent the bytes.
        wait_for(lambda: f"{item.sha256}.mp4 -> 200 (local via x-accel" in srv.log_text(), what="the handover")
        etag, date = on_disk.header("etag"), on_disk.header("last-modified")
        assert etag == f'"{item.sha256}"'

        def seeks() -> set[int]:
            statuses = set()
            for validator in (etag, date):
                r = request(front.addr, item.url, {"Range": "bytes=0-1", "If-Range": validator or ""})
                assert r.body == item.data[:2]
                statuses.add(r.status)
            return statuses

        assert seeks() == {206}
        assert request(front.addr, item.url, {"If-None-Match": etag or ""}).status == 304
        item.local.unlink()  # evicted: now the server answers from Blob
        from_blob = request(front.addr, item.url)
        assert from_blob.body == item.data
        for name in ("etag", "last-modified", "content-type", "cache-control", "content-length", "accept-ranges"):
            assert from_blob.header(name) == on_disk.header(name), name
        assert seeks() == {206}
    finally:
        front.stop()


def test_the_role_renders_the_same_apache_snippet() -> None:
    """What the Ansible role installs for GigHive's Apache is the snippet tested here."""
    template = FRONT.parents[2] / "ansible/roles/media_storage_azure_blob/templates/apache-media-proxy.conf.j2"
    header, _, body = template.read_text().partition("\n")
    assert header == "# {{ ansible_managed }}"
    assert "{{" not in body and "{%" not in body
    assert body == (FRONT / "apache-proxy.conf").read_text()


def test_nginx_does_not_follow_a_symlink_on_disk(start_server, fresh_library: MediaLibrary, tmp_path: Path) -> None:
    srv = start_server(fresh_library, STREAM_X_ACCEL_PREFIX=X_ACCEL_PREFIX)
    front = nginx_in_front(tmp_path / "nginx", srv.unix.path, roots=fresh_library.roots)
    try:
        secret = tmp_path / "outside.mp4"
        secret.write_bytes(b"not media, outside the roots")
        link = fresh_library.roots["video"] / ("a" * 64 + ".mp4")
        link.symlink_to(secret)
        r = request(front.addr, f"/video/{link.name}")
        assert r.status == 404 and b"not media" not in r.body
    finally:
        front.stop()
