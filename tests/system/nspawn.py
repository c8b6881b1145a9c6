"""A Debian 12 system booted with systemd-nspawn, driven from the host with nsenter.

The root filesystem comes from the tarball that .ci/setup-system caches; every Container gets its
own fresh copy, so tests never see each other's state. The container shares the host's network
(no --private-network), so services inside reach Azurite or MariaDB on the host's 127.0.0.1.

It boots with the unified cgroup hierarchy and the bpf() system call allowed, so that
IPAddressDeny=/IPAddressAllow= are really enforced inside, as on an Ubuntu 24.04 host.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

# A clean environment for commands inside: the host's PATH (pyenv shims, a venv) means nothing there.
INSIDE_ENV = [
    "env",
    "-i",
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "SYSTEMD_PAGER=",
    "SYSTEMD_COLORS=0",
]


class ContainerError(RuntimeError):
    pass


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll predicate until it returns something truthy; return that, or raise after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Container:
    """One booted container. Use as a context manager: it is powered off and deleted on exit."""

    def __init__(self, rootfs_tarball: Path, workdir: Path, name: str | None = None):
        self.tarball = rootfs_tarball
        self.workdir = workdir
        self.root = workdir / "rootfs"
        self.log_path = workdir / "console.log"
        self.name = name or f"gighive-{uuid.uuid4().hex[:8]}"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._log = None
        self.leader: int | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.poweroff()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.poweroff()

    def boot(self, timeout: float = 300.0) -> None:
        self.root.mkdir(parents=True)
        subprocess.run(["tar", "--zstd", "-C", str(self.root), "--numeric-owner", "-xf", str(self.tarball)], check=True)
        env = dict(os.environ)
        # Real IP firewalling inside (IPAddressDeny=) needs cgroup v2 and the bpf() call.
        env.setdefault("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
        cmd = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--system-call-filter=bpf",
            "--console=read-only",
            f"--machine={self.name}",
            "-D",
            str(self.root),
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in poweroff()
        self._nspawn = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.leader = wait_for(self._find_leader, timeout=120, what="the container's init process")
        # "offline" until PID 1 answers on its private socket, then "initializing"/"starting".
        last: list[str] = []

        def booted() -> bool:
            last[:] = [self._system_state()]
            return last[0] in ("running", "degraded")

        try:
            wait_for(booted, timeout=timeout, interval=0.5, what="systemd inside to finish booting")
        except TimeoutError:
            raise ContainerError(f"container did not boot (state {last[0]!r})\n{self.console_tail()}") from None

    def _find_leader(self) -> int | None:
        assert self._nspawn is not None
        if self._nspawn.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with status {self._nspawn.returncode}\n{self.console_tail()}")
        children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
        # Until it execs systemd, nspawn's child is a helper in other namespaces: wait for init.
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        return None

    def _system_state(self) -> str:
        if self._nspawn is None or self._nspawn.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited while booting\n{self.console_tail()}")
        return self.run(["systemctl", "is-system-running"], check=False, timeout=10).stdout.strip()

    def poweroff(self, timeout: float = 30.0) -> None:
        proc = self._nspawn
        if proc is not None and proc.poll() is None:
            # SIGTERM makes nspawn ask init for a clean poweroff (SIGRTMIN+3).
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._nspawn = None
        self.leader = None
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "--- container console (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    # --- running things inside -----------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 120.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container (all its namespaces), as root, with a clean environment."""
        if self.leader is None:
            raise ContainerError("container is not running")
        cmd = ["nsenter", "-t", str(self.leader), "-a", *INSIDE_ENV, *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise ContainerError(
                f"inside the container, {shlex.join(argv)} exited {r.returncode}\n"
                f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
            )
        return r

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-ec", script], **kw)

    def path(self, inside: str) -> Path:
        """The host path of a file inside the container (not under /tmp or /run: nspawn mounts those)."""
        assert inside.startswith("/") and not inside.startswith(("/tmp/", "/run/")), inside  # noqa: S108
        return self.root / inside.lstrip("/")

    def write(self, inside: str, content: str | bytes, mode: int = 0o644, owner: str = "root:root") -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        target.write_bytes(data)
        self.run(["chown", owner, inside])
        self.run(["chmod", f"{mode:o}", inside])

    # --- systemd helpers -----------------------------------------------------------------------
    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.systemctl("show", unit, *(f"--property={p}" for p in props))
        out: dict[str, str] = {}
        for line in r.stdout.splitlines():
            key, _, value = line.partition("=")
            out[key] = value
        return out

    def journal(self, unit: str, *extra: str) -> str:
        return self.run(["journalctl", "--no-pager", "-u", unit, *extra], check=False).stdout

    def wait_inactive(self, unit: str, timeout: float = 300.0) -> dict[str, str]:
        """Wait until unit is no longer starting or running; return its state properties."""
        props = ("ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts", "ConditionResult")

        def settled() -> dict[str, str] | None:
            p = self.show(unit, *props)
            return p if p["ActiveState"] in ("inactive", "failed") else None

        return wait_for(settled, timeout=timeout, what=f"{unit} to stop")
