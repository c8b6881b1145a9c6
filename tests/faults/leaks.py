"""Looking for secret values wherever an agent process could leave them: its output (the same
records journald would get: stderr carries every field as key=value), the argv and environment of
the process and of everything it spawns (read from /proc while it runs), and the files it wrote.

The scanner only reports; tests/faults/test_security.py proves it finds a planted secret in
every one of those places before trusting it to find none in the agent's.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


def forms(value: str) -> list[bytes]:
    """The shapes a leaked secret may take: as is, URL-encoded, and its first 16 characters (a
    message truncated mid-secret is still a leak)."""
    out = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    if len(value) > 16:
        out.add(value[:16])
    return [v.encode() for v in out if v]


def find(secrets: Mapping[str, str], data: bytes | str, where: str) -> list[str]:
    blob = data.encode("utf-8", "replace") if isinstance(data, str) else data
    hits = []
    for name, value in secrets.items():
        if any(f in blob for f in forms(value)):
            hits.append(f"{name} in {where}")
    return hits


def children(pid: int) -> list[int]:
    """Every live descendant of pid (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; ppid is the 2nd field after the last ')'.
        parents[int(entry)] = int(text.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


@dataclass
class Watched:
    """What one command exposed: output, and every argv and environment seen while it ran."""

    name: str
    returncode: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    argvs: dict[int, bytes] = field(default_factory=dict)
    environs: dict[int, bytes] = field(default_factory=dict)
    samples: int = 0

    def leaks(self, secrets: Mapping[str, str]) -> list[str]:
        hits = find(secrets, self.stdout, f"{self.name} stdout") + find(secrets, self.stderr, f"{self.name} stderr")
        for pid, argv in self.argvs.items():
            hits += find(secrets, argv, f"{self.name} argv of pid {pid} ({argv[:60]!r})")
        for pid, env in self.environs.items():
            hits += find(secrets, env, f"{self.name} environment of pid {pid} ({self.argvs.get(pid, b'')[:60]!r})")
        return hits


def _sample(pid: int, into: Watched) -> None:
    for p in [pid, *children(pid)]:
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes()
            env = Path(f"/proc/{p}/environ").read_bytes()
        except OSError:
            continue  # already gone
        # Every distinct view of each process (an exec replaces argv and environment).
        for seen, value in ((into.argvs, argv), (into.environs, env)):
            if value not in seen.get(p, b""):
                seen[p] = seen.get(p, b"") + b"\n" + value


def run_watched(
    name: str,
    argv: list[str],
    env: dict[str, str],
    workdir: Path,
    during: Callable[[subprocess.Popen], None] | None = None,
    timeout: float = 300,
    on_sample: Callable[[Watched], None] | None = None,
) -> Watched:
    """Run argv with output to files, sampling /proc for it and its children until it exits.
    `during` runs while the process is alive (e.g. send requests, then stop it); `on_sample` after
    every sample, in the sampling thread (e.g. to tell a process it has been seen)."""
    watched = Watched(name)
    out_path, err_path = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and proc.poll() is None:
            _sample(proc.pid, watched)
            watched.samples += 1
            if on_sample is not None:
                on_sample(watched)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        if during is not None:
            during(proc)
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        done.set()
        watcher.join(10)
    watched.returncode = proc.returncode
    watched.stdout, watched.stderr = out_path.read_bytes(), err_path.read_bytes()
    return watched


def file_leaks(secrets: Mapping[str, str], roots: Iterable[Path], skip: Iterable[Path] = ()) -> list[str]:
    """Secrets in any regular file under roots (any mode; world-readable ones are named so)."""
    skipped = {Path(p).resolve() for p in skip}
    hits = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                path = Path(dirpath) / f
                if path.resolve() in skipped:
                    continue
                try:
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    data = path.read_bytes()
                except OSError:
                    continue
                readable = " (world-readable)" if st.st_mode & stat.S_IROTH else ""
                hits += find(secrets, data, f"file {path}{readable}")
    return hits


def world_readable(roots: Iterable[Path]) -> list[Path]:
    out = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                try:
                    if os.lstat(p).st_mode & stat.S_IROTH:
                        out.append(p)
                except OSError:
                    pass
    return out
