"""Stream server benchmark: side by side, in one run, against the same Azurite and files.

Setups:
  azurite          direct GET from Azurite (container SAS), the baseline for Blob
  rclone           `rclone serve http` over the same container
  server+nginx     gighive-media serve behind nginx (shipped snippets), file only in Blob
  server+nginx/local   the same, with the file on local disk (sendfile)
  server+nginx/x-accel the same, local, answered with X-Accel-Redirect (nginx sends the file)
  nginx            nginx serving the local file directly, the baseline for local mode

Measures, per setup: one sequential GET of the whole file (MB/s), and random 256 KiB range GETs
over one keep-alive connection (time to first byte, p50/p99). Then 200 concurrent range streams
through the server (Blob and local): errors, and the server's peak RSS.

Run: .venv/bin/python bench/stream_bench.py [--size 1GiB] [--ranges 300] [--concurrency 200]
Writes bench/stream_results.json, bench/stream_results.md and bench/stream_results.svg.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.client
import json
import os
import platform
import random
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from azure.storage.blob import (  # noqa: E402
    BlobServiceClient,
    ContainerSasPermissions,
    ContentSettings,
    generate_container_sas,
)

from tests.support import _proc  # noqa: E402
from tests.support.apache import basic_auth  # noqa: E402
from tests.support.azurite import ACCOUNT_KEY, ACCOUNT_NAME, Azurite  # noqa: E402
from tests.support.media import _blocks  # noqa: E402

MiB = 1024 * 1024
RANGE_SIZE = 256 * 1024
# A setup that fails this many range requests in a row is given up for the round.
GIVE_UP_AFTER = 3


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    return int(m.group(1)) * {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB}[m.group(2).upper()]


# ---- fixtures: data, Azurite, servers --------------------------------------------------------


def make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for block in _blocks(size, seed=2026):
            h.update(block)
            f.write(block)
    return h.hexdigest()


def wait_port(host: str, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not _proc.port_open(host, port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host}:{port} did not open")
        time.sleep(0.05)


def wait_path(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def start_server(work: Path, name: str, azurite: Azurite, container: str, roots: Path, extra: dict[str, str]):
    env_file = work / f"{name}.env"
    values = {
        "MEDIA_STORAGE_BACKEND": "azure_blob",
        "AZURE_AUTH_MODE": "connection_string",
        "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string,
        "AZURE_STORAGE_CONTAINER_NAME": container,
        "MEDIA_ROOTS": f"audio={roots / 'audio'},video={roots / 'video'}",
        "STATE_DIRECTORY": str(work / "state"),
        "LOG_LEVEL": "info",
        **extra,
    }
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    env_file.chmod(0o600)
    sock = work / f"{name}.sock"
    tcp_port = _proc.free_port()
    proc = _proc.spawn(
        [sys.executable, "-m", "agent.stream", "--config", str(env_file), "--listen", f"unix:{sock}",
         "--listen", f"127.0.0.1:{tcp_port}"],
        work / f"{name}.log",
    )  # fmt: skip
    wait_path(sock)
    wait_port("127.0.0.1", tcp_port)
    return proc, sock, tcp_port


def pin_to_cpu0(proc_pid: int | None) -> None:
    """Every thread of a process onto CPU 0 (`--pin-azurite`); threads it starts later inherit it."""
    if proc_pid is None:
        return
    for tid in os.listdir(f"/proc/{proc_pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {0})


def put_blob(container, name: str, raw: Path, sha: str) -> None:
    """The benchmark's file as the agent would have uploaded it (its sha256 in the metadata)."""
    with open(raw, "rb") as f:
        container.upload_blob(
            name, f, length=raw.stat().st_size, max_concurrency=4, metadata={"sha256": sha},
            content_settings=ContentSettings(content_type="video/mp4"),
        )  # fmt: skip


def vouch(state_dir: Path, root: str, path: Path, sha: str) -> None:
    """What the agent records once its upload has hashed a file. Without it the stream server sends
    the file as unverified (no sha256 ETag, no X-Accel handover; docs/streaming.md)."""
    from agent.state import StateStore

    name, st = f"{root}/{path.name}", path.stat()
    store = StateStore.open(state_dir)
    try:
        store.observe(name, root, str(path), st, 0)
        store.mark_uploaded(
            name, size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino, sha256=sha, md5="", etag='"bench"',
            verified_at=time.time(), pointer="none", blocks_reused=0,
        )  # fmt: skip
    finally:
        store.close()


def start_nginx(work: Path, name: str, server_block: str, http_extra: str = "") -> tuple[subprocess.Popen, int]:
    d = work / name
    (d / "logs").mkdir(parents=True, exist_ok=True)
    (d / "spool").mkdir(exist_ok=True)
    port = _proc.free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    conf = d / "nginx.conf"
    conf.write_text(
        f"""daemon off; master_process on; worker_processes 1; {user}
error_log {d}/logs/error.log warn; pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  include /etc/nginx/mime.types; access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {d}/spool/body; proxy_temp_path {d}/spool/proxy; fastcgi_temp_path {d}/spool/f;
  uwsgi_temp_path {d}/spool/u; scgi_temp_path {d}/spool/s;
  {http_extra}
  server {{ listen 127.0.0.1:{port}; {server_block} }}
}}
"""
    )
    proc = _proc.spawn(["nginx", "-p", str(d), "-c", str(conf)], d / "logs" / "stdout.log")
    wait_port("127.0.0.1", port)
    return proc, port


def snippet(name: str, sock: Path | None = None, roots: Path | None = None) -> str:
    text = (REPO / "agent" / "stream" / "front" / name).read_text()
    if sock:
        text = text.replace("/run/gighive-media-agent/stream.sock", str(sock))
    if roots:
        text = text.replace("/home/ubuntu/", f"{roots}/")
    return text


BLOB_SETUPS = (
    "azurite",
    "server (no nginx)",
    "server+nginx",
    "server+apache",
    "server+apache (http)",
    "apache alone",
    "azurite (https)",
    "server+apache (azure https)",
)


# The configuration before issue 15 (commit b7459cf), for --before: setups run beside today's in
# the same rounds, so that what the change bought is measured under the same load.
BEFORE_SERVER_ENV = {"STREAM_FAST_STREAMS": "0"}  # every Blob stream read 64 KiB at a time
BEFORE_NGINX = (
    ("proxy_buffering on;", "proxy_buffering off;"),
    ("proxy_busy_buffers_size 128k;", "proxy_busy_buffers_size 64k;"),
)
BEFORE_APACHE = (("retry=0 timeout=120 iobuffersize=65536", "flushpackets=on retry=0 timeout=120"),)


