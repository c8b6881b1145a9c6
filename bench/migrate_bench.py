#!/usr/bin/env python3
"""Migration benchmark: `gighive-media migrate` over a 100,000-file library, beside `rclone copy`.

The library is GigHive-shaped: 100,000 small content-addressed files of 4-64 KiB (90% video,
10% audio, a thumbnail per 50 videos) plus a few 64 MiB videos. Against one Azurite (in-memory,
so its own disk persistence does not dominate) and one MariaDB (the DB pointer is part of the
agent's job), in this order:

  dry-run (empty)   `migrate --dry-run` before anything is in Blob: time and peak RSS
  migrate           `migrate --concurrency C` of the whole library into container `agent`
  dry-run (full)    `migrate --dry-run` with every file in Blob, beside `rclone lsf -R` of it
  rerun             `migrate` again: nothing to send
  verify --all      properties of every blob, and every local byte hashed
  side by side      agent `migrate` and `rclone copy --transfers C --checkers C`, each into a
                    fresh container, of the same --peer-files subset (hard links, same inodes)

Why a subset for the side-by-side: the whole-library migration into an in-memory Azurite takes
the better part of an hour on a 2-core machine, and a second one for rclone would double that;
the ratio needs the same files, the same Azurite and the same concurrency, which the subset
gives (both tools start from an empty container, so neither pays for the other's 100,000 blobs).

Every migration is checked afterwards (blob names and sizes must equal the files). Per step:
wall time, CPU and peak RSS of the tool process (os.wait4 through the launcher of
bench/upload_vs_rclone.py), Azurite's CPU, and the CPU the rest of the machine used meanwhile.

    .venv/bin/python bench/migrate_bench.py                                  # 100,000 files
    .venv/bin/python bench/migrate_bench.py --files 5000 --peer-files 2000 --out /tmp/migrate-quick

Results: bench/results/migrate.{json,md}; docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from azure.storage.blob import BlobServiceClient  # noqa: E402
from upload_vs_rclone import (  # noqa: E402
    ACCOUNT_KEY,
    ACCOUNT_NAME,
    AccountSasPermissions,
    ResourceTypes,
    generate_account_sas,
    machine_busy_s,
    process_cpu_s,
)

from tests.support.azurite import Azurite  # noqa: E402
from tests.support.mariadb import MariaDB  # noqa: E402
from tests.support.rusage import measure  # noqa: E402

MiB = 1024 * 1024


def make_library(root: Path, files: int, large: int, seed: int) -> dict[str, int]:
    """blob name -> size. Reused when a library of the same shape is already there."""
    marker = root / f".library-{files}-{large}-{seed}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(root, ignore_errors=True)
    (root / "video" / "thumbnails").mkdir(parents=True)
    (root / "audio").mkdir(parents=True)
    rng = random.Random(seed)
    sizes: dict[str, int] = {}

    def write(directory: Path, ext: str, data: bytes, name: str | None = None) -> str:
        name = name or f"{hashlib.sha256(data).hexdigest()}.{ext}"
        (directory / name).write_bytes(data)
        return name

    for i in range(files):
        data = rng.randbytes(rng.randint(4 * 1024, 64 * 1024))
        if i % 10 == 0:
            sizes[f"audio/{write(root / 'audio', 'mp3', data)}"] = len(data)
        else:
            name = write(root / "video", "mp4", data)
            sizes[f"video/{name}"] = len(data)
            if i % 50 == 1:
                thumb = rng.randbytes(2048)
                tname = write(root / "video" / "thumbnails", "png", thumb, name.replace(".mp4", ".png"))
                sizes[f"video/thumbnails/{tname}"] = len(thumb)
    for _ in range(large):
        h = hashlib.sha256()
        tmp = root / "video" / ".big.tmp"
        with open(tmp, "wb") as f:
            for _ in range(64):
                chunk = rng.randbytes(MiB)
                h.update(chunk)
                f.write(chunk)
        name = f"{h.hexdigest()}.mp4"
        tmp.rename(root / "video" / name)
        sizes[f"video/{name}"] = 64 * MiB
    old = time.time() - 86400
    for name in sizes:
        os.utime(root / name, (old, old))
    marker.write_text(json.dumps(sizes))
    return sizes


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def step(name: str, argv: list[str], env: dict[str, str], work: Path, azurite: Azurite) -> dict[str, object]:
    az0, busy0 = process_cpu_s(azurite.pid), machine_busy_s()
    u = measure(argv, env, work / f"{name}.log")
    az1, busy1 = process_cpu_s(azurite.pid), machine_busy_s()
    out = {
        "step": name,
        "exit": u.exit,
        "wall_s": round(u.wall, 2),
        "cpu_s": round(u.utime + u.stime, 2),
        "max_rss_mib": round(u.maxrss_kib / 1024, 1),
        "azurite_cpu_s": round(az1 - az0, 2),
        "other_cpu_s": round(max(0.0, (busy1 - busy0) - (az1 - az0) - (u.utime + u.stime)), 2),
    }
    print(json.dumps(out), flush=True)
    return out


def check(service: BlobServiceClient, container: str, expected: dict[str, int]) -> None:
    got = {b.name: b.size for b in service.get_container_client(container).list_blobs()}
    if got != expected:
        raise SystemExit(
            f"{container}: {len(got)} blobs, expected {len(expected)}; first differences: "
            f"{sorted(set(got) ^ set(expected))[:5]}"
        )


def make_subset(library: Path, dest: Path, sizes: dict[str, int], n: int) -> dict[str, int]:
    """Hard links to the first n files by name, so both tools read the very same inodes."""
    chosen = dict(sorted(sizes.items())[:n])
    for name in chosen:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(library / name, target)
    return chosen


def agent_config(
    path: Path, azurite: Azurite, db: MariaDB, container: str, library: Path, state: Path, concurrency: int
) -> Path:
    path.write_text(
        "\n".join(
            [
                "MEDIA_STORAGE_BACKEND=azure_blob",
                "AZURE_AUTH_MODE=connection_string",
                f'AZURE_STORAGE_CONNECTION_STRING="{azurite.connection_string}"',
                f"AZURE_STORAGE_CONTAINER_NAME={container}",
                f"MEDIA_ROOTS=audio={library / 'audio'},video={library / 'video'}",
                f"GIGHIVE_MEDIA_STATE_DIR={state}",
                f"MYSQL_HOST={db.host}",
                f"MYSQL_PORT={db.port}",
                f"MYSQL_DATABASE={db.database}",
                f"MYSQL_USER={db.user}",
                f"MYSQL_PASSWORD_FILE={db.password_file(path.parent / 'mysql-password')}",
                "UPLOAD_SETTLE_SECONDS=0",
                f"UPLOAD_FILE_CONCURRENCY={concurrency}",
            ]
        )
        + "\n"
    )
    path.chmod(0o600)
    return path


def measure_partial(run: Path, azurite_pid: int, pause_pid: int | None, reps: int, out: Path) -> int:
    """The dry runs against a migration still under way (see --measure-run)."""
    import signal
    import sqlite3

    class _Pid:  # what step() needs of an Azurite: its process id
        pid = azurite_pid

    snap = run / "snapshot"
    shutil.rmtree(snap, ignore_errors=True)
    (snap / "state").mkdir(parents=True)
    if pause_pid is not None:
        os.kill(pause_pid, signal.SIGSTOP)
    results: list[dict[str, object]] = []
    try:
        src = sqlite3.connect(f"file:{run / 'state' / 'state.sqlite3'}?mode=ro", uri=True)
        dst = sqlite3.connect(snap / "state" / "state.sqlite3")
        src.backup(dst)
        src.close()
        # The snapshot is the agent's state as it was, every row kept; the subset library holds
        # hard links (same inode, size and mtime) to the files it records as uploaded.
        uploaded = dst.execute("SELECT blob_name, path FROM files WHERE state = 'uploaded'").fetchall()
        rows = dst.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        dst.close()
        for name, path in uploaded:
            target = snap / "library" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        (snap / "library" / "audio").mkdir(parents=True, exist_ok=True)
        base = (run / "agent.env").read_text().splitlines()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "UPLOAD_"))}
        env.pop("JOURNAL_STREAM", None)
        exe = str(REPO / ".venv" / "bin" / "gighive-media")

        def config(name: str, roots: Path, state: Path) -> list[str]:
            lines = [
                line for line in base if not line.startswith(("MEDIA_ROOTS=", "GIGHIVE_MEDIA_STATE_DIR=", "MYSQL_"))
            ]
            lines += [
                f"MEDIA_ROOTS=audio={roots / 'audio'},video={roots / 'video'}",
                f"GIGHIVE_MEDIA_STATE_DIR={state}",
            ]
            path = snap / f"{name}.env"
            path.write_text("\n".join(lines) + "\n")
            path.chmod(0o600)
            return [exe, "--config", str(path), "--json", "migrate", "--dry-run"]

        media_roots = next(line for line in base if line.startswith("MEDIA_ROOTS=")).split("=", 1)[1]
        full_library = Path(dict(item.split("=", 1) for item in media_roots.split(","))["audio"]).parent
        trusted = config("trusted", snap / "library", snap / "state")
        lost = config("lost", snap / "library", snap / "state-lost")
        mid = config("mid", full_library, snap / "state")
        n = len(uploaded)
        for rep in range(reps):
            results.append(step(f"dry-run, {n:,} files all in Blob, state kept #{rep + 1}", trusted, env, snap, _Pid))
        for rep in range(reps):
            results.append(step(f"dry-run, {n:,} files all in Blob, state lost #{rep + 1}", lost, env, snap, _Pid))
        results.append(step("dry-run, whole library, migration under way", mid, env, snap, _Pid))
        for r in results:
            log = Path(snap / f"{r['step']}.log")
            with contextlib.suppress(OSError, ValueError):
                plan = json.loads(_last_json(log))
                r.update(
                    {k: plan.get(k) for k in ("vouched_by_state", "looked_up", "lookup", "blobs_listed")},
                    scan_s=plan.get("scan_seconds"),
                    lookup_s=plan.get("listing_seconds"),
                )
    finally:
        if pause_pid is not None:
            os.kill(pause_pid, signal.SIGCONT)
    summary = {
        "state_rows": rows,
        "uploaded": len(uploaded),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "load_at_start": list(os.getloadavg()),
        },
        "steps": results,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# migrate --dry-run against a migration under way: {len(uploaded):,} files uploaded, {rows:,} state rows",
        "",
        f"machine: {os.cpu_count()} CPUs ({cpu_model()}), load average {summary['machine']['load_at_start'][0]:.2f}",
        "",
        "| step | wall s | CPU s | peak RSS MiB | Azurite CPU s | other CPU s | vouched | looked up | lookup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *(
            f"| {r['step']} | {r['wall_s']} | {r['cpu_s']} | {r['max_rss_mib']} | {r['azurite_cpu_s']} | "
            f"{r['other_cpu_s']} | {r.get('vouched_by_state')} | {r.get('looked_up')} | {r.get('lookup')} |"
            for r in results
        ),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def plan_cost(library: Path, work: Path, reps: int) -> list[dict[str, float]]:
    """The dry run's own work at full scale when the state vouches for every file, in process:
    the walk of `library`, the state read and the plan, with a state that records every file as
    uploaded and verified (written here: rows as the agent writes them, made-up ETags and hashes)
    and the container lookups stubbed out (with such a state they are the 16 HEADs of the trust
    sample, measured end to end by --measure-run). CPU and wall seconds, and peak RSS."""
    import resource
    import sqlite3

    from agent.actions import migrate
    from agent.config import MediaRoot
    from agent.scan import ScanReport
    from agent.state import StateStore

    roots = (MediaRoot("audio", library / "audio", True), MediaRoot("video", library / "video", True))
    state_dir = work / "plan-cost-state"
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    StateStore.open(state_dir).close()
    now = time.time()
    # A generator: the rows go to SQLite as they are made, so this process's peak RSS is the plan's.
    rows = (
        (mf.blob_name, mf.root.name, str(mf.path), st.st_size, st.st_mtime_ns, st.st_ino, "0" * 64, "0" * 32,
         "uploaded", '"0x8DD0000000000000"', now, now, now, now)
        for mf, st in migrate._walk(roots, ScanReport())
    )  # fmt: skip
    db = sqlite3.connect(state_dir / "state.sqlite3")
    with db:
        db.executemany(
            "INSERT INTO files (blob_name, root, path, size, mtime_ns, inode, sha256, md5, state, etag, "
            "uploaded_at, verified_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
    db.close()
    del rows

    class Config:
        state_dir: Path
        file_concurrency = 8
        bandwidth_limit = 0

    Config.state_dir = state_dir
    migrate.AzureBlobStore = lambda config: None  # type: ignore[assignment,misc]
    migrate._sample_problem = lambda *a: None  # type: ignore[assignment]
    migrate._probe = lambda store, names, parallel: {}  # type: ignore[assignment]
    out = []
    # What this process held before the first plan (the bench's own imports, the library's
    # sizes): the plan's peak is the difference.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(reps):
        w0, c0 = time.monotonic(), time.process_time()
        plan = migrate.plan(Config, roots, migrate.Options(dry_run=True))  # type: ignore[arg-type]
        out.append(
            {
                "files": plan["total"]["files"],  # type: ignore[index]
                "vouched_by_state": plan["vouched_by_state"],
                "wall_s": round(time.monotonic() - w0, 2),
                "cpu_s": round(time.process_time() - c0, 2),
                "scan_s": plan["scan_seconds"],
                "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "rss_before_mib": round(before, 1),
                "load": round(os.getloadavg()[0], 2),
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def _last_json(log: Path) -> str:
    """The JSON document a `--json` command printed (stdout and stderr share the log)."""
    lines = log.read_text().splitlines()
    start = lines.index("{")
    end = len(lines) - lines[::-1].index("}")
    return "\n".join(lines[start:end])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--large", type=int, default=3, help="64 MiB videos added to the library")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--peer-files", type=int, default=20_000, help="files in the side-by-side subset")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gighive-migrate-bench")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "migrate")
    ap.add_argument("--dry-run-reps", type=int, default=1, help="times each full-container dry run is measured")
    ap.add_argument("--no-peer", action="store_true", help="skip the side-by-side with rclone on the subset")
    ap.add_argument(
        "--hold-after-migrate",
        type=Path,
        metavar="PATH",
        help="after the whole-library migration, wait until PATH exists before the dry runs (to measure a "
        "changed agent against the same populated container without another hour of uploads)",
    )
    ap.add_argument(
        "--measure-run",
        type=Path,
        metavar="RUN_DIR",
        help="instead of a new run: the dry runs against the run directory of a whole-library migration still "
        "under way (a snapshot of its state, a library of hard links to the files it uploaded, its Azurite)",
    )
    ap.add_argument("--azurite-pid", type=int, help="with --measure-run: that run's Azurite (for its CPU time)")
    ap.add_argument(
        "--pause-pid", type=int, help="with --measure-run: the migration's process, stopped while the dry runs run"
    )
    ap.add_argument(
        "--plan-cost",
        action="store_true",
        help="instead of a run: the dry run's own work on the --files library with a state vouching for every "
        "file, in process (see plan_cost)",
    )
    args = ap.parse_args()
    if args.plan_cost:
        sizes = make_library(args.work / "library", args.files, args.large, args.seed)
        print(f"library: {len(sizes)} files", flush=True)
        cost = plan_cost(args.work / "library", args.work, args.dry_run_reps)
        args.out.with_suffix(".json").write_text(json.dumps({"plan_cost": cost}, indent=2) + "\n")
        return 0
    if args.measure_run is not None:
        return measure_partial(args.measure_run, args.azurite_pid, args.pause_pid, args.dry_run_reps, args.out)

    load_at_start = os.getloadavg()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    library = work / "library"
    sizes = make_library(library, args.files, args.large, args.seed)
    print(
        f"library: {len(sizes)} files, {sum(sizes.values()) / MiB:.0f} MiB ({time.monotonic() - t:.0f} s)", flush=True
    )
    run = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    azurite = Azurite(run / "azurite", in_memory=True).start()
    db = MariaDB(run / "mariadb").start()
    results: list[dict[str, object]] = []
    try:
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        for c in ("agent", "agent-subset", "rclone-subset"):
            service.create_container(c)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "UPLOAD_"))}
        env.pop("JOURNAL_STREAM", None)
        exe = str(REPO / ".venv" / "bin" / "gighive-media")
        full = agent_config(run / "agent.env", azurite, db, "agent", library, run / "state", args.concurrency)
        agent = [exe, "--config", str(full)]
        subprocess.run([*agent, "db-migrate"], env=env, check=True, capture_output=True)

        sas = generate_account_sas(
            ACCOUNT_NAME,
            ACCOUNT_KEY,
            ResourceTypes(service=True, container=True, object=True),
            AccountSasPermissions(read=True, write=True, delete=True, list=True, add=True, create=True),
            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
        )
        renv = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        # rclone 1.60 cannot reach Azurite on a random port with account + key; an account SAS URL can.
        renv["RCLONE_AZUREBLOB_SAS_URL"] = f"{azurite.blob_endpoint}?{sas}"
        (run / "rclone.conf").write_text("")
        renv["RCLONE_CONFIG"] = str(run / "rclone.conf")
        rclone = shutil.which("rclone") or "rclone"

        def add(name: str, argv: list[str], e: dict[str, str]) -> None:
            results.append(step(name, argv, e, run, azurite))
            if results[-1]["exit"] != 0:
                raise SystemExit(f"step {name} exited with {results[-1]['exit']}; see {run}")

        add("dry-run (empty container)", [*agent, "--json", "migrate", "--dry-run"], env)
        add("agent migrate (whole library)", [*agent, "--json", "migrate", "--no-progress"], env)
        check(service, "agent", sizes)
        if args.hold_after_migrate is not None:
            print(f"holding until {args.hold_after_migrate} exists", flush=True)
            while not args.hold_after_migrate.exists():
                time.sleep(5)
        for rep in range(args.dry_run_reps):
            tag = f" #{rep + 1}" if args.dry_run_reps > 1 else ""
            add(f"dry-run (every file in Blob){tag}", [*agent, "--json", "migrate", "--dry-run"], env)
        # The same dry run when the agent's state is lost or rebuilt (here: a new, empty state
        # directory): it cannot trust anything it did not see, so it lists the container.
        lost = agent_config(run / "agent-lost.env", azurite, db, "agent", library, run / "state-lost", args.concurrency)
        for rep in range(args.dry_run_reps):
            tag = f" #{rep + 1}" if args.dry_run_reps > 1 else ""
            add(
                f"dry-run (every file in Blob, state lost){tag}",
                [exe, "--config", str(lost), "--json", "migrate", "--dry-run"],
                env,
            )
        add(
            "rclone lsf -R of that container (listing peer)",
            [rclone, "lsf", "-R", "--files-only", ":azureblob:agent"],
            renv,
        )
        add("agent migrate again (nothing to do)", [*agent, "--json", "migrate", "--no-progress"], env)
        add("verify --all", [*agent, "--json", "verify", "--all", "--no-progress"], env)

        if not args.no_peer:
            subset = make_subset(library, run / "subset", sizes, args.peer_files)
            sub = agent_config(
                run / "agent-subset.env",
                azurite,
                db,
                "agent-subset",
                run / "subset",
                run / "state-subset",
                args.concurrency,
            )
            add("side by side: agent migrate", [exe, "--config", str(sub), "--json", "migrate", "--no-progress"], env)
            check(service, "agent-subset", subset)
            add(
                "side by side: rclone copy",
                [
                    rclone,
                    "copy",
                    str(run / "subset"),
                    ":azureblob:rclone-subset",
                    "--transfers",
                    str(args.concurrency),
                    "--checkers",
                    str(args.concurrency),
                ],
                renv,
            )
            check(service, "rclone-subset", subset)
    finally:
        azurite.stop()
        db.stop()

    total = sum(sizes.values())
    by = {r["step"]: r for r in results}
    full_s = float(by["agent migrate (whole library)"]["wall_s"])  # type: ignore[arg-type]
    summary: dict[str, object] = {
        "files": len(sizes),
        "bytes": total,
        "concurrency": args.concurrency,
        "whole_library_agent_files_per_s": round(len(sizes) / full_s, 1),
        "whole_library_agent_mb_per_s": round(total / 1e6 / full_s, 2),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "load_at_start": list(load_at_start),
        },
        "steps": results,
    }
    peer_lines: list[str] = []
    if not args.no_peer:
        agent_s = float(by["side by side: agent migrate"]["wall_s"])  # type: ignore[arg-type]
        rclone_s = float(by["side by side: rclone copy"]["wall_s"])  # type: ignore[arg-type]
        sub_n, sub_bytes = len(subset), sum(subset.values())
        summary.update(
            subset_files=sub_n,
            subset_bytes=sub_bytes,
            agent_files_per_s=round(sub_n / agent_s, 1),
            rclone_files_per_s=round(sub_n / rclone_s, 1),
            agent_mb_per_s=round(sub_bytes / 1e6 / agent_s, 2),
            rclone_mb_per_s=round(sub_bytes / 1e6 / rclone_s, 2),
            files_per_s_ratio_agent_over_rclone=round(rclone_s / agent_s, 2),
        )
        peer_lines = [
            "",
            f"side by side on {sub_n:,} files ({sub_bytes / MiB:,.0f} MiB): agent {summary['agent_files_per_s']} "
            f"files/s ({summary['agent_mb_per_s']} MB/s), rclone {summary['rclone_files_per_s']} files/s "
            f"({summary['rclone_mb_per_s']} MB/s): agent/rclone files per second = "
            f"{summary['files_per_s_ratio_agent_over_rclone']}",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# migrate benchmark: {len(sizes):,} files, {total / MiB:,.0f} MiB, concurrency {args.concurrency}",
        "",
        f"machine: {os.cpu_count()} CPUs ({cpu_model()}), load average at start {load_at_start[0]:.2f}, "
        f"Python {platform.python_version()}",
        "",
        "| step | wall s | CPU s | peak RSS MiB | Azurite CPU s | other CPU s |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r['step']} | {r['wall_s']} | {r['cpu_s']} | {r['max_rss_mib']} | {r['azurite_cpu_s']} | "
            f"{r['other_cpu_s']} |"
            for r in results
        ),
        "",
        f"whole library: agent {summary['whole_library_agent_files_per_s']} files/s "
        f"({summary['whole_library_agent_mb_per_s']} MB/s)",
        *peer_lines,
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
