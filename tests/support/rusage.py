"""Peak memory and CPU of one child process, measured so that nothing else is counted.

On Linux a child's ru_maxrss starts from the RSS of the process that forked it (exec keeps the
old mm's high-water mark in signal->maxrss), and subprocess uses vfork, so a tool started straight
from a big process (pytest after a few hundred tests, a benchmark holding its data) would report at
least that process's own peak; RUSAGE_CHILDREN is worse, the maximum over every child ever waited
for (Azurite, MariaDB...). A small launcher (python -I -S, ~10 MiB) forks the tool instead, waits
for it with os.wait4 and reports that child's rusage; the floor is then the launcher's ~10 MiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_LAUNCHER = r"""
import json, os, sys, time
argv, log = json.loads(sys.argv[1]), sys.argv[2]
out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
null = os.open(os.devnull, os.O_RDONLY)
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.dup2(null, 0); os.dup2(out, 1); os.dup2(out, 2)
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.monotonic() - t0
print(json.dumps({"wall": wall, "utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss_kib": ru.ru_maxrss,
                  "exit": os.waitstatus_to_exitcode(status)}))
"""


@dataclass
class Usage:
    wall: float
    utime: float
    stime: float
    maxrss_kib: int
    exit: int


def measure(argv: list[str], env: dict[str, str], log_path: Path, timeout: float | None = None) -> Usage:
    """Run argv through the launcher (output to log_path); wall time, CPU and peak RSS of that child alone."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(argv), str(log_path)],
        env=env,
        stdout=subprocess.PIPE,
        check=True,
        timeout=timeout,
    )
    return Usage(**json.loads(done.stdout))
