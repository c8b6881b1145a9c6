"""The stream server's own settings: STREAM_* variables from the same env file as the rest.

They are read from Config.values with the config module's reader, so a bad value is reported
like every other configuration error (variable name, what was expected) and exits 78.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, Reader
from ..errors import ConfigErrors

_X_ACCEL_RE = re.compile(r"^/[A-Za-z0-9_/-]*[A-Za-z0-9_-]$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Loopback only, like the shipped socket unit (IPAddressAllow=localhost). GigHive's Apache container
# reaches the server through the unix socket, not TCP; a TCP listener and its peers are an
# operator's opt-in (the role's media_agent_stream_tcp_listen/_allow). Every container on the host
# sits in 172.16.0.0/12, and any of them could read all media without the site's authentication.
DEFAULT_ALLOWED_PEERS = "localhost"
_LOCALHOST = ("127.0.0.0/8", "::1/128")


def parse_peers(text: str) -> tuple[Network, ...] | None:
    """Addresses and networks from a comma or space separated list; None for "any".
    Raises ValueError naming the first bad entry."""
    entries = [e for e in re.split(r"[,\s]+", text.strip()) if e]
    if entries == ["any"]:
        return None
    networks: list[Network] = []
    for entry in entries:
        if entry == "localhost":
            networks += [ipaddress.ip_network(n) for n in _LOCALHOST]
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an address, a network like 172.16.0.0/12, localhost or any") from None
    if not networks:
        raise ValueError("empty; use any to allow every TCP peer")
    return tuple(networks)


def peer_allowed(host: str, allowed: tuple[Network, ...] | None) -> bool:
    """Whether a TCP peer address may talk to the server (None = any peer)."""
    if allowed is None:
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in allowed)


@dataclass(frozen=True)
class StreamSettings:
    # Exit after this long with no open connection (socket activation only; 0 = never).
    idle_exit_seconds: float = 300.0
    # Connections served at once; more wait in the listen backlog that systemd owns.
    max_connections: int = 512
    # The whole request head must arrive within this time (slowloris), and be at most this big.
    header_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024
    # An idle keep-alive connection is closed after this long. Longer than nginx's default
    # upstream keepalive_timeout (60 s), so nginx, not us, closes idle pooled connections and
    # never sends a request into a connection we are closing.
    keepalive_timeout: float = 75.0
    # A client that accepts no data for this long is dropped.
    send_timeout: float = 60.0
    # Cache-Control for content-addressed files (the bytes behind a name never change).
    cache_max_age: int = 31536000
    # Shared caches may store responses only when the operator says so: the front authenticates
    # every request, and "public" would let a shared cache hand media to anyone.
    cache_public: bool = False
    # Cache-Control max-age for other files (thumbnails can be regenerated).
    mutable_max_age: int = 300
    # When set, local files are answered with X-Accel-Redirect: <prefix>/<root>/<name> and
    # nginx sends the bytes (see front/nginx-internal.conf).
    x_accel_prefix: str | None = None
    # Where the server leaves a marker for each verified local file, so that Apache sends it
    # itself (markers.py, front/apache-proxy.conf); None (STREAM_VERIFIED_DIR=) = no markers, and
    # Apache sends every request to the server. The unit's RuntimeDirectory= creates the default.
    verified_dir: Path | None = Path("/run/gighive-media-agent/verified")
    # At most this many markers (two per file): then stale ones, and if needed the oldest half,
    # go. Each is an empty file on tmpfs, an inode of about 1 KiB, no data page.
    verified_markers_max: int = 20000
    # How often the running server removes markers of files that changed or went (markers.py).
    verified_sweep_seconds: float = 60.0
    # Bytes read from Blob per step, and the smaller first step that gets a seek going. Small:
    # the streams that keep it are players at their bit rate (a fast stream moves to
    # fast_chunk_size), for which 16 KiB costs no more CPU per GB than 64 KiB did, and 1,000 of
    # them hold ~40 MiB less (docs/benchmarks.md, the slow readers).
    chunk_size: int = 16 * 1024
    first_chunk_size: int = 16 * 1024
    # A Blob stream that reads fast (a download, not a player at its bit rate) moves to a read of
    # this size, which costs less CPU per byte; at most fast_streams of them at once (0 = never),
    # so memory stays bounded however many streams run (handler.StreamBuffer).
    fast_chunk_size: int = 256 * 1024
    fast_streams: int = 16
    # Per-request limits towards Azure: connect/read timeout and retries of one request.
    upstream_timeout: float = 10.0
    upstream_retries: int = 1
    # Blob properties are remembered this long, so a seek costs one Azure request, not two.
    # Safe because every read is pinned with If-Match: a changed blob is noticed and re-read.
    stat_cache_seconds: float = 30.0
    stat_cache_entries: int = 4096
    # On stop, running streams may finish for this long before they are cut.
    drain_seconds: float = 20.0
    # A Range header with more ranges than this is answered with the whole body (200).
    max_ranges: int = 16
    # Retry-After on 502/503/504.
    retry_after_seconds: int = 5
    # How often STATUS= is refreshed while something changes.
    status_interval: float = 5.0
    # TCP peers that may connect (None = any). The server has no authentication of its own, so
    # it does not rely on the socket unit's IPAddressAllow= alone: that filter is not applied
    # where systemd cannot attach BPF programs (it only warns), and --listen has no unit at all.
    # Unix socket peers are left to the socket file's mode (SocketMode=0660, group www-data).
    allowed_peers: tuple[Network, ...] | None = parse_peers(DEFAULT_ALLOWED_PEERS)

    @property
    def immutable_cache_control(self) -> str:
        scope = "public" if self.cache_public else "private"
        return f"{scope}, max-age={self.cache_max_age}, immutable"

    @property
    def mutable_cache_control(self) -> str:
        scope = "public" if self.cache_public else "private"
        return f"{scope}, max-age={self.mutable_max_age}"


def load_settings(config: Config) -> StreamSettings:
    """STREAM_* from the configuration; raises ConfigErrors naming every bad variable."""
    r = Reader(config.values)
    num = r.number
    prefix = r.raw("STREAM_X_ACCEL_PREFIX")
    if prefix is not None and not _X_ACCEL_RE.match(prefix):
        r.fail("STREAM_X_ACCEL_PREFIX", f"{prefix!r} is not a location path like /_gighive_media_internal")
        prefix = None
    verified_text = r.raw("STREAM_VERIFIED_DIR")
    verified_dir: Path | None = StreamSettings.verified_dir
    if "STREAM_VERIFIED_DIR" in config.values:  # set but empty: no markers
        verified_dir = Path(verified_text) if verified_text else None
        if verified_dir is not None and not verified_dir.is_absolute():
            r.fail("STREAM_VERIFIED_DIR", f"{verified_text!r} is not an absolute path (or empty for none)")
            verified_dir = None
    peers_text = r.raw("STREAM_ALLOWED_PEERS") or DEFAULT_ALLOWED_PEERS
    try:
        allowed_peers = parse_peers(peers_text)
    except ValueError as e:
        r.fail("STREAM_ALLOWED_PEERS", str(e))
        allowed_peers = ()
    settings = StreamSettings(
        idle_exit_seconds=float(num("STREAM_IDLE_EXIT_SECONDS", 300.0, 0.0, 7 * 86400.0)),
        max_connections=int(num("STREAM_MAX_CONNECTIONS", 512, 1, 10000, integer=True)),
        header_timeout=float(num("STREAM_HEADER_TIMEOUT_SECONDS", 10.0, 0.1, 600.0)),
        max_header_bytes=r.size("STREAM_MAX_HEADER_BYTES", 16 * 1024, 1024, 1024 * 1024),
        keepalive_timeout=float(num("STREAM_KEEPALIVE_TIMEOUT_SECONDS", 75.0, 0.1, 3600.0)),
        send_timeout=float(num("STREAM_SEND_TIMEOUT_SECONDS", 60.0, 0.1, 3600.0)),
        cache_max_age=int(num("STREAM_CACHE_MAX_AGE", 31536000, 0, 10 * 31536000, integer=True)),
        cache_public=r.boolean("STREAM_CACHE_PUBLIC", False),
        mutable_max_age=int(num("STREAM_MUTABLE_MAX_AGE", 300, 0, 31536000, integer=True)),
        x_accel_prefix=prefix,
        verified_dir=verified_dir,
        verified_markers_max=int(num("STREAM_VERIFIED_MARKERS_MAX", 20000, 16, 10_000_000, integer=True)),
        verified_sweep_seconds=float(num("STREAM_VERIFIED_SWEEP_SECONDS", 60.0, 1.0, 86400.0)),
        chunk_size=r.size("STREAM_CHUNK_SIZE", 16 * 1024, 4 * 1024, 16 * 1024 * 1024),
        first_chunk_size=r.size("STREAM_FIRST_CHUNK_SIZE", 16 * 1024, 1024, 16 * 1024 * 1024),
        fast_chunk_size=r.size("STREAM_FAST_CHUNK_SIZE", 256 * 1024, 4 * 1024, 16 * 1024 * 1024),
        fast_streams=int(num("STREAM_FAST_STREAMS", 16, 0, 10000, integer=True)),
        upstream_timeout=float(num("STREAM_UPSTREAM_TIMEOUT_SECONDS", 10.0, 0.1, 600.0)),
        upstream_retries=int(num("STREAM_UPSTREAM_RETRIES", 1, 0, 10, integer=True)),
        stat_cache_seconds=float(num("STREAM_STAT_CACHE_SECONDS", 30.0, 0.0, 86400.0)),
        stat_cache_entries=int(num("STREAM_STAT_CACHE_ENTRIES", 4096, 0, 1_000_000, integer=True)),
        drain_seconds=float(num("STREAM_DRAIN_SECONDS", 20.0, 0.0, 3600.0)),
        max_ranges=int(num("STREAM_MAX_RANGES", 16, 1, 1000, integer=True)),
        retry_after_seconds=int(num("STREAM_RETRY_AFTER_SECONDS", 5, 0, 3600, integer=True)),
        status_interval=float(num("STREAM_STATUS_INTERVAL_SECONDS", 5.0, 0.1, 3600.0)),
        allowed_peers=allowed_peers,
    )
    if settings.first_chunk_size > settings.chunk_size:
        r.fail("STREAM_FIRST_CHUNK_SIZE", f"{settings.first_chunk_size} is above STREAM_CHUNK_SIZE")
    if r.errors:
        raise ConfigErrors(r.errors)
    return settings
