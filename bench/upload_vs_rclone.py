#!/usr/bin/env python3
"""Upload benchmark: `gighive-media upload --no-watch` against `rclone copy`, side by side.

Both tools upload the same warm files to the same Azurite instance, one run at a time, with the
same concurrency (4 files x 4 blocks of 8 MiB in flight). Two cases:

  big    one 1 GiB file          (video/<sha256>.mp4)
  small  2,000 files of 64 KiB   (audio/<sha256>.mp3)

Every run gets a fresh container (and, for the agent, a fresh state directory), and is checked
afterwards: the container must hold exactly the expected blob names with the expected sizes, or
the benchmark stops. Repetitions alternate which tool goes first. Per run we record wall time,
the tool's CPU seconds (user + sys) and its peak RSS (ru_maxrss), both from os.wait4 on the tool
process, started through a small launcher (see _LAUNCHER for why). Azurite's own CPU is not
counted for either tool; it is recorded next to each run, as is the CPU everything else on the
machine used meanwhile (a shared machine's noise). Medians go into a JSON file and a markdown
table, with ratios agent / rclone.

    .venv/bin/python bench/upload_vs_rclone.py            # 1 GiB + 2,000 x 64 KiB, 3 runs each
    .venv/bin/python bench/upload_vs_rclone.py --quick    # 64 MiB + 200 x 64 KiB, 1 run each
    .venv/bin/python bench/upload_vs_rclone.py --reps 5 --quiet-wait 180   # on a shared machine

Needs Azurite (installed by .ci/setup) and rclone (Debian's package) on PATH. Results go to
bench/results/upload_vs_rclone{,-quick}.{json,md}; docs/benchmarks.md reads them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from azure.storage.blob import (  # noqa: E402
    AccountSasPermissions,
    BlobServiceClient,
    ResourceTypes,
    generate_account_sas,
)

from tests.support.azurite import ACCOUNT_KEY, ACCOUNT_NAME, Azurite  # noqa: E402
from tests.support.rusage import measure  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB

# The shared concurrency: 4 files at a time, 4 blocks in flight per file, 8 MiB blocks.
FILE_CONCURRENCY = 4
BLOCK_CONCURRENCY = 4
BLOCK_SIZE_MIB = 8

RCLONE_FLAGS = [
    "--transfers",
    str(FILE_CONCURRENCY),
    "--azureblob-upload-concurrency",
    str(BLOCK_CONCURRENCY),
    "--azureblob-chunk-size",
    f"{BLOCK_SIZE_MIB}M",
]

AGENT_SETTINGS = {
    "UPLOAD_SETTLE_SECONDS": "0",
    "UPLOAD_BLOCK_SIZE": f"{BLOCK_SIZE_MIB}MiB",
    "UPLOAD_BLOCK_CONCURRENCY": str(BLOCK_CONCURRENCY),
    "UPLOAD_FILE_CONCURRENCY": str(FILE_CONCURRENCY),
}


@dataclass
class Case:
    name: str
    root: str  # media root the files live in (audio or video)
    ext: str
    count: int
    size: int

    @property
    def label(self) -> str:
        if self.count == 1:
            return f"1 file of {_human(self.size)}"
        return f"{self.count:,} files of {_human(self.size)}"


@dataclass
class Run:
    case: str
    tool: str
    rep: int
    order: int  # 0 = this tool ran first in its pair, 1 = second
    wall_s: float
    cpu_user_s: float
    cpu_sys_s: float
    cpu_s: float
    max_rss_mib: float
    blobs: int
    bytes: int
    loadavg_before: float  # 1-minute load average when the run started
    azurite_cpu_s: float  # Azurite's CPU during the run (not counted for the tool; for context)
    other_cpu_s: float  # CPU used during the run by everything else on the machine (noise)
    warm_s: float  # reading the source files just before the run (about 0.3 s/GiB when cached)
    cached_pct: float | None  # share of the source bytes in the page cache when the run started
    io_stall_s: float  # /proc/pressure/io "some": time some task waited for I/O during the run
    cpu_stall_s: float  # /proc/pressure/cpu "some": time some runnable task waited for a CPU
    waited_for_quiet_s: float


def _human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


# ---- data -------------------------------------------------------------------------------------


def make_case_files(base: Path, case: Case) -> dict[str, int]:
    """Content-addressed random files under base/<case>/<root>/; returns blob name -> size."""
    case_dir = base / case.name
    for root in ("audio", "video"):
        (case_dir / root).mkdir(parents=True, exist_ok=True)
    expected: dict[str, int] = {}
    rnd = os.urandom
    for _ in range(case.count):
        tmp = case_dir / case.root / ".incoming.tmp"
        h = hashlib.sha256()
        with open(tmp, "wb") as f:
            left = case.size
            while left:
                chunk = rnd(min(left, 8 * MiB))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        name = f"{h.hexdigest()}.{case.ext}"
        tmp.rename(case_dir / case.root / name)
        expected[f"{case.root}/{name}"] = case.size
    return expected


def warm(base: Path) -> float:
    """Read every file under base once, so the tool reads from the page cache; returns seconds taken.

    Called right before each measured run, not once up front: kernels with DAMON proactive
    reclaim (this machine pages out page cache idle for about a minute) would otherwise evict
    the files while the benchmark waits, and the next run would read from disk.
    """
    t0 = time.monotonic()
    for p in base.rglob("*"):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.read(8 * MiB):
                    pass
    return time.monotonic() - t0


def cached_fraction(base: Path) -> float | None:
    """Share of the bytes under base that are in the page cache (util-linux fincore), None if unknown."""
    files = [str(p) for p in base.rglob("*") if p.is_file()]
    if not files or not shutil.which("fincore"):
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *files],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return None
    res = size = 0
    for line in out.stdout.splitlines():
        r, z = line.split()
        res, size = res + int(r), size + int(z)
    return res / size if size else None


# ---- measuring ----------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all CPUs have spent busy since boot (/proc/stat; idle and iowait excluded)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def process_cpu_s(pid: int | None) -> float:
    """utime + stime of one process (/proc/PID/stat), 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def pressure_stall_s(resource: str) -> float:
    """Cumulative "some" stall time from /proc/pressure/<resource> (PSI), 0 where unsupported."""
    try:
        first = Path(f"/proc/pressure/{resource}").read_text().split("\n", 1)[0]
    except OSError:
        return 0.0
    m = re.search(r"total=(\d+)", first)
    return int(m.group(1)) / 1e6 if m else 0.0


