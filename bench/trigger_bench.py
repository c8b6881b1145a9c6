#!/usr/bin/env python3
"""Trigger latency under real systemd: a file renamed into a media root -> blob verified -> DB pointer.

Everything runs as a user runs it: the .deb installed in a Debian 12 container booted with
systemd-nspawn (tests/system/nspawn.py), the path unit watching /srv/gighive/video, the upload
service uploading to Azurite on the host's loopback and writing its pointer row to MariaDB on
the host. The host lands a file the way GigHive's finalize does (written under a staging name on
the same filesystem, then renamed into the root) and takes the time just after the rename; then:

- verified: the journal timestamp of the agent's "uploaded and verified" entry for that blob
  (written after the Put, the Get Block List/HEAD checks, and the state record);
- pointer: when the host first sees the pointer row in MariaDB (polled every 10 ms).

The container shares the host's clock, so the three times compare directly. Cases, per size:

- cold: the service is inactive; the path unit starts it (process start, imports, scan included);
- warm: the service is already running and watching (the next file of a batch);
- in place (1 MiB only): written under its final name, as a copy or a zip import does; the time
  starts when the writer closes it.

Variants, interleaved per repetition in one container: the agent tree of --before (a git
revision, default `main`) and this working tree, each copied over the installed package's
`agent/` package, so the service, its units and its venv are the package's own and only the
agent's code differs. Settings are the package defaults (UPLOAD_SETTLE_SECONDS=5) except
UPLOAD_IDLE_EXIT_SECONDS (6 s, to keep the run short).

    sudo .venv/bin/python bench/trigger_bench.py --reps 3
    sudo .venv/bin/python bench/trigger_bench.py --deb /path/gighive-media-agent_*.deb --before HEAD~3

Results: bench/results/trigger.{json,md}; docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from azure.storage.blob import BlobServiceClient  # noqa: E402

from agent.pointer import TABLE  # noqa: E402
from tests.support.azurite import Azurite  # noqa: E402
from tests.support.mariadb import MariaDB  # noqa: E402
from tests.system.conftest import ENV_FILE, ROOTFS_TARBALL, _cannot_boot_reason, agent_cli, install_deb  # noqa: E402
from tests.system.debbuild import Build, build_deb  # noqa: E402
from tests.system.nspawn import Container, wait_for  # noqa: E402

SERVICE = "gighive-media-upload.service"
PATH_UNIT = "gighive-media-upload.path"
ROOT = "/srv/gighive/video"
STAGING = "/srv/gighive/staging"
SITE = "/opt/venvs/gighive-media-agent/lib/python3.11/site-packages"
IDLE_EXIT = 6
MIB = 1024 * 1024


def machine() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python_host": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def agent_tree(rev: str | None, dest: Path) -> Path:
    """The agent/ package of a git revision (None: this working tree)."""
    if rev is None:
        return REPO / "agent"
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "agent"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "agent"


def commit_of(rev: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True, check=True
    ).stdout.strip()


class Bench:
    def __init__(self, c: Container, az: Azurite, db: MariaDB, container_name: str) -> None:
        self.c, self.az, self.db, self.container_name = c, az, db, container_name
        self.seq = 0

    # ---- setup --------------------------------------------------------------------------------
    def configure(self) -> None:
        c = self.c
        for d in (ROOT, STAGING, "/etc/gighive-media-agent", "/etc/credstore"):
            c.run(["install", "-d", "-m", "0755", d])
        env = {
            "MEDIA_STORAGE_BACKEND": "azure_blob",
            "MEDIA_ROOTS": f"video={ROOT}",
            "LOG_LEVEL": "info",
            "AZURE_AUTH_MODE": "connection_string",
            "AZURE_STORAGE_CONTAINER_NAME": self.container_name,
            "UPLOAD_IDLE_EXIT_SECONDS": str(IDLE_EXIT),
            "MYSQL_HOST": "127.0.0.1",
            "MYSQL_PORT": str(self.db.port),
            "MYSQL_DATABASE": self.db.database,
            "MYSQL_USER": self.db.user,
        }
        c.write(ENV_FILE, "".join(f"{k}={v}\n" for k, v in env.items()), mode=0o640, owner="root:gighive-media")
        c.run(["chmod", "0700", "/etc/credstore"])
        secrets = {"azure-storage-connection-string": self.az.connection_string, "mysql-password": self.db.password}
        for name, secret in secrets.items():
            c.write(f"/etc/credstore/gighive-media-agent.{name}", secret, mode=0o600)
        c.write("/etc/systemd/system/gighive-media-upload.path.d/roots.conf", f"[Path]\nPathChanged={ROOT}\n")
        c.systemctl("daemon-reload")
        agent_cli(c, "db-migrate")
        c.systemctl("enable", "--now", PATH_UNIT)

    def use_agent(self, tree: Path) -> None:
        """Put this agent package in the installed venv (the service is inactive now)."""
        target = self.c.path(f"{SITE}/agent")
        shutil.rmtree(target)
        shutil.copytree(tree, target, ignore=shutil.ignore_patterns("__pycache__"))

    # ---- one file -----------------------------------------------------------------------------
    def _data(self, size: int) -> bytes:
        self.seq += 1
        head = f"trigger-bench {time.time_ns()} {self.seq}\n".encode()
        return head + os.urandom(size - len(head))

    def _write(self, path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            for i in range(0, len(data), MIB):
                f.write(data[i : i + MIB])
        os.chmod(path, 0o644)

    def land(self, size: int, how: str) -> tuple[str, float, float]:
        """Land a file; returns its blob name and the time (wall, monotonic) it became complete in the root."""
        data = self._data(size)
        name = f"{hashlib.sha256(data).hexdigest()}.mp4"
        final = self.c.path(f"{ROOT}/{name}")
        if how == "rename":
            staged = self.c.path(f"{STAGING}/{name}")
            self._write(staged, data)
            os.rename(staged, final)
        else:
            self._write(final, data)
        return f"video/{name}", time.time(), time.monotonic()

    def pointer_seen(self, blob: str, t0: float, limit: float = 180.0) -> float:
        conn = self.db.connect()
        try:
            while True:
                with conn.cursor() as cur:
                    cur.execute(f"SELECT provider FROM `{TABLE}` WHERE media_path = %s", (blob,))  # noqa: S608
                    row = cur.fetchone()
                conn.commit()  # a fresh snapshot for the next read (REPEATABLE READ)
                if row and row[0] == "azure_blob":
                    return time.time()
                if time.time() - t0 > limit:
                    raise TimeoutError(f"no pointer for {blob} after {limit:g} s\n{self.c.journal(SERVICE)[-3000:]}")
                time.sleep(0.01)
        finally:
            conn.close()

    def verified_at(self, blob: str) -> tuple[float, float]:
        """The journal's own timestamp of the entry (journald may store it a moment after the
        pointer), and the transfer's own duration it reports (read, hash, Put, verify)."""

        def find() -> tuple[float, float] | None:
            fields = "--output-fields=BLOB_NAME,MESSAGE,DURATION_S"
            for line in self.c.journal(SERVICE, "-o", "json", fields).splitlines():
                entry = json.loads(line)
                if entry.get("BLOB_NAME") == blob and "uploaded and verified" in str(entry.get("MESSAGE", "")):
                    return int(entry["__REALTIME_TIMESTAMP"]) / 1e6, float(entry.get("DURATION_S", "nan"))
            return None

        return wait_for(find, timeout=30, interval=0.2, what=f"the journal entry of {blob}")

    def invocation(self) -> str:
        return self.c.show(SERVICE, "InvocationID")["InvocationID"]

    def wait_idle(self) -> None:
        # Then the path unit is back to waiting, and the next file starts the service afresh.
        wait_for(
            lambda: self.c.show(SERVICE, "ActiveState")["ActiveState"] in ("inactive", "failed"),
            timeout=120,
            interval=0.1,
            what="the upload service to exit",
        )
        state = self.c.show(SERVICE, "Result")["Result"]
        if state != "success":
            raise RuntimeError(f"upload run ended with {state}\n{self.c.journal(SERVICE)[-3000:]}")

    def measure(self, size: int, how: str, warm: bool) -> dict[str, object]:
        before = self.invocation() if warm else None
        blob, t0, t0_mono = self.land(size, how)
        t_pointer = self.pointer_seen(blob, t0)
        t_verified, transfer_s = self.verified_at(blob)
        # A warm file must have been taken by the run that was already watching.
        same_run = (self.invocation() == before) if warm else None
        got: dict[str, object] = {
            "verified_s": round(t_verified - t0, 3),
            "pointer_s": round(t_pointer - t0, 3),
            "transfer_s": transfer_s,
            "same_run": same_run,
        }
        if not warm:
            # The container shares the host's CLOCK_MONOTONIC (no time namespace): when systemd
            # started the service's process, from the file's arrival.
            started = int(self.c.show(SERVICE, "ExecMainStartTimestampMonotonic")["ExecMainStartTimestampMonotonic"])
            process_started = started / 1e6 - t0_mono
            got["process_started_s"] = round(process_started, 3)
            # What is left is the run's start: interpreter, imports, state, clients, scan.
            got["agent_start_s"] = round(t_verified - t0 - process_started - transfer_s, 3)
        return got