BEFORE_TWINS = {
    "server+nginx": "server+nginx (before)",
    "server+apache": "server+apache (before)",
    "server (no nginx)": "server (before)",
}


def before(text: str, changes: tuple[tuple[str, str], ...]) -> str:
    for new, old in changes:
        if new not in text:
            raise RuntimeError(f"--before: {new!r} is no longer in the front snippet; update BEFORE_*")
        text = text.replace(new, old)
    return text


def start_apache(work: Path, label: str, sock: Path | None, roots: Path, tls: bool = True, old_config: bool = False):
    """GigHive's Apache (tests/support/apache.py): with the shipped snippet proxying to `sock`,
    or (sock None) serving the files under `roots` itself."""
    from tests.support.apache import ApacheFront, grant_read

    if os.geteuid() == 0:
        grant_read(roots)
        if sock is not None:  # what the socket unit does: root:www-data 0660
            import grp

            os.chown(sock, 0, grp.getgrnam("www-data").gr_gid)
            sock.chmod(0o660)
            grant_read(sock)
    return ApacheFront(
        work / label,
        {"audio": roots / "audio", "video": roots / "video"},
        site_extra=(
            ""
            if sock is None
            else before(snippet("apache-proxy.conf", sock), BEFORE_APACHE)
            if old_config
            else snippet("apache-proxy.conf", sock)
        ),
        tls=tls,
    )


# ---- measurements ------------------------------------------------------------------------------


class Target:
    def __init__(
        self,
        name: str,
        base_url: str,
        path: str,
        query: str = "",
        headers: dict[str, str] | None = None,
        ca: Path | None = None,
        pids=None,
    ):
        u = urlsplit(base_url)
        # The processes that serve this target (for CPU accounting): a callable, because
        # Azurite's pid changes when it restarts.
        self.pids = pids or list
        self.name, self.host, self.port = name, u.hostname or "127.0.0.1", u.port or 80
        self.path = (u.path.rstrip("/") + path) + (f"?{query}" if query else "")
        self.headers = headers or {}
        self.context = ssl.create_default_context(cafile=str(ca)) if u.scheme == "https" else None

    def connection(self, timeout: float = 120) -> http.client.HTTPConnection:
        if self.context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


def cpu_ticks(pids: list[int]) -> int:
    """CPU time (user + system, in clock ticks) of these processes and all their descendants."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    total, todo, seen = 0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def sequential(target: Target, size: int) -> dict[str, float]:
    pids = target.pids()
    ticks = cpu_ticks(pids)
    conn = target.connection()
    buf = bytearray(MiB)
    t0 = time.perf_counter()
    conn.request("GET", target.path, headers=target.headers)
    r = conn.getresponse()
    n = r.readinto(memoryview(buf)[:1])
    ttfb = time.perf_counter() - t0
    while True:
        k = r.readinto(buf)
        if not k:
            break
        n += k
    elapsed = time.perf_counter() - t0
    conn.close()
    if r.status != 200 or n != size:
        raise RuntimeError(f"{target.name}: sequential GET gave {r.status}, {n} bytes")
    # CPU the serving side spent per GB (Azurite, server, front; not this client): on a shared
    # 2-core machine the throughput drifts with other work, the CPU a byte costs much less.
    cpu = (cpu_ticks(pids) - ticks) / os.sysconf("SC_CLK_TCK") / (size / 1e9) if pids else 0.0
    return {"seconds": elapsed, "mb_per_s": size / elapsed / 1e6, "ttfb_ms": ttfb * 1000, "cpu_s_per_gb": cpu}


def ranges(target: Target, offsets: list[int], expected: Path) -> dict:
    """Range GETs on one keep-alive connection; a failed request is counted, and the next one
    goes out on a fresh connection (one bad setup must not end the whole run)."""
    conn = target.connection(timeout=30)
    ttfbs: list[float] = []
    errors: list[str] = []
    consecutive = 0
    with open(expected, "rb") as f:
        for off in offsets:
            try:
                t0 = time.perf_counter()
                headers = {**target.headers, "Range": f"bytes={off}-{off + RANGE_SIZE - 1}"}
                conn.request("GET", target.path, headers=headers)
                r = conn.getresponse()
                first = r.read(1)
                ttfb = time.perf_counter() - t0
                body = first + r.read()
                if r.status != 206 or body != os.pread(f.fileno(), RANGE_SIZE, off):
                    raise RuntimeError(f"status {r.status}, {len(body)} bytes")
                ttfbs.append(ttfb)
                consecutive = 0
            except Exception as e:  # noqa: BLE001 - counted and reported per setup
                errors.append(f"range at {off}: {type(e).__name__}: {e}")
                consecutive += 1
                conn.close()
                if consecutive >= GIVE_UP_AFTER:
                    errors.append(f"gave up after {len(ttfbs)} good and {consecutive} failed requests in a row")
                    break
                conn = target.connection(timeout=30)
    conn.close()
    return {"ttfbs": ttfbs, "errors": errors}


def pooled_ranges(runs: list[dict]) -> dict[str, float]:
    """Percentiles over the requests of all rounds together."""
    ttfbs = sorted(x for r in runs for x in r["ttfbs"]) or [0.0]
    errors = [e for r in runs for e in r["errors"]]
    return {
        "n": len(ttfbs),
        "errors": len(errors),
        "error_samples": errors[:5],
        "ttfb_p50_ms": statistics.median(ttfbs) * 1000,
        "ttfb_p99_ms": ttfbs[min(len(ttfbs) - 1, int(len(ttfbs) * 0.99))] * 1000,
        "ttfb_mean_ms": statistics.fmean(ttfbs) * 1000,
    }


def p99(ttfbs: list[float]) -> float | None:
    if not ttfbs:
        return None
    ordered = sorted(ttfbs)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def paired(values: list[float | None], baseline: list[float | None]) -> dict[str, float | list[float]]:
    """Median (and spread) of the per-round ratios value / baseline."""
    ratios = sorted(v / b for v, b in zip(values, baseline, strict=False) if v and b)
    if not ratios:
        return {"median": 0.0, "min": 0.0, "max": 0.0, "ratios": []}
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1], "ratios": ratios}


def rss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) if m else 0


def threads_of(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return 0


def tree_rss_kib(pid: int) -> int:
    """RSS of a process and its descendants (a front's master and workers)."""
    pids, todo = [], [pid]
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry))
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(parents.get(p, []))
    return sum(rss_kib(p) for p in pids)