def wait_for_quiet(max_wait: float, threshold_cores: float, window: float = 2.0) -> float:
    """Wait (at most max_wait s) until the machine was nearly idle for `window` s; returns seconds waited.

    Other jobs on a shared machine compete with both the tool and Azurite for the same cores, so a
    run started during someone else's burst measures their load as much as ours.
    """
    start = time.monotonic()
    while True:
        b0 = machine_busy_s()
        time.sleep(window)
        busy_cores = (machine_busy_s() - b0) / window
        waited = time.monotonic() - start
        if busy_cores <= threshold_cores or waited >= max_wait:
            return waited


def launcher_floor_mib(work: Path) -> float:
    """Peak RSS the launcher reports for /bin/true: the smallest figure it can report."""
    return measure(["/bin/true"], dict(os.environ), work / "floor.log").maxrss_kib / 1024


def list_container(service: BlobServiceClient, container: str) -> dict[str, int]:
    return {b.name: b.size for b in service.get_container_client(container).list_blobs()}


def check_uploaded(service: BlobServiceClient, container: str, expected: dict[str, int], log_path: Path) -> None:
    got = list_container(service, container)
    if got != expected:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])[:5]
        raise SystemExit(
            f"container {container}: {len(got)} blobs / {sum(got.values())} bytes, expected {len(expected)} / "
            f"{sum(expected.values())}; missing {missing}, unexpected {extra}, wrong size {wrong}; see {log_path}"
        )


# ---- the two tools ------------------------------------------------------------------------------


def agent_command(bench: Bench, case: Case, container: str, run_dir: Path) -> tuple[list[str], dict[str, str]]:
    src = bench.data / case.name
    state = run_dir / "state"
    config = run_dir / "agent.env"
    lines = [
        "MEDIA_STORAGE_BACKEND=azure_blob",
        "AZURE_AUTH_MODE=connection_string",
        f'AZURE_STORAGE_CONNECTION_STRING="{bench.azurite.connection_string}"',
        f"AZURE_STORAGE_CONTAINER_NAME={container}",
        f"MEDIA_ROOTS=audio={src / 'audio'},video={src / 'video'}",
        f"GIGHIVE_MEDIA_STATE_DIR={state}",
        *(f"{k}={v}" for k, v in AGENT_SETTINGS.items()),
    ]
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIGHIVE_", "AZURE_", "MEDIA_", "UPLOAD_"))}
    env.pop("STATE_DIRECTORY", None)
    env.pop("JOURNAL_STREAM", None)
    env.pop("PYTHONPATH", None)
    if bench.agent_src is not None:
        # Ahead of the editable install in .venv: the exported commit, not the (shared) working tree.
        env["PYTHONPATH"] = str(bench.agent_src)
    return [str(bench.agent_bin), "--config", str(config), "upload", "--no-watch"], env