def summarize(samples: list[dict[str, object]]) -> dict[str, object]:
    pointer = [float(s["pointer_s"]) for s in samples]
    verified = [float(s["verified_s"]) for s in samples]
    return {
        "n": len(samples),
        "pointer_median_s": round(statistics.median(pointer), 2),
        "pointer_min_s": round(min(pointer), 2),
        "pointer_max_s": round(max(pointer), 2),
        "verified_median_s": round(statistics.median(verified), 2),
        "transfer_median_s": round(statistics.median(float(s["transfer_s"]) for s in samples), 2),
        **(
            {
                "process_started_median_s": round(statistics.median(float(s["process_started_s"]) for s in samples), 2),
                "agent_start_median_s": round(statistics.median(float(s["agent_start_s"]) for s in samples), 2),
            }
            if all("process_started_s" in s for s in samples)
            else {}
        ),
    }


def render(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Trigger latency: file renamed into a media root -> blob verified -> DB pointer",
        "",
        f"{report['date']}, {m['cpus']} CPUs ({m['cpu_model']}), {m['memory']} RAM, kernel {m['kernel']}; "
        f"load average {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} at start and "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_end'])} at the end (a machine shared with "
        f"other work). Package {report['deb']}, Debian 12 container under systemd-nspawn; "
        f"Azurite and MariaDB on the host's loopback. UPLOAD_SETTLE_SECONDS=5 (default), "
        f"UPLOAD_IDLE_EXIT_SECONDS={IDLE_EXIT}. {report['reps']} repetitions, variants interleaved.",
        "",
        f"- before: agent/ of {report['before']}",
        f"- after: agent/ of this tree ({report['after']})",
        "",
        "| case | size | variant | pointer written, median s (min-max) | blob verified, median s "
        "| of which, median s: service process started / run's start and settle wait / transfer "
        "| after / before |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, row in report["summary"].items():
        case, size = key.split(" | ")
        for variant in ("before", "after"):
            s = row.get(variant)
            if not s:
                continue
            ratio = ""
            if variant == "after" and row.get("before"):
                ratio = f"**{s['pointer_median_s'] / row['before']['pointer_median_s']:.2f} x**"
            lines.append(
                f"| {case} | {size} | {variant} | {s['pointer_median_s']:.2f} ({s['pointer_min_s']:.2f}-"
                f"{s['pointer_max_s']:.2f}) | {s['verified_median_s']:.2f} | "
                f"{s.get('process_started_median_s', '-')} / {s.get('agent_start_median_s', '-')} / "
                f"{s['transfer_median_s']} | {ratio} |"
            )
    lines += [
        "",
        "Times are from the moment the file is complete in the root (just after the rename, or the "
        "writer's close for in place). The split is for cold runs only: when systemd started the "
        "service's process, then what the run spent before its transfer began (interpreter, imports, "
        "state, clients, scan, and any settle wait), then the transfer the agent logs (read, hash, Put, "
        "verify). The pointer follows the verified blob by milliseconds.",
        "",
        f"Raw samples: {report['json_name']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--before", default="main", help="git revision whose agent/ is the 'before' variant")
    ap.add_argument("--deb", type=Path, help="install this package (default: build one from this tree)")
    ap.add_argument("--sizes", default="1,100", help="file sizes in MiB, comma-separated")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "trigger")
    args = ap.parse_args()
    reason = _cannot_boot_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    r = subprocess.run(["bash", str(REPO / ".ci" / "setup-system")], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f".ci/setup-system failed:\n{r.stdout}\n{r.stderr}")
    sizes = [int(s) for s in args.sizes.split(",")]
    machine_at_start = machine()
    work = Path(tempfile.mkdtemp(prefix="trigger-bench-", dir="/var/tmp"))
    try:
        deb = Build(args.deb, args.deb, args.deb, 0.0) if args.deb else build_deb(work / "deb")
        trees = {"before": agent_tree(args.before, work / "before"), "after": agent_tree(None, work)}
        samples: dict[str, dict[str, list[dict[str, object]]]] = {}
        with Azurite(work / "azurite") as az, MariaDB(work / "mariadb") as db:
            db.reset_database()
            name = "trigger-bench"
            BlobServiceClient.from_connection_string(az.connection_string).create_container(name)
            with Container(ROOTFS_TARBALL, work / "container") as c:
                install_deb(c, deb)
                bench = Bench(c, az, db, name)
                bench.configure()
                for rep in range(args.reps):
                    for variant in ("before", "after"):
                        bench.wait_idle()
                        bench.use_agent(trees[variant])
                        for size in sizes:
                            cases = [("cold", "rename", False), ("warm", "rename", True)]
                            if size == 1:
                                cases.append(("in place, cold", "in-place", False))
                            for case, how, warm in cases:
                                if not warm:
                                    bench.wait_idle()
                                got = bench.measure(size * MIB, how, warm)
                                key = f"{case} | {size} MiB"
                                samples.setdefault(key, {}).setdefault(variant, []).append(got)
                                print(f"rep {rep + 1} {variant:6} {key:22} {got}", flush=True)
        report = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {**machine_at_start, "load_average_at_end": os.getloadavg()},
            "deb": deb.deb.name,
            "before": f"{args.before} ({commit_of(args.before)})",
            "after": f"{commit_of('HEAD')} + working tree",
            "reps": args.reps,
            "idle_exit_s": IDLE_EXIT,
            "samples": samples,
            "summary": {k: {v: summarize(s) for v, s in per.items()} for k, per in samples.items()},
            "json_name": args.out.name + ".json",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(render(report))
        print(render(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