def concurrent_streams(
    target: Target,
    pid: int,
    n: int,
    stream_size: int,
    size: int,
    expected: Path,
    rate: float,
    front_pid: int | None = None,
) -> dict:
    rng = random.Random(7)
    offsets = [rng.randrange(0, size - stream_size) for _ in range(n)]
    start = threading.Barrier(n)
    errors: list[str] = []
    peak = {"rss": rss_kib(pid), "threads": threads_of(pid), "active": 0, "front_rss": 0}
    active = [0]
    lock = threading.Lock()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], rss_kib(pid))
            peak["threads"] = max(peak["threads"], threads_of(pid))
            if front_pid:
                peak["front_rss"] = max(peak["front_rss"], tree_rss_kib(front_pid))
            with lock:
                peak["active"] = max(peak["active"], active[0])
            time.sleep(0.05)

    def one(off: int) -> None:
        h = hashlib.sha256()
        try:
            conn = target.connection()
            start.wait(60)
            conn.request(
                "GET", target.path, headers={**target.headers, "Range": f"bytes={off}-{off + stream_size - 1}"}
            )
            r = conn.getresponse()
            with lock:
                active[0] += 1
            got = 0
            buf = bytearray(64 * 1024)
            t0 = time.perf_counter()
            while k := r.readinto(buf):
                h.update(memoryview(buf)[:k])
                got += k
                if rate:
                    # Read like a player would: at the media's bit rate, not as fast as possible.
                    ahead = got / rate - (time.perf_counter() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
            with lock:
                active[0] -= 1
            conn.close()
            with open(expected, "rb") as f:
                want = hashlib.sha256(os.pread(f.fileno(), stream_size, off)).hexdigest()
            if r.status != 206 or got != stream_size or h.hexdigest() != want:
                errors.append(f"at {off}: {r.status}, {got} bytes")
        except Exception as e:  # noqa: BLE001 - every failure is a counted error here
            errors.append(f"at {off}: {type(e).__name__}: {e}")

    base_rss = rss_kib(pid)
    ticks = cpu_ticks([pid])
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, offsets))
    elapsed = time.perf_counter() - t0
    # The server's CPU per GB sent: what the read size costs the streams that keep it (players
    # at their bit rate are never promoted to the fast streams' large reads).
    server_cpu = (cpu_ticks([pid]) - ticks) / os.sysconf("SC_CLK_TCK") / (n * stream_size / 1e9)
    done.set()
    sampler.join()
    return {
        "server_cpu_s_per_gb": server_cpu,
        "streams": n,
        "stream_mib": stream_size / MiB,
        "stream_rate_mb_per_s": rate / 1e6,
        "errors": len(errors),
        "error_samples": errors[:5],
        "seconds": elapsed,
        "aggregate_mb_per_s": n * stream_size / elapsed / 1e6,
        "rss_before_mib": base_rss / 1024,
        "rss_peak_mib": peak["rss"] / 1024,
        "threads_peak": peak["threads"],
        "front_rss_peak_mib": peak["front_rss"] / 1024,
        "concurrent_peak": peak["active"],
    }


# ---- report ------------------------------------------------------------------------------------


def svg_plot(results: dict) -> str:
    """Two bar charts (throughput, range TTFB p50/p99) as plain SVG: no plotting library needed."""
    rows = results["setups"]
    names = list(rows)
    width, bar_h, gap, left = 900, 18, 8, 200
    chart_h = len(names) * (bar_h * 2 + gap) + 40
    height = chart_h * 2 + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">']

    def chart(y0: int, title: str, series: list[tuple[str, str, str]], unit: str) -> None:
        vmax = max(rows[n][k1][k2] for n in names for k1, k2, _ in series) or 1
        out.append(f'<text x="10" y="{y0 + 14}" font-weight="bold">{title}</text>')
        y = y0 + 26
        for n in names:
            out.append(f'<text x="10" y="{y + bar_h}">{n}</text>')
            for i, (k1, k2, colour) in enumerate(series):
                v = rows[n][k1][k2]
                w = (width - left - 120) * v / vmax
                yy = y + i * bar_h
                out.append(f'<rect x="{left}" y="{yy}" width="{w:.1f}" height="{bar_h - 2}" fill="{colour}"/>')
                out.append(f'<text x="{left + w + 4:.1f}" y="{yy + bar_h - 5}">{v:.1f} {unit}</text>')
            y += bar_h * len(series) + gap

    chart(
        0, "Sequential GET of the whole file (MB/s, higher is better)", [("sequential", "mb_per_s", "#4a7ab5")], "MB/s"
    )
    chart(
        chart_h + 20,
        "Random 256 KiB ranges: time to first byte, p50 (light) and p99 (dark), ms, lower is better",
        [("ranges", "ttfb_p50_ms", "#9cc59a"), ("ranges", "ttfb_p99_ms", "#3c7a39")],
        "ms",
    )
    out.append("</svg>")
    return "\n".join(out)


def _ratio(p: dict) -> str:
    return f"{p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f})"