def rclone_command(bench: Bench, case: Case, container: str, run_dir: Path) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
    # rclone 1.60 hangs with account + key + endpoint=http://127.0.0.1:PORT/devstoreaccount1, and its
    # use_emulator is pinned to 127.0.0.1:10000; an account SAS URL reaches Azurite on any port.
    env["RCLONE_AZUREBLOB_SAS_URL"] = bench.sas_url
    env["RCLONE_CONFIG"] = str(bench.rclone_conf)
    argv = [bench.rclone_bin, "copy", str(bench.data / case.name), f":azureblob:{container}", *RCLONE_FLAGS]
    return argv, env


TOOLS = {"agent": agent_command, "rclone": rclone_command}


class Bench:
    def __init__(self, work: Path, azurite: Azurite, agent_bin: Path, rclone_bin: str):
        self.agent_src: Path | None = None
        self.quiet_max_wait = 0.0
        self.quiet_threshold = 0.3
        self.work = work
        self.data = work / "data"
        self.runs_dir = work / "runs"
        self.azurite = azurite
        self.agent_bin = agent_bin
        self.rclone_bin = rclone_bin
        self.service = BlobServiceClient.from_connection_string(azurite.connection_string)
        sas = generate_account_sas(
            ACCOUNT_NAME,
            ACCOUNT_KEY,
            ResourceTypes(service=True, container=True, object=True),
            AccountSasPermissions(read=True, write=True, delete=True, list=True, add=True, create=True),
            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
        )
        self.sas_url = f"{azurite.blob_endpoint}?{sas}"
        self.rclone_conf = work / "rclone.conf"
        self.rclone_conf.write_text("")

    def run_once(self, case: Case, tool: str, rep: int, order: int, expected: dict[str, int]) -> Run:
        container = f"bench-{case.name}-{tool}-{rep}"
        run_dir = self.runs_dir / container
        run_dir.mkdir(parents=True)
        self.service.create_container(container)
        argv, env = TOOLS[tool](self, case, container, run_dir)
        log_path = run_dir / "output.log"
        waited = wait_for_quiet(self.quiet_max_wait, self.quiet_threshold) if self.quiet_max_wait > 0 else 0.0
        warm_s = warm(self.data / case.name)
        cached = cached_fraction(self.data / case.name)
        load = os.getloadavg()[0]
        az0, busy0 = process_cpu_s(self.azurite.pid), machine_busy_s()
        io0, cpu0 = pressure_stall_s("io"), pressure_stall_s("cpu")
        u = measure(argv, env, log_path)
        az1, busy1 = process_cpu_s(self.azurite.pid), machine_busy_s()
        io1, cpu1 = pressure_stall_s("io"), pressure_stall_s("cpu")
        if u.exit != 0:
            raise SystemExit(f"{tool} exited with {u.exit} on {case.name}; see {log_path}")
        check_uploaded(self.service, container, expected, log_path)
        run = Run(
            case=case.name,
            tool=tool,
            rep=rep,
            order=order,
            wall_s=round(u.wall, 3),
            cpu_user_s=round(u.utime, 3),
            cpu_sys_s=round(u.stime, 3),
            cpu_s=round(u.utime + u.stime, 3),
            max_rss_mib=round(u.maxrss_kib / 1024, 1),  # Linux reports KiB
            blobs=len(expected),
            bytes=sum(expected.values()),
            loadavg_before=round(load, 2),
            azurite_cpu_s=round(az1 - az0, 2),
            # The launcher's own start-up (~0.03 s) lands here too.
            other_cpu_s=round(max(0.0, (busy1 - busy0) - (az1 - az0) - (u.utime + u.stime)), 2),
            waited_for_quiet_s=round(waited, 1),
            warm_s=round(warm_s, 2),
            cached_pct=round(100 * cached, 1) if cached is not None else None,
            io_stall_s=round(io1 - io0, 2),
            cpu_stall_s=round(cpu1 - cpu0, 2),
        )
        # Free Azurite's disk and keep its metadata small for the next run.
        self.service.delete_container(container)
        shutil.rmtree(run_dir / "state", ignore_errors=True)
        return run


