"""Azurite (blob service only) as a child process that can be stopped, killed and restarted on the
same port, so tests can model "Azure is down, then back"."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import NoReturn

from . import _proc
from .strict_gate import StrictGate

ACCOUNT_NAME = "devstoreaccount1"
# The emulator's published, well-known development key (not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_LISTEN_RE = re.compile(r"successfully listens on (https?)://127\.0\.0\.1:(\d+)")
_HINT = "run .ci/setup (it installs Azurite into $GIGHIVE_CACHE/azurite) or set GIGHIVE_AZURITE_BLOB"


class AzuriteError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("GIGHIVE_CACHE") or Path.home() / ".cache" / "gighive-media-agent")


def find_azurite_blob() -> str:
    """Locate the azurite-blob launcher the same way .ci/setup installs it."""
    explicit = os.environ.get("GIGHIVE_AZURITE_BLOB")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise AzuriteError(f"GIGHIVE_AZURITE_BLOB={explicit} is not executable")
        return explicit
    d = cache_dir() / "azurite"
    candidates = []
    with_path_file = d / "AZURITE_BLOB"
    if with_path_file.is_file():
        candidates.append(with_path_file.read_text().strip())
    candidates.append(str(d / "node_modules" / ".bin" / "azurite-blob"))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    on_path = shutil.which("azurite-blob")
    if on_path:
        return on_path
    raise AzuriteError(f"azurite-blob not found; {_HINT}")


class Azurite:
    """One Azurite blob service.

    The first start() binds port 0 and learns the real port from Azurite's own log line; later
    start() calls reuse that port, so clients configured with blob_endpoint keep working.

    Persistence caveat: Azurite keeps blob metadata in LokiJS, saved every 5 s and on a clean
    shutdown. stop() keeps everything; kill() (SIGKILL) may forget containers/blobs committed in the
    last few seconds, as a crashed emulator would. Block data already written stays on disk.
    """

    def __init__(
        self,
        location: os.PathLike[str] | str,
        *,
        https: bool = False,
        cert: os.PathLike[str] | str | None = None,
        key: os.PathLike[str] | str | None = None,
        oauth: bool = False,
        port: int = 0,
        binary: str | None = None,
        startup_timeout: float = 180.0,
        debug_log: bool = False,
        extra_args: tuple[str, ...] = (),
        in_memory: bool = False,
    ) -> None:
        if oauth and not https:
            raise ValueError("Azurite accepts OAuth bearer tokens only over HTTPS")
        if https and not (cert and key):
            raise ValueError("https=True needs cert and key")
        self.location = Path(location)
        self.location.mkdir(parents=True, exist_ok=True)
        self.https = https
        self.cert = Path(cert) if cert else None
        self.key = Path(key) if key else None
        self.oauth = oauth
        self._port = port
        self.binary = binary or find_azurite_blob()
        self.startup_timeout = startup_timeout
        self.debug_log = debug_log
        self.extra_args = tuple(extra_args)
        # Benchmarks with 100,000 blobs: Azurite's on-disk mode re-saves its whole metadata
        # database every few seconds, which slows puts to a crawl as the container grows.
        self.in_memory = in_memory
        self.log_path = self.location / "azurite.log"
        self._proc: subprocess.Popen | None = None
        # The strict-Azure gate in front (tests/support/strict_gate.py): once attached, port,
        # blob_endpoint and connection_string name the gate, so every client goes through it;
        # direct_* name Azurite itself.
        self.gate: StrictGate | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.gate.port if self.gate is not None else self.direct_port

    @property
    def direct_port(self) -> int:
        if not self._port:
            raise AzuriteError("Azurite has not been started yet")
        return self._port

    @property
    def scheme(self) -> str:
        return "https" if self.https else "http"

    @property
    def account_name(self) -> str:
        return ACCOUNT_NAME

    @property
    def account_key(self) -> str:
        return ACCOUNT_KEY

    @property
    def blob_endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol={self.scheme};AccountName={ACCOUNT_NAME};"
            f"AccountKey={ACCOUNT_KEY};BlobEndpoint={self.blob_endpoint};"
        )

    @property
    def direct_connection_string(self) -> str:
        """Azurite itself, bypassing the gate (for setup a test wants unchecked)."""
        endpoint = f"{self.scheme}://{self.host}:{self.direct_port}/{ACCOUNT_NAME}"
        return (
            f"DefaultEndpointsProtocol={self.scheme};AccountName={ACCOUNT_NAME};"
            f"AccountKey={ACCOUNT_KEY};BlobEndpoint={endpoint};"
        )

    def attach_gate(self) -> StrictGate:
        """Put a strict-Azure gate in front of this (started) Azurite; returns it."""
        if self.gate is None:
            certfile = str(self.cert) if self.https else None
            keyfile = str(self.key) if self.https else None
            self.gate = StrictGate(self.host, self.direct_port, certfile=certfile, keyfile=keyfile).start()
        return self.gate

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        return _proc.tail(self.log_path)

    # -- lifecycle ---------------------------------------------------------------------------
    def _argv(self, port: int) -> list[str]:
        argv = [
            self.binary,
            "--blobHost",
            self.host,
            "--blobPort",
            str(port),
            *(["--inMemoryPersistence"] if self.in_memory else ["--location", str(self.location)]),
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--silent",
        ]
        if self.https:
            argv += ["--cert", str(self.cert), "--key", str(self.key)]
        if self.oauth:
            argv += ["--oauth", "basic"]
        if self.debug_log:
            argv += ["--debug", str(self.location / "azurite-debug.log")]
        return argv + list(self.extra_args)

    def start(self) -> Azurite:
        if self.running:
            return self
        # A just-killed listener can leave the fixed port briefly unavailable; a few tries cover it.
        attempts = 1 if self._port == 0 else 5
        for attempt in range(attempts):
            try:
                self._start_once()
                return self
            except AzuriteError as exc:
                if "EADDRINUSE" not in str(exc) or attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        return self

    def _start_once(self) -> None:
        offset = _proc.log_size(self.log_path)
        proc = _proc.spawn(self._argv(self._port), self.log_path)
        self._proc = proc
        deadline = time.monotonic() + self.startup_timeout
        while True:
            text = _proc.tail(self.log_path, offset, limit=1 << 20)
            m = _LISTEN_RE.search(text)
            if m:
                port = int(m.group(2))
                if self._port and port != self._port:
                    self._fail(f"Azurite listens on {port}, expected {self._port}", offset)
                self._port = port
                return
            if proc.poll() is not None:
                self._fail(f"Azurite exited with status {proc.returncode} during startup", offset)
            if time.monotonic() > deadline:
                self._fail(f"Azurite did not report its port within {self.startup_timeout:.0f} s", offset)
            time.sleep(0.05)

    def _fail(self, why: str, offset: int) -> NoReturn:
        _proc.kill(self._proc)
        self._proc = None
        raise AzuriteError(
            f"{why}\ncommand: {' '.join(self._argv(self._port))}\n"
            f"--- {self.log_path} ---\n{_proc.tail(self.log_path, offset)}"
        )

    def stop(self, timeout: float = 120.0) -> None:
        """Clean shutdown: Azurite saves its metadata, so everything survives a later start().
        The timeout is a safety net: a SIGKILL after it could lose the metadata of a slow save."""
        self.resume()
        _proc.terminate(self._proc, timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: connections reset at once, like a crash or a network outage (see class doc)."""
        _proc.kill(self._proc)
        self._proc = None

    def restart(self) -> Azurite:
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers, like a hung service."""
        if self.running:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            os.kill(self._proc.pid, signal.SIGCONT)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def close_gate(self) -> None:
        if self.gate is not None:
            self.gate.close()
            self.gate = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Azurite {self.scheme}://{self.host}:{self._port or '?'} {state} at {self.location}>"