def markdown(results: dict) -> str:
    s = results["setups"]
    ng = s.get("nginx")
    lines = [
        f"# Stream server benchmark ({results['date']})",
        "",
        f"Machine: {results['machine']}. File: {results['size_mib']:.0f} MiB; "
        f"{results['rounds']} interleaved rounds (fresh Azurite and rclone each); sequential = median round, "
        "ranges = percentiles over all "
        f"{results['rounds']} x {results['range_requests']} random {RANGE_SIZE // 1024} KiB ranges per setup, each "
        "round on one keep-alive connection. "
        "All setups run side by side in one run, against the same Azurite and file."
        + (
            " Blob server settings: " + ", ".join(f"{k}={v}" for k, v in results["server_env"].items()) + "."
            if results.get("server_env")
            else ""
        )
        + (
            " Pinned: every Azurite on CPU 0 alone, everything else (server, fronts, clients) on the other"
            " CPUs, as Azure runs on machines of its own."
            if results.get("pinned")
            else ""
        ),
        "",
        "Ratios are paired: each round's figure divided by the baseline's figure in the same round, then "
        "the median over rounds (min-max in brackets), because other work on the machine makes absolute "
        "figures drift from round to round.",
        "",
        "| setup | sequential MB/s (median) | x azurite, paired | range TTFB p50 ms | p99 ms "
        "| p99 x azurite, paired | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in s.items():
        seq, rg, pa = r["sequential"], r["ranges"], r["paired_vs_azurite"]
        lines.append(
            f"| {name} | {seq['mb_per_s']:.1f} | {_ratio(pa['sequential'])} | "
            f"{rg['ttfb_p50_ms']:.2f} | {rg['ttfb_p99_ms']:.2f} | {_ratio(pa['range_p99'])} | "
            f"{len(seq['errors']) + rg['errors']} |"
        )
    cpu_rows = [(name, r) for name, r in s.items() if r.get("cpu_s_per_gb")]
    if cpu_rows:
        lines += [
            "",
            "CPU the serving side spent per GB of a sequential read (Azurite, the server and the front, as one "
            "process tree each; not the client), median over rounds, and paired against direct Azurite: the "
            "throughput on a shared machine drifts with other work, the CPU a byte costs much less. On 2 cores "
            "a chain whose CPU per GB is well above Azurite's alone cannot keep up with it when the machine "
            "is busy.",
            "",
            "| setup | CPU s/GB | x azurite, paired |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {r['cpu_s_per_gb']:.2f} | {_ratio(r['cpu_vs_azurite'])} |" for name, r in cpu_rows]
    twins = [(name, s[name]["paired_vs_before"]) for name in BEFORE_TWINS if "paired_vs_before" in s.get(name, {})]
    if twins:
        lines += [
            "",
            "Today's configuration against the one before issue 15 (the `(before)` setups: unbuffered nginx, "
            "Apache with flushpackets=on, 64 KiB reads only), paired per round (below 1 is less CPU):",
            "",
            "| setup | sequential x before | CPU per GB x before | range p99 x before |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {_ratio(pb['sequential'])} | {_ratio(pb['cpu'])} | {_ratio(pb['range_p99'])} |"
            for name, pb in twins
        ]
    if "server+apache" in s:
        lines += [
            "",
            "server+apache is GigHive's front as tests/support/apache.py builds it: HTTPS with Basic Auth, so "
            "its figures include TLS, which the others do not pay; server+apache (http) is the same front "
            "without TLS. apache alone is that HTTPS front sending the file from local disk itself: the "
            "ceiling Apache's TLS sets on this machine, whatever the source. Against it (paired):",
            "",
        ]
        for name in ("server+apache", "server+apache (http)"):
            pa = s[name].get("paired_vs_apache_alone")
            if pa:
                lines.append(
                    f"- {name}: sequential {_ratio(pa['sequential'])} x apache alone; "
                    f"range p99 {_ratio(pa['range_p99'])} x"
                )
    pt = s.get("server+apache (azure https)", {}).get("paired_vs_azurite_(https)")
    if pt:
        lines += [
            "",
            "As deployed against Azure, which is HTTPS only: server+apache (azure https) is the same HTTPS Apache "
            "with the server reading over HTTPS from a second Azurite serving HTTPS (its own copy of the file); "
            "azurite (https) is a direct HTTPS read from that Azurite. Against it (paired): "
            f"sequential {_ratio(pt['sequential'])} x, range p99 {_ratio(pt['range_p99'])} x.",
        ]
    if ng is not None:
        lines += ["", "Local mode against nginx serving the file alone (paired):", ""]
    for name in ("server+nginx/local", "server+nginx/x-accel") if ng is not None else ():
        pn = s[name]["paired_vs_nginx"]
        lines.append(
            f"- {name}: sequential {_ratio(pn['sequential'])} x nginx; range p99 {_ratio(pn['range_p99'])} x; "
            f"range p50 {s[name]['ranges']['ttfb_p50_ms']:.2f} ms vs {ng['ranges']['ttfb_p50_ms']:.2f} ms"
        )
    if not results["concurrency"]:
        return "\n".join(lines) + "\n"
    rate = next(iter(results["concurrency"].values()))["stream_rate_mb_per_s"]
    lines += [
        "",
        f"Concurrent streams through the front and the server, each client reading at {rate:g} MB/s "
        "(the Apache front allows 128 workers, so there the rest wait their turn):",
        "",
    ]
    lines += [
        "| source | streams | MiB each | errors | peak concurrent | aggregate MB/s "
        "| server RSS before / peak MiB | peak threads | front RSS peak MiB | server CPU s/GB |"
    ]
    lines += ["|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in results["concurrency"].items():
        cpu = f"{c['server_cpu_s_per_gb']:.2f}" if "server_cpu_s_per_gb" in c else ""  # not in older results
        lines.append(
            f"| {name} | {c['streams']} | {c['stream_mib']:.0f} | {c['errors']} | {c['concurrent_peak']} | "
            f"{c['aggregate_mb_per_s']:.1f} | {c['rss_before_mib']:.1f} / {c['rss_peak_mib']:.1f} "
            f"| {c['threads_peak']} | {c.get('front_rss_peak_mib', 0):.1f} | {cpu} |"
        )
    return "\n".join(lines) + "\n"


# ---- local first: the front sends files on disk itself ------------------------------------------

LOCAL_FIRST_SETUPS = (
    # (name, front, agent snippet included?, media visible to the front?)
    ("apache alone", "apache", False, True),
    ("apache+agent front-first", "apache", True, True),
    ("apache+agent proxied", "apache", True, False),
    ("nginx alone", "nginx", False, True),
    ("nginx+agent x-accel", "nginx", True, True),
    ("nginx+agent proxied", "nginx", True, False),
)


def local_first(args: argparse.Namespace) -> int:
    """Local reads through each front with the agent's snippet against the same front serving the
    file alone: Apache built like GigHive's container (TLS, Basic Auth, CacheEnable disk /) and
    nginx. "proxied" is the front without the file in its reach, so every byte goes through the
    stream server (what the Apache snippet did before local first)."""
    from tests.support.apache import ApacheFront, grant_read

    work = Path(tempfile.mkdtemp(prefix="stream-bench-lf-"))
    procs: list[subprocess.Popen] = []
    fronts: list[ApacheFront] = []
    try:
        roots = work / "media"
        for d in ("audio", "video"):
            (roots / d).mkdir(parents=True)
        print(f"writing {args.size / MiB:.0f} MiB ...", flush=True)
        raw = roots / "video" / "raw.tmp"
        sha = make_file(raw, args.size)
        raw.rename(roots / "video" / f"{sha}.mp4")
        expected = roots / "video" / f"{sha}.mp4"
        hidden = work / "elsewhere"  # a docroot/alias with no media: the front must proxy
        for d in ("audio", "video"):
            (hidden / d).mkdir(parents=True)
        grant_read(roots, hidden)
        # Settled (the server leaves no markers for a file changed in the last seconds), then
        # verified: what the agent's upload records once it has hashed the file.
        os.utime(expected, (time.time() - 3600, time.time() - 3600))
        vouch(work / "state", "video", expected, sha)
        verified = work / "verified"  # the service's RuntimeDirectory /run/gighive-media-agent/verified
        verified.mkdir(mode=0o755)
        # Two servers: one sends local files itself (Apache, nginx "proxied"), one hands verified
        # files over to nginx (X-Accel-Redirect, nginx-internal.conf), as the front docs say.
        socks = {}
        for label, extra_env in (("plain", ""), ("x-accel", "STREAM_X_ACCEL_PREFIX=/_gighive_media_internal\n")):
            env_file = work / f"agent-{label}.env"
            env_file.write_text(
                f"MEDIA_STORAGE_BACKEND=local\nMEDIA_ROOTS=audio={roots / 'audio'},video={roots / 'video'}\n"
                f"STATE_DIRECTORY={work / 'state'}\nSTREAM_VERIFIED_DIR={verified}\nLOG_LEVEL=info\n{extra_env}"
            )
            socks[label] = work / f"stream-{label}.sock"
            argv = [sys.executable, "-m", "agent.stream", "--config", str(env_file), "--listen", f"unix:{socks[label]}"]
            procs.append(_proc.spawn(argv, work / f"server-{label}.log"))
            wait_path(socks[label])
            if os.geteuid() == 0:  # what the socket unit does: root:www-data 0660
                import grp

                os.chown(socks[label], 0, grp.getgrnam("www-data").gr_gid)
                socks[label].chmod(0o660)
        if os.geteuid() == 0:
            grant_read(work)
        sock = socks["plain"]
        targets: list[Target] = []
        for name, front, agent, visible in LOCAL_FIRST_SETUPS:
            media = roots if visible else hidden
            if front == "apache":
                extra = snippet("apache-proxy.conf", sock) if agent else ""
                extra = extra.replace("/run/gighive-media-agent/verified", str(verified))
                ap_front = ApacheFront(
                    work / name.replace(" ", "-").replace("+", "-"),
                    {"audio": media / "audio", "video": media / "video"},
                    site_extra=extra,
                )
                fronts.append(ap_front)
                targets.append(
                    Target(
                        name,
                        f"https://127.0.0.1:{ap_front.port}",
                        f"/video/{sha}.mp4",
                        headers={"Authorization": basic_auth()},
                        ca=ap_front.tls.ca,
                    )
                )
            else:
                if agent and visible:
                    block = snippet("nginx-locations.conf") + snippet("nginx-internal.conf", roots=media)
                    http_extra = snippet("nginx-upstream.conf", socks["x-accel"])
                elif agent:
                    block, http_extra = snippet("nginx-locations.conf"), snippet("nginx-upstream.conf", sock)
                else:
                    block, http_extra = f"location /video/ {{ root {media}; }}", ""
                p, port = start_nginx(work, name.replace(" ", "-").replace("+", "-"), block, http_extra)
                procs.append(p)
                targets.append(Target(name, f"http://127.0.0.1:{port}", f"/video/{sha}.mp4"))
        # One request each first: through Apache front-first it is the server's, which verifies the
        # file and leaves the markers; every measured request after it is Apache's own, from disk.
        for t in targets:
            sequential(t, args.size)
        ap_fronts = dict(zip([n for n, f, _a, _v in LOCAL_FIRST_SETUPS if f == "apache"], fronts, strict=True))
        proxied_before = {n: f.access_log().count("handler=proxy-server") for n, f in ap_fronts.items()}
        rng = random.Random(7)
        seq: dict[str, list[float | None]] = {t.name: [] for t in targets}
        range_runs: dict[str, list[dict]] = {t.name: [] for t in targets}
        for rnd in range(args.rounds):
            order = targets[:]
            random.Random(rnd).shuffle(order)  # interleaved, so drift hits every setup alike
            offsets = [rng.randrange(0, args.size - RANGE_SIZE) for _ in range(args.ranges)]
            for t in order:
                print(f"round {rnd + 1}/{args.rounds}: {t.name} ...", flush=True)
                try:
                    # Best of two: on a shared machine another process's burst can halve one GET.
                    seq[t.name].append(max(sequential(t, args.size)["mb_per_s"] for _ in range(2)))
                except Exception as e:  # noqa: BLE001 - reported, the other setups go on
                    print(f"  sequential failed: {e}", flush=True)
                    seq[t.name].append(None)
                range_runs[t.name].append(ranges(t, offsets, expected))
        # Who answered the measured requests (Apache's access log, handler=%R): the proof that
        # front-first means Apache from disk, not a fast proxy.
        answered_by_server = {
            n: f.access_log().count("handler=proxy-server") - proxied_before[n] for n, f in ap_fronts.items()
        }
        measured = {n: f.access_log().count("GET ") - 1 for n, f in ap_fronts.items()}
        setups: dict[str, dict] = {}
        for name, front, _agent, _visible in LOCAL_FIRST_SETUPS:
            base = f"{front} alone"
            vals = [v for v in seq[name] if v]
            setups[name] = {
                "sequential_mb_per_s": statistics.median(vals) if vals else 0.0,
                "sequential_rounds": seq[name],
                "ranges": pooled_ranges(range_runs[name]),
                "apache_requests_proxied_to_the_server": (
                    f"{answered_by_server[name]} of {measured[name]}" if name in ap_fronts else None
                ),
                "paired_vs_alone": {
                    "sequential": paired(seq[name], seq[base]),
                    "range_p50": paired(
                        [statistics.median(r["ttfbs"]) if r["ttfbs"] else None for r in range_runs[name]],
                        [statistics.median(r["ttfbs"]) if r["ttfbs"] else None for r in range_runs[base]],
                    ),
                },
            }
        results = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "size_mib": args.size / MiB,
            "range_requests": args.ranges,
            "rounds": args.rounds,
            "setups": setups,
        }
        out = REPO / "bench" / "results" / "stream_local_first"
        out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(local_first_markdown(results))
        print(local_first_markdown(results))
        return 0
    finally:
        for f in fronts:
            f.stop()
        for p in reversed(procs):
            _proc.terminate(p, timeout=30)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")


def local_first_markdown(results: dict) -> str:
    lines = [
        "# Front-first serving: the front sends verified files on disk itself",
        "",
        f"{results['date']}, {results['machine']}. One {results['size_mib']:.0f} MiB file on local disk; "
        f"{results['rounds']} interleaved rounds; per round the best of two sequential GETs and "
        f"{results['range_requests']} "
        f"random {RANGE_SIZE // 1024} KiB ranges on one keep-alive connection. Apache: HTTPS with Basic Auth, "
        "as GigHive runs it; nginx: plain HTTP. Ratios are paired per round against the same front serving "
        "the file alone (median, min-max). The file is verified in the agent's state; one unmeasured request "
        "per setup first (through Apache front-first it is the server's, which leaves the markers). "
        '"proxied": Apache\'s access log (handler=%R) counts the measured requests it sent to the server.',
        "",
        "| setup | sequential MB/s | x alone (seq.) | range p50 ms | range p99 ms | x alone (range p50) | errors "
        "| proxied |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["setups"].items():
        pv = row["paired_vs_alone"]
        lines.append(
            f"| {name} | {row['sequential_mb_per_s']:.0f} | {_ratio(pv['sequential'])} | "
            f"{row['ranges']['ttfb_p50_ms']:.2f} | {row['ranges']['ttfb_p99_ms']:.2f} | {_ratio(pv['range_p50'])} | "
            f"{row['ranges']['errors']} | {row.get('apache_requests_proxied_to_the_server') or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1024 * MiB)
    ap.add_argument("--ranges", type=int, default=300, help="range requests per setup and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; sequential reports the median")
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--stream-size", type=parse_size, default=8 * MiB, help="bytes per concurrent stream")
    ap.add_argument(
        "--stream-rate", type=parse_size, default=1_000_000, help="bytes/s each concurrent client reads (0: unlimited)"
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "stream_results")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--concurrency-sources",
        type=lambda s: s.split(","),
        default=["blob", "blob via apache", "local"],
        help="which concurrent runs, comma separated (default: blob,blob via apache,local)",
    )
    ap.add_argument(
        "--before",
        action="store_true",
        help="also run the server and fronts as configured before issue 15 (unbuffered nginx, Apache "
        "flushpackets, 64 KiB reads only), beside today's, in the same rounds",
    )
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a STREAM_* setting for the Blob server (repeatable), e.g. STREAM_MAX_CONNECTIONS=1000",
    )
    ap.add_argument(
        "--blob-only",
        action="store_true",
        help="only Blob: direct Azurite, the server alone, through nginx and through Apache, and Azure as deployed "
        "(a second Azurite over HTTPS, read directly and through the server behind the HTTPS Apache); no rclone, "
        "no local setups; writes bench/results/stream_blob_fronts.{json,md,svg} unless --out is given",
    )
    ap.add_argument(
        "--pin-azurite",
        action="store_true",
        help="run every Azurite on CPU 0 and everything else on the other CPUs: Azure is not on the "
        "GigHive host, and on 2 cores an unpinned Azurite (one busy Node.js thread) shares its CPU with "
        "the very chain it is compared against",
    )
    ap.add_argument(
        "--local-first",
        action="store_true",
        help="only the local-first comparison (Apache and nginx, with and without the agent's snippet); "
        "writes bench/results/stream_local_first.{json,md}",
    )
    args = ap.parse_args()
    if args.pin_azurite:
        if (os.cpu_count() or 1) < 2:
            raise SystemExit("--pin-azurite needs at least 2 CPUs")
        # This process and all it starts (server, fronts, clients) keep off CPU 0; each Azurite is
        # moved onto it once started (pin_to_cpu0).
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
    if args.local_first:
        return local_first(args)
    if args.blob_only and args.out == REPO / "bench" / "stream_results":
        args.out = REPO / "bench" / "results" / "stream_blob_fronts"

    work = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    procs: list[subprocess.Popen] = []
    rclone: dict[str, subprocess.Popen] = {}
    apache_fronts: list = []
    azurite = Azurite(work / "azurite")
    # Real Azure is HTTPS only, and GigHive's Apache front is HTTPS: the fair peer for that front
    # is Azurite over HTTPS, with the server reading from it over HTTPS too (blob-only mode).
    azurite_tls: Azurite | None = None
    try:
        azurite.start()
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        container = service.create_container("media")
        data_dir = work / "files"
        data_dir.mkdir()
        raw = data_dir / "raw.mp4"
        print(f"writing {args.size / MiB:.0f} MiB ...", flush=True)
        sha = make_file(raw, args.size)
        name = f"video/{sha}.mp4"
        print("uploading to Azurite ...", flush=True)
        put_blob(container, name, raw, sha)
        if args.blob_only:
            from tests.support.tls import make_tls

            tls_files = make_tls(work / "azurite-tls-certs")
            azurite_tls = Azurite(work / "azurite-tls", https=True, cert=tls_files.cert, key=tls_files.key).start()
            tls_service = BlobServiceClient.from_connection_string(
                azurite_tls.connection_string, connection_verify=str(tls_files.ca)
            )
            put_blob(tls_service.create_container("media"), name, raw, sha)
        # Two libraries: one without the file (Blob mode), one with it (local mode).
        empty_roots, local_roots = work / "empty", work / "local"
        for r in (empty_roots, local_roots):
            (r / "audio").mkdir(parents=True)
            (r / "video").mkdir(parents=True)
        os.link(raw, local_roots / f"{name}")
        vouch(work / "state", "video", local_roots / name, sha)

        server_env = dict(kv.split("=", 1) for kv in args.server_env)
        p, blob_sock, blob_tcp = start_server(work, "server-blob", azurite, "media", empty_roots, server_env)
        procs.append(p)
        blob_pid = p.pid
        p, local_sock, _ = start_server(work, "server-local", azurite, "media", local_roots, {})
        procs.append(p)
        local_pid = p.pid
        p, xaccel_sock, _ = start_server(
            work, "server-xaccel", azurite, "media", local_roots, {"STREAM_X_ACCEL_PREFIX": "/_gighive_media_internal"}
        )
        procs.append(p)

        fronts, front_pids = {}, {}
        for label, sock, internal in (
            ("server+nginx", blob_sock, False),
            ("server+nginx/local", local_sock, False),
            ("server+nginx/x-accel", xaccel_sock, True),
        ):
            block = snippet("nginx-locations.conf") + (
                snippet("nginx-internal.conf", roots=local_roots) if internal else ""
            )
            p, port = start_nginx(
                work, label.replace("/", "-").replace("+", "-"), block, snippet("nginx-upstream.conf", sock)
            )
            procs.append(p)
            fronts[label] = port
            front_pids[label] = p.pid
        static_port = 0
        if not args.blob_only:
            p, static_port = start_nginx(work, "nginx-static", f"location /video/ {{ root {local_roots}; }}")
            procs.append(p)
        # Apache built like GigHive's container (HTTPS, Basic Auth, CacheEnable disk /), with the
        # shipped snippet and no media on disk: every byte comes from Blob through the server.
        apache = start_apache(work, "apache-blob", blob_sock, empty_roots)
        # The same without TLS, and Apache sending the file from disk itself (HTTPS): what the
        # proxy hop costs, and the ceiling Apache's TLS sets on this machine whatever the source.
        apache_http = start_apache(work, "apache-blob-http", blob_sock, empty_roots, tls=False)
        apache_alone = start_apache(work, "apache-alone", None, local_roots)
        apache_fronts.extend([apache, apache_http, apache_alone])
        if azurite_tls is not None:
            p, tls_sock, _ = start_server(
                work, "server-blob-tls", azurite_tls, "media", empty_roots,
                {**server_env, "AZURE_CA_BUNDLE": str(tls_files.ca)},
            )  # fmt: skip
            procs.append(p)
            tls_server_pid = p.pid
            apache_tls = start_apache(work, "apache-blob-tls", tls_sock, empty_roots)
            apache_fronts.append(apache_tls)
        if args.before:
            p, old_sock, old_tcp = start_server(work, "server-before", azurite, "media", empty_roots, BEFORE_SERVER_ENV)
            procs.append(p)
            old_pid = p.pid
            p, old_nginx = start_nginx(
                work,
                "nginx-before",
                before(snippet("nginx-locations.conf"), BEFORE_NGINX),
                snippet("nginx-upstream.conf", old_sock),
            )
            procs.append(p)
            old_nginx_pid = p.pid
            old_apache = start_apache(work, "apache-before", old_sock, empty_roots, old_config=True)
            apache_fronts.append(old_apache)

        sas = generate_container_sas(
            ACCOUNT_NAME, "media", account_key=ACCOUNT_KEY, permission=ContainerSasPermissions(read=True, list=True),
            expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=6),
        )  # fmt: skip
        sas_url = f"{azurite.blob_endpoint}/media?{sas}"

        def restart_rclone(target: Target | None = None) -> int:
            # rclone 1.60 stops answering after some hundred range requests against Azurite (see
            # the results), so each round gets a fresh rclone, which is the fairer comparison.
            if "proc" in rclone:
                _proc.terminate(rclone["proc"], timeout=30)
            port = _proc.free_port()
            rclone["proc"] = _proc.spawn(
                ["rclone", "serve", "http", f":azureblob,sas_url='{sas_url}':", "--addr", f"127.0.0.1:{port}",
                 "--read-only", "--no-modtime"],
                work / "rclone.log",
            )  # fmt: skip
            wait_port("127.0.0.1", port)
            if target is not None:
                target.port = port
            return port

        rclone_port = restart_rclone() if not args.blob_only else 0

        apache_target = Target(
            "server+apache",
            f"https://127.0.0.1:{apache.port}",
            f"/{name}",
            headers={"Authorization": basic_auth()},
            ca=apache.tls.ca,
        )
        auth = {"Authorization": basic_auth()}

        def serving(*pids: int):
            return lambda: [azurite.pid or 0, *pids]

        apache_target.pids = serving(blob_pid, apache.proc.pid)
        targets = [
            Target("azurite", azurite.blob_endpoint, f"/media/{name}", sas, pids=serving()),
            Target("rclone", f"http://127.0.0.1:{rclone_port}", f"/media/{name}"),
            Target(
                "server+nginx",
                f"http://127.0.0.1:{fronts['server+nginx']}",
                f"/{name}",
                pids=serving(blob_pid, front_pids["server+nginx"]),
            ),
            apache_target,
            Target(
                "server+apache (http)",
                f"http://127.0.0.1:{apache_http.port}",
                f"/{name}",
                headers=auth,
                pids=serving(blob_pid, apache_http.proc.pid),
            ),
            Target(
                "apache alone",
                f"https://127.0.0.1:{apache_alone.port}",
                f"/{name}",
                headers=auth,
                ca=apache_alone.tls.ca,
            ),
            # Not a setup of the issue: the server without a front, to show what each hop costs.
            Target("server (no nginx)", f"http://127.0.0.1:{blob_tcp}", f"/{name}", pids=serving(blob_pid)),
            Target("server+nginx/local", f"http://127.0.0.1:{fronts['server+nginx/local']}", f"/{name}"),
            Target("server+nginx/x-accel", f"http://127.0.0.1:{fronts['server+nginx/x-accel']}", f"/{name}"),
            Target("nginx", f"http://127.0.0.1:{static_port}", f"/{name}"),
        ]
        if azurite_tls is not None:
            tls_sas = generate_container_sas(
                ACCOUNT_NAME, "media", account_key=ACCOUNT_KEY, permission=ContainerSasPermissions(read=True),
                expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=6),
            )  # fmt: skip
            targets += [
                Target(
                    "azurite (https)",
                    azurite_tls.blob_endpoint,
                    f"/media/{name}",
                    tls_sas,
                    ca=tls_files.ca,
                    pids=lambda: [azurite_tls.pid or 0],
                ),
                Target(
                    "server+apache (azure https)",
                    f"https://127.0.0.1:{apache_tls.port}",
                    f"/{name}",
                    headers=auth,
                    ca=apache_tls.tls.ca,
                    pids=lambda: [azurite_tls.pid or 0, tls_server_pid, apache_tls.proc.pid],
                ),
            ]
        if args.blob_only:
            # Blob through each front beside direct Azurite; no rclone, no local setups.
            targets = [t for t in targets if t.name in BLOB_SETUPS]
        if args.before:
            targets += [
                Target(
                    "server+nginx (before)",
                    f"http://127.0.0.1:{old_nginx}",
                    f"/{name}",
                    pids=serving(old_pid, old_nginx_pid),
                ),
                Target(
                    "server+apache (before)",
                    f"https://127.0.0.1:{old_apache.port}",
                    f"/{name}",
                    headers=auth,
                    ca=old_apache.tls.ca,
                    pids=serving(old_pid, old_apache.proc.pid),
                ),
                Target("server (before)", f"http://127.0.0.1:{old_tcp}", f"/{name}", pids=serving(old_pid)),
            ]
        rng = random.Random(42)
        offsets = [rng.randrange(0, args.size - RANGE_SIZE) for _ in range(args.ranges)]
        setups: dict[str, dict] = {t.name: {} for t in targets}
        # Warm-up: page cache, connection pools, the server's stat cache (as in steady use).
        for t in targets:
            ranges(t, offsets[:5], raw)
        # Interleave the setups so that drift (page cache, thermal, Azurite state) hits all alike.
        seq_runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
        range_runs: dict[str, list[dict]] = {t.name: [] for t in targets}
        seq_errors: dict[str, list[str]] = {t.name: [] for t in targets}
        seq_by_round: dict[str, list[float | None]] = {t.name: [] for t in targets}
        cpu_by_round: dict[str, list[float | None]] = {t.name: [] for t in targets}
        for round_no in range(args.rounds):
            # A fresh Azurite and rclone every round: rclone leaves connections open that pile up
            # in Azurite (which then fails with 500 after a few rounds), and every setup should
            # meet the same Azurite state.
            azurite.restart()
            if azurite_tls is not None:
                azurite_tls.restart()
            if args.pin_azurite:
                pin_to_cpu0(azurite.pid)
                pin_to_cpu0(azurite_tls.pid if azurite_tls is not None else None)
            if not args.blob_only:
                restart_rclone(targets[1])
            for t in targets:
                ranges(t, offsets[:5], raw)  # refill connection pools after the restart
            for t in targets:
                print(f"round {round_no + 1}: sequential {t.name} ...", flush=True)
                try:
                    run = sequential(t, args.size)
                    seq_runs[t.name].append(run)
                    seq_by_round[t.name].append(run["mb_per_s"])
                    cpu_by_round[t.name].append(run["cpu_s_per_gb"] or None)
                except Exception as e:  # noqa: BLE001 - reported, the other setups go on
                    print(f"  failed: {type(e).__name__}: {e}", flush=True)
                    seq_errors[t.name].append(f"{type(e).__name__}: {e}")
                    seq_by_round[t.name].append(None)
                    cpu_by_round[t.name].append(None)
            for t in targets:
                print(f"round {round_no + 1}: ranges {t.name} ...", flush=True)
                range_runs[t.name].append(ranges(t, offsets, raw))
        for t in targets:
            runs = sorted(seq_runs[t.name], key=lambda r: r["mb_per_s"])
            median = runs[len(runs) // 2] if runs else {"seconds": 0.0, "mb_per_s": 0.0, "ttfb_ms": 0.0}
            setups[t.name]["sequential"] = {
                **median,
                "runs_mb_per_s": [r["mb_per_s"] for r in runs],
                "errors": seq_errors[t.name],
            }
            setups[t.name]["ranges"] = pooled_ranges(range_runs[t.name])
        # Paired ratios: each round's figure against the baseline's figure of the same round, so
        # that load from other processes on the machine (which drifts) cancels out.
        p99_by_round = {name: [p99(r["ttfbs"]) for r in runs] for name, runs in range_runs.items()}
        for t in targets:
            for base in ("azurite", "nginx", "apache alone", "azurite (https)"):
                if base not in p99_by_round:
                    continue
                setups[t.name][f"paired_vs_{base.replace(' ', '_')}"] = {
                    "sequential": paired(seq_by_round[t.name], seq_by_round[base]),
                    "range_p99": paired(p99_by_round[t.name], p99_by_round[base]),
                }
            cpu = [c for c in cpu_by_round[t.name] if c]
            setups[t.name]["cpu_s_per_gb"] = statistics.median(cpu) if cpu else None
            setups[t.name]["cpu_vs_azurite"] = paired(cpu_by_round[t.name], cpu_by_round["azurite"])
        for now, old in BEFORE_TWINS.items():
            if now in setups and old in setups:
                setups[now]["paired_vs_before"] = {
                    "sequential": paired(seq_by_round[now], seq_by_round[old]),
                    "cpu": paired(cpu_by_round[now], cpu_by_round[old]),
                    "range_p99": paired(p99_by_round[now], p99_by_round[old]),
                }
        concurrency = {}
        by_name = {t.name: t for t in targets}
        runs = [
            ("blob", blob_pid, by_name["server+nginx"], front_pids["server+nginx"]),
            ("blob via apache", blob_pid, by_name["server+apache"], apache.proc.pid),
        ]
        if not args.blob_only:
            runs.append(("local", local_pid, by_name["server+nginx/local"], front_pids["server+nginx/local"]))
        runs = [r for r in runs if r[0] in args.concurrency_sources]
        for label, pid, t, front_pid in runs if args.concurrency else []:
            print(f"{args.concurrency} concurrent streams from {label} ...", flush=True)
            concurrency[label] = concurrent_streams(
                t, pid, args.concurrency, args.stream_size, args.size, raw, args.stream_rate, front_pid
            )

        results = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "size_mib": args.size / MiB,
            "range_requests": args.ranges,
            "rounds": args.rounds,
            "setups": setups,
            "concurrency": concurrency,
            "server_env": server_env,
            "pinned": bool(args.pin_azurite),
        }
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(results))
        args.out.with_suffix(".svg").write_text(svg_plot(results) + "\n")
        print(markdown(results))
        return 0
    finally:
        for front in apache_fronts:
            front.stop()
        if "proc" in rclone:
            procs.append(rclone["proc"])
        for p in reversed(procs):
            _proc.terminate(p, timeout=30)
        azurite.stop()
        if azurite_tls is not None:
            azurite_tls.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")


if __name__ == "__main__":
    socket.setdefaulttimeout(120)
    sys.exit(main())