# ---- machine and versions -----------------------------------------------------------------------


def machine_info(rclone_bin: str, azurite: Azurite) -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        m = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        mem_kib = int(m.group(1)) if m else 0
    except OSError:
        pass
    rclone_version = subprocess.run([rclone_bin, "version"], capture_output=True, text=True).stdout.splitlines()[0]
    azurite_version = subprocess.run([azurite.binary, "--version"], capture_output=True, text=True).stdout.strip()
    node_version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    from importlib.metadata import version

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rclone": rclone_version,
        "azurite": azurite_version,
        "node": node_version,
        "azure_storage_blob": version("azure-storage-blob"),
        "agent": version("gighive-media-agent"),
    }


def _git(*argv: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, check=True).stdout.strip()


def export_agent(rev: str, dest: Path) -> tuple[Path | None, str]:
    """Put agent/ as of `rev` under dest (None for 'worktree'); returns (path, description).

    Others may be editing agent/ while the benchmark runs, and .venv holds an editable install of
    the working tree, so by default the benchmark runs a fixed commit exported with git archive.
    """
    if rev == "worktree":
        dirty = _git("status", "--porcelain", "--", "agent")
        head = _git("rev-parse", "--short", "HEAD")
        return None, f"working tree at {head}{' with uncommitted changes in agent/' if dirty else ''}"
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "agent"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest, f"commit {commit[:12]}"


# ---- report -------------------------------------------------------------------------------------


def summarize(cases: dict[str, dict[str, object]], runs: list[Run]) -> dict[str, dict[str, object]]:
    """Per case and tool: medians (and the best run, for wall and CPU) plus ratios agent / rclone.

    cases maps a case name to {"label", "files", "bytes"}.
    """
    out: dict[str, dict[str, object]] = {}
    for name, meta in cases.items():
        entry: dict[str, object] = dict(meta)
        for tool in TOOLS:
            mine = [r for r in runs if r.case == name and r.tool == tool]
            t: dict[str, object] = {"runs": len(mine)}
            for m in ("wall_s", "cpu_s", "cpu_user_s", "cpu_sys_s", "max_rss_mib", "azurite_cpu_s", "other_cpu_s"):
                t[m] = round(statistics.median(getattr(r, m) for r in mine), 3)
            t["best_wall_s"] = min(r.wall_s for r in mine)
            t["best_cpu_s"] = min(r.cpu_s for r in mine)
            t["MB_per_s"] = round(int(meta["bytes"]) / 1e6 / t["wall_s"], 1)
            entry[tool] = t
        a, r = entry["agent"], entry["rclone"]
        entry["ratio_agent_over_rclone"] = {
            m: round(a[m] / r[m], 2) if r[m] else None
            for m in ("wall_s", "cpu_s", "max_rss_mib", "best_wall_s", "best_cpu_s")
        }
        out[name] = entry
    return out


def markdown_table(summary: dict[str, dict[str, object]]) -> str:
    rows = [
        "| case | metric | agent | rclone | agent / rclone | agent, best run | rclone, best run | best / best |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in summary.values():
        a, r, q = entry["agent"], entry["rclone"], entry["ratio_agent_over_rclone"]
        label = entry["label"]
        rows.append(
            f"| {label} | wall time (s), median | {a['wall_s']:.2f} | {r['wall_s']:.2f} | {q['wall_s']:.2f} "
            f"| {a['best_wall_s']:.2f} | {r['best_wall_s']:.2f} | {q['best_wall_s']:.2f} |"
        )
        rows.append(
            f"| {label} | CPU user+sys (s), median | {a['cpu_s']:.2f} | {r['cpu_s']:.2f} | {q['cpu_s']:.2f} "
            f"| {a['best_cpu_s']:.2f} | {r['best_cpu_s']:.2f} | {q['best_cpu_s']:.2f} |"
        )
        rows.append(
            f"| {label} | peak RSS (MiB), median | {a['max_rss_mib']:.1f} | {r['max_rss_mib']:.1f} "
            f"| {q['max_rss_mib']:.2f} | | | |"
        )
        rows.append(
            f"| {label} | throughput (MB/s), median wall | {a['MB_per_s']:.1f} | {r['MB_per_s']:.1f} "
            f"| {a['MB_per_s'] / r['MB_per_s']:.2f} | | | |"
        )
        rows.append(
            f"| {label} | Azurite CPU (s), median, not counted | {a['azurite_cpu_s']:.2f} | {r['azurite_cpu_s']:.2f} "
            f"| | | | |"
        )
    return "\n".join(rows) + "\n"


def write_outputs(result: dict[str, object], out: Path) -> str:
    """Write out.json and out.md from a result dict; returns the summary table."""
    old = {"io_stall_s": 0.0, "cpu_stall_s": 0.0, "warm_s": 0.0, "cached_pct": None}
    runs = [Run(**{**old, **r}) for r in result["runs"]]
    result["summary"] = summarize(
        {k: {f: v[f] for f in ("label", "files", "bytes")} for k, v in result["summary"].items()}, runs
    )
    info = result["machine"]
    settings = result["settings"]
    table = markdown_table(result["summary"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = (
        f"# upload_vs_rclone ({result['date']}, {result['reps']} run(s) per tool and case)\n\n"
        f"Machine: {info['nproc']} x {info['cpu_model']}, Python {info['python']}, {info['rclone']}, "
        f"Azurite {info['azurite']} (Node {info['node']}), azure-storage-blob {info['azure_storage_blob']}, "
        f"agent {info['agent']} ({info['agent_source']}).\n\n"
        f"agent: {' '.join(f'{k}={v}' for k, v in settings['agent'].items())}\n\n"
        f"rclone: `rclone copy SRC :azureblob:CONTAINER {' '.join(settings['rclone_flags'])}`\n\n"
        f"{table}\n## Every run\n\n{runs_table(runs)}"
    )
    out.with_suffix(".md").write_text(md)
    return table


def runs_table(runs: list[Run]) -> str:
    rows = [
        "| case | rep | tool | ran | wall (s) | user (s) | sys (s) | peak RSS (MiB) | Azurite CPU (s) "
        "| others' CPU (s) | I/O stall (s) | source cached | load avg before |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        rows.append(
            f"| {r.case} | {r.rep} | {r.tool} | {'first' if r.order == 0 else 'second'} | {r.wall_s:.2f} | "
            f"{r.cpu_user_s:.2f} | {r.cpu_sys_s:.2f} | {r.max_rss_mib:.1f} | {r.azurite_cpu_s:.2f} | "
            f"{r.other_cpu_s:.2f} | {r.io_stall_s:.2f} | "
            f"{'?' if r.cached_pct is None else f'{r.cached_pct:.0f} %'} | {r.loadavg_before:.2f} |"
        )
    return "\n".join(rows) + "\n"


# ---- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 64 MiB + 200 x 64 KiB, 1 repetition")
    p.add_argument("--reps", type=int, help="repetitions per case and tool (default 3; 1 with --quick)")
    p.add_argument("--big-mib", type=int, help="size of the single large file in MiB (default 1024)")
    p.add_argument("--small-count", type=int, help="number of small files (default 2000)")
    p.add_argument("--small-kib", type=int, default=64, help="size of each small file in KiB (default 64)")
    p.add_argument("--cases", default="big,small", help="comma-separated subset of big,small")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new one under $TMPDIR)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run wait up to this long for the machine to be idle (shared machines); default 0",
    )
    p.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        metavar="CORES",
        help="'idle' for --quiet-wait: at most this many cores busy over 2 s (default 0.3)",
    )
    p.add_argument(
        "--agent-rev",
        default="HEAD",
        metavar="REV",
        help="git revision of agent/ to benchmark (exported to the scratch dir); 'worktree' runs the working tree",
    )
    p.add_argument(
        "--azurite-dir",
        type=Path,
        metavar="DIR",
        help="where Azurite stores blobs (default: in the scratch dir, same disk as the source files); "
        "a tmpfs such as /dev/shm keeps other jobs' disk traffic out of the wall times",
    )
    p.add_argument(
        "--report", type=Path, metavar="JSON", help="only re-render the .md (and summary) from an earlier .json"
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (data, logs, Azurite)")
    p.add_argument(
        "--out", type=Path, help="output prefix for .json and .md (default bench/results/upload_vs_rclone[-quick])"
    )
    a = p.parse_args()
    a.reps = a.reps or (1 if a.quick else 3)
    a.big_mib = a.big_mib or (64 if a.quick else 1024)
    a.small_count = a.small_count or (200 if a.quick else 2000)
    if a.out is None:
        a.out = REPO / "bench" / "results" / ("upload_vs_rclone-quick" if a.quick else "upload_vs_rclone")
    return a


def main() -> int:
    args = parse_args()
    if args.report:
        result = json.loads(args.report.read_text())
        print(write_outputs(result, args.report.with_suffix("")))
        return 0
    rclone_bin = shutil.which("rclone")
    if not rclone_bin:
        raise SystemExit("rclone not found (apt-get install rclone)")
    agent_bin = Path(sys.executable).parent / "gighive-media"
    if not agent_bin.exists():
        raise SystemExit(f"{agent_bin} not found; run .ci/setup (installs the package into .venv)")

    all_cases = {
        "big": Case("big", "video", "mp4", 1, args.big_mib * MiB),
        "small": Case("small", "audio", "mp3", args.small_count, args.small_kib * 1024),
    }
    cases = [all_cases[n.strip()] for n in args.cases.split(",") if n.strip()]

    work = args.workdir or Path(tempfile.mkdtemp(prefix="gighive-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"scratch directory: {work}", flush=True)
    azurite_dir = (
        Path(tempfile.mkdtemp(prefix="gighive-bench-azurite-", dir=args.azurite_dir))
        if args.azurite_dir
        else work / "azurite"
    )
    azurite = Azurite(azurite_dir).start()
    try:
        bench = Bench(work, azurite, agent_bin, rclone_bin)
        bench.agent_src, agent_source = export_agent(args.agent_rev, work / "agent-src")
        if bench.agent_src is not None:
            where = subprocess.run(
                [sys.executable, "-c", "import agent; print(agent.__file__)"],
                env={**os.environ, "PYTHONPATH": str(bench.agent_src)},
                cwd=work,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            if not where.startswith(str(bench.agent_src)):
                raise SystemExit(f"the exported agent is not what Python imports ({where})")
        bench.quiet_max_wait, bench.quiet_threshold = args.quiet_wait, args.quiet_cores
        info = machine_info(rclone_bin, azurite)
        info["rss_floor_mib"] = round(launcher_floor_mib(work), 1)
        info["agent_source"] = agent_source
        print(json.dumps(info, indent=2), flush=True)

        expected: dict[str, dict[str, int]] = {}
        for case in cases:
            t0 = time.monotonic()
            expected[case.name] = make_case_files(bench.data, case)
            print(f"generated {case.name}: {case.label} in {time.monotonic() - t0:.1f} s", flush=True)

        runs: list[Run] = []
        for rep in range(args.reps):
            # Alternate which tool goes first, so neither always gets the fresher Azurite.
            order = list(TOOLS) if rep % 2 == 0 else list(reversed(TOOLS))
            for case in cases:
                for i, tool in enumerate(order):
                    run = bench.run_once(case, tool, rep, i, expected[case.name])
                    runs.append(run)
                    print(
                        f"rep {rep} {case.name:5} {tool:6}: wall {run.wall_s:7.2f} s  cpu {run.cpu_s:7.2f} s "
                        f"(user {run.cpu_user_s:.2f} sys {run.cpu_sys_s:.2f})  peak RSS {run.max_rss_mib:7.1f} MiB"
                        f"  [Azurite {run.azurite_cpu_s:.2f} s, others {run.other_cpu_s:.2f} s, "
                        f"I/O stall {run.io_stall_s:.2f} s, source cached {run.cached_pct} %]",
                        flush=True,
                    )

        result = {
            "benchmark": "upload_vs_rclone",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            "reps": args.reps,
            "machine": info,
            "settings": {
                "agent": AGENT_SETTINGS,
                "rclone_flags": RCLONE_FLAGS,
                "rclone_auth": "account SAS URL via RCLONE_AZUREBLOB_SAS_URL",
                "page_cache": "warm: the case's source files are read right before each run (after any quiet "
                "wait); nothing is dropped",
                "azurite_cpu_counted": False,
                "quiet_wait_s": args.quiet_wait,
                "quiet_cores": args.quiet_cores,
                "azurite_storage": str(args.azurite_dir or "scratch dir (same disk as the source files)"),
            },
            "summary": {c.name: {"label": c.label, "files": c.count, "bytes": c.count * c.size} for c in cases},
            "runs": [asdict(r) for r in runs],
        }
        table = write_outputs(result, args.out)
        print()
        print(table)
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    finally:
        azurite.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(azurite_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
