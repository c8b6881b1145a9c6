"""The real world the simulation runs in: media roots on disk, Azurite, MariaDB, the agent and the
stream server, plus the levers the model pulls (GigHive's writes, deletes and TRUNCATEs, outages,
lost responses, kills).

The agent reaches Azurite and MariaDB through fault proxies (tests/faults/faultproxy.py), so an
outage is a refused connection and a lost response is a request that Azurite applied but whose
answer never arrived. The stream server and the invariant checks reach Azurite directly: an
outage is a fault of the agent's link, not a loss of data.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import random
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ContainerClient

from tests.faults.faultproxy import FaultProxy
from tests.support import _proc
from tests.support.azurite import ACCOUNT_KEY, ACCOUNT_NAME, Azurite
from tests.support.mariadb import ASSETS_DDL, MariaDB

REPO = Path(__file__).resolve().parents[2]
CONTAINER = "media"
MSL = "media_storage_locations"

# What a killed command is stopped at: the N-th call of one of these (see killer.py).
# The ones most runs reach come twice, so a drawn kill or race lands more often.
HOOK_TARGETS = (
    "os.unlink",
    "os.unlink",
    "os.rename",
    "os.link",
    "store.stat",
    "store.stat",
    "store.delete",
    "store.put",
    "store.put",
    "store.commit_blocks",
    "pointer.record_blob",
    "pointer.record_blob",
    "pointer.record_local",
    "state.mark_uploaded",
    "state.mark_uploaded",
    "state.mark_evicted",
    "state.forget",
)


@dataclass
class AgentRun:
    argv: list[str]
    code: int | None  # None: killed
    result: dict | None = None
    killed: bool = False
    hook_fired: bool = False
    stderr: str = ""


@dataclass
class World:
    base: Path
    azurite: Azurite
    mariadb: MariaDB
    azure_proxy: FaultProxy = field(init=False)
    mysql_proxy: FaultProxy = field(init=False)
    server: subprocess.Popen | None = field(init=False, default=None)
    server_url: str = field(init=False, default="")
    container: ContainerClient = field(init=False)
    killer: Killer | None = field(init=False, default=None)
    _admin: object | None = field(init=False, default=None)
    _http: http.client.HTTPConnection | None = field(init=False, default=None)

    # ---- lifecycle ------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.media = self.base / "media"
        self.roots = {"audio": self.media / "audio", "video": self.media / "video"}
        self.state_dir = self.base / "state"
        self.config_path = self.base / "agent.env"
        self.password_file = self.mariadb.password_file(self.base / "mysql-password")
        self.azure_proxy = _proxy(self.azurite.host, self.azurite.port, http=True)
        self.mysql_proxy = _proxy(self.mariadb.host, self.mariadb.port, http=False)
        service = BlobServiceClient.from_connection_string(self.direct_connection_string, retry_total=1)
        with contextlib.suppress(Exception):
            service.create_container(CONTAINER)
        self.container = service.get_container_client(CONTAINER)
        self._make_roots()
        self._admin_sql(ASSETS_DDL)
        self.write_config()
        # The pointer table as `gighive-media db-migrate` creates it.
        assert self.agent(["db-migrate"]).code == 0
        self._start_server()

    def close(self) -> None:
        if self.killer is not None:
            self.killer.close()
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
        if self._http is not None:
            self._http.close()
        _proc.terminate(self.server)
        self.azure_proxy.close()
        self.mysql_proxy.close()

    @property
    def direct_connection_string(self) -> str:
        return self.azurite.connection_string

    def _proxied_connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.azure_proxy.port}/{ACCOUNT_NAME};"
        )

    def settings(self, **overrides: str) -> dict[str, str]:
        values = {
            "MEDIA_STORAGE_BACKEND": "azure_blob",
            "AZURE_AUTH_MODE": "connection_string",
            "AZURE_STORAGE_CONNECTION_STRING": self._proxied_connection_string(),
            "AZURE_STORAGE_CONTAINER_NAME": CONTAINER,
            # Outages here are refusals and resets, never a black hole: the timeout only has to
            # outlast a slow Azurite on a loaded machine (a timeout would be an outage nobody drew).
            "AZURE_NETWORK_TIMEOUT": "60",
            "MEDIA_ROOTS": f"audio={self.roots['audio']},video={self.roots['video']}",
            "GIGHIVE_MEDIA_STATE_DIR": str(self.state_dir),
            "UPLOAD_SETTLE_SECONDS": "0",
            "UPLOAD_IDLE_EXIT_SECONDS": "0",
            "UPLOAD_BLOCK_SIZE": "256KiB",
            # One file and one block at a time: the N-th call of a hooked function is then the
            # same call on every replay, so hypothesis can shrink and repeat an example.
            "UPLOAD_FILE_CONCURRENCY": "1",
            "UPLOAD_BLOCK_CONCURRENCY": "1",
            "RETRY_BASE_DELAY": "0",
            "RETRY_MAX_DELAY": "0",
            # Low, so that an outage that charged attempts shows up as a dead file within a run.
            "RETRY_MAX_ATTEMPTS": "3",
            "DELETE_LOCAL_AFTER_UPLOAD": "false",
            # Files here are seconds old: the eviction policy's age would keep every one local.
            # GigHive's own work (ai_jobs, ingest) still counts, as in production.
            "EVICT_MIN_AGE_DAYS": "0",
            "MYSQL_HOST": "127.0.0.1",
            "MYSQL_PORT": str(self.mysql_proxy.port),
            "MYSQL_DATABASE": self.mariadb.database,
            "MYSQL_USER": self.mariadb.user,
            "MYSQL_PASSWORD_FILE": str(self.password_file),
            "MYSQL_CONNECT_TIMEOUT": "2",
            "LOG_LEVEL": "warning",
        }
        values.update(overrides)
        return values

    def write_config(self, **overrides: str) -> Path:
        values = self.settings(**overrides)
        lines = [f'{k}="{v}"' if ";" in v or " " in v else f"{k}={v}" for k, v in values.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.config_path.chmod(0o600)
        return self.config_path

    def _make_roots(self) -> None:
        for p in (self.roots["audio"], self.roots["video"], self.roots["video"] / "thumbnails"):
            p.mkdir(parents=True, exist_ok=True)

    def _start_server(self) -> None:
        """`gighive-media serve` with the backend's own view (direct to Azurite, no stat cache)."""
        cfg = self.base / "serve.env"
        values = self.settings(
            AZURE_STORAGE_CONNECTION_STRING=self.direct_connection_string,
            STREAM_STAT_CACHE_SECONDS="0",
            STREAM_UPSTREAM_TIMEOUT_SECONDS="60",
            STREAM_ALLOWED_PEERS="localhost",
            STREAM_IDLE_EXIT_SECONDS="0",
            LOG_LEVEL="info",
        )
        cfg.write_text("".join(f'{k}="{v}"\n' if ";" in v else f"{k}={v}\n" for k, v in values.items()))
        cfg.chmod(0o600)
        log = self.base / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "LISTEN_"))}
        # _proc.spawn: the server dies with this process, even when that is SIGKILLed.
        self.server = _proc.spawn(
            [sys.executable, "-m", "agent", "serve", "--config", str(cfg), "--listen", "127.0.0.1:0"], log, env=env
        )
        deadline = time.monotonic() + 300
        while True:
            m = re.search(r"serving on (\S+?)[ ,]", log.read_text(errors="replace"))
            if m:
                self.server_url = f"http://{m.group(1)}"
                return
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"stream server did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)

    def reset(self) -> None:
        """A fresh host for the next example: no media, no blobs, empty tables, no state."""
        proxy_up(self.azure_proxy)
        proxy_up(self.mysql_proxy)
        shutil.rmtree(self.media, ignore_errors=True)
        self._make_roots()
        for b in list(self.container.list_blobs()):
            with contextlib.suppress(ResourceNotFoundError):
                self.container.delete_blob(b.name)
        self._admin_sql("TRUNCATE TABLE assets", f"TRUNCATE TABLE {MSL}")
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.write_config()

    # ---- GigHive's database ---------------------------------------------------------------

    @contextlib.contextmanager
    def _admin_cursor(self) -> Iterator[object]:
        """GigHive's side of the DB: one root connection over the unix socket, kept for the whole
        run (autocommit: every statement is committed when it returns, as with a connection per
        statement; the agent's MySQL outages are its proxy's and never reach this one)."""
        if self._admin is None:
            self._admin = self.mariadb.admin_connect(database=self.mariadb.database)
        try:
            with self._admin.cursor() as cur:
                yield cur
        except Exception:
            # A broken connection is not reused; the statement's error still reaches the caller.
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None
            raise

    def _admin_sql(self, *statements: str, args: list[tuple] | None = None) -> list[tuple]:
        rows: list[tuple] = []
        with self._admin_cursor() as cur:
            for s in statements:
                cur.execute(s)
                rows = list(cur.fetchall())
        return rows

    def insert_asset(self, file_type: str, sha: str, ext: str, size: int) -> None:
        with self._admin_cursor() as cur:
            cur.execute(
                "INSERT IGNORE INTO assets (checksum_sha256, file_type, file_ext, size_bytes) VALUES (%s,%s,%s,%s)",
                (sha, file_type, ext, size),
            )

    def delete_asset(self, file_type: str, sha: str) -> None:
        with self._admin_cursor() as cur:
            cur.execute("DELETE FROM assets WHERE checksum_sha256 = %s AND file_type = %s", (sha, file_type))

    def truncate(self, table: str) -> None:
        # As GigHive's import paths do it: foreign key checks off, then TRUNCATE.
        self._admin_sql("SET FOREIGN_KEY_CHECKS=0", f"TRUNCATE TABLE {table}", "SET FOREIGN_KEY_CHECKS=1")

    def dump(self) -> dict[str, list[tuple]]:
        return {t: self._admin_sql(f"SELECT * FROM {t}") for t in ("assets", MSL)}

    def restore_dump(self, dump: dict[str, list[tuple]]) -> None:
        """A DB restored from an earlier backup: both tables replaced by the dump's rows."""
        with self._admin_cursor() as cur:
            for table, rows in dump.items():
                cur.execute(f"DELETE FROM {table}")
                if rows:
                    marks = ",".join(["%s"] * len(rows[0]))
                    cur.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)

    def pointers(self) -> dict[str, tuple]:
        return {r[0]: r[1:] for r in self._admin_sql(f"SELECT media_path, provider, local_copy FROM {MSL}")}

    # ---- the agent's state ----------------------------------------------------------------

    def state_rows(self) -> dict[str, dict]:
        path = self.state_dir / "state.sqlite3"
        if not path.exists():
            return {}
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        except sqlite3.Error:
            return {}
        try:
            conn.row_factory = sqlite3.Row
            return {r["blob_name"]: dict(r) for r in conn.execute("SELECT * FROM files")}
        except sqlite3.Error:
            return {}
        finally:
            conn.close()

    def lose_state(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)

    @property
    def snapshot_dir(self) -> Path:
        return self.base / "state-snapshot"

    def snapshot_state(self) -> None:
        """The state as the power cut of the coming run will leave it, unless that run makes a
        durable commit (which moves this snapshot forward: killer.keep_durable_points)."""
        shutil.rmtree(self.snapshot_dir, ignore_errors=True)
        if self.state_dir.exists():
            shutil.copytree(self.state_dir, self.snapshot_dir)

    def revert_state(self) -> None:
        """A power cut: the state's commits since its last durable one are gone."""
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if self.snapshot_dir.exists():
            shutil.copytree(self.snapshot_dir, self.state_dir)

    # ---- reading the bytes ----------------------------------------------------------------

    def local_path(self, blob_name: str) -> Path:
        root, rel = blob_name.split("/", 1)
        return self.roots[root] / rel

    def local_bytes(self, blob_name: str) -> bytes | None:
        try:
            return self.local_path(blob_name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def blob_bytes(self, blob_name: str) -> bytes | None:
        try:
            return self.container.get_blob_client(blob_name).download_blob().readall()
        except ResourceNotFoundError:
            return None

    def served(self, blob_name: str) -> tuple[int, bytes]:
        """GET /<name> on the stream server: (status, body; empty unless 200). One kept-alive
        connection for all the checks, as nginx keeps its upstream connections; a connection the
        server closed while idle is opened again and the GET sent once more, as nginx does."""
        for fresh in (False, True):
            if self._http is None or fresh:
                if self._http is not None:
                    self._http.close()
                host, port = self.server_url.removeprefix("http://").rsplit(":", 1)
                self._http = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                self._http.request("GET", f"/{blob_name}")
                r = self._http.getresponse()
                body = r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if fresh:
                    raise
                continue
            if r.will_close:
                self._http.close()
                self._http = None
            return r.status, body if r.status == 200 else b""
        raise AssertionError("unreachable")

    # ---- running the agent ----------------------------------------------------------------

    def agent(self, argv: list[str], **overrides: str) -> AgentRun:
        """`gighive-media <argv> --json` in this process, through agent.cli.main."""
        from agent.cli import main

        self.write_config(**overrides)
        full = ["--config", str(self.config_path), *argv, "--json"]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _clean_env(), _no_backoff_sleep():
            try:
                code = main(full)
            except SystemExit as e:  # argparse: usage errors
                code = int(e.code or 0)
        return AgentRun(argv, code, _json(out.getvalue()), stderr=err.getvalue()[-4000:])

    def agent_with_hook(
        self, argv: list[str], target: str, nth: int, action: Callable[[object], None], **overrides: str
    ) -> AgentRun:
        """The agent in process, with `action(subject)` run just before the nth call of `target`
        (a GigHive write racing the agent's step). subject: the path or blob name of that call."""
        fired = {"n": 0, "done": False}

        def before(subject: object) -> None:
            fired["n"] += 1
            if fired["n"] == nth and not fired["done"]:
                fired["done"] = True
                action(subject)

        with patched(target, before):
            run = self.agent(argv, **overrides)
        run.hook_fired = fired["done"]
        return run

    def agent_killed(
        self, argv: list[str], target: str, nth: int, when: str, power_cut: bool = False, **overrides: str
    ) -> AgentRun:
        """The agent as a child process that dies (os._exit(137), like SIGKILL: no cleanup, no
        flush) at the nth call of `target`, before or after the call happens. power_cut: its
        durable commits are kept for revert_state (killer.keep_durable_points)."""
        self.write_config(**overrides)
        spec = {"target": target, "nth": nth, "when": when}
        if power_cut:
            spec["durable_snapshot"] = str(self.snapshot_dir)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "UPLOAD_"))}
        env.pop("JOURNAL_STREAM", None)
        env.pop("GIGHIVE_MEDIA_CONFIG", None)
        if self.killer is None:
            self.killer = Killer(self.base / "killer.log", env)
        code, stdout, stderr = self.killer.run(spec, ["--config", str(self.config_path), *argv, "--json"], env)
        killed = code == 137
        return AgentRun(
            argv,
            None if killed else code,
            None if killed else _json(stdout),
            killed=killed,
            hook_fired=killed,
            stderr=stderr[-4000:],
        )

    def agent_has_option(self, command: str, option: str) -> bool:
        """Feature check: does this build's `gighive-media <command>` take <option>?"""
        from agent.cli import build_parser

        parser = build_parser()
        for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse has no public walk
            sub = action.choices.get(command) if hasattr(action, "choices") else None
            if sub is not None:
                return any(option in a.option_strings for a in sub._actions)  # noqa: SLF001
        return False


class Killer:
    """The fork server of tests/simulation/killer.py: every killed run is a child process of its
    own, forked from one that has imported the agent already (a new interpreter and the Azure
    SDK's imports took most of a killed run's time)."""

    TIMEOUT = 300  # as the run's own subprocess timeout was: a hung agent fails the step

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        self.dir = log.parent / "killer"
        self.dir.mkdir(exist_ok=True)
        preexec = _proc._die_with_parent if threading.current_thread() is threading.main_thread() else None  # noqa: SLF001
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.simulation.killer", "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO,
                env=env,
                preexec_fn=preexec,  # only prctl(): the server dies with this process
                close_fds=True,
            )
        self._buf = b""

    def run(self, spec: dict, argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
        out, err = self.dir / "stdout", self.dir / "stderr"
        request = {"spec": spec, "argv": argv, "env": env, "out": str(out), "err": str(err)}
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.TIMEOUT
        pid = self._reply(deadline)["pid"]
        try:
            code = self._reply(deadline)["code"]
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._reply(time.monotonic() + 60)
            raise
        return code, out.read_text(errors="replace"), err.read_text(errors="replace")

    def _reply(self, deadline: float) -> dict:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired("killer", self.TIMEOUT)
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    raise RuntimeError(f"the killer's fork server died (exit {self.proc.wait()}); see killer.log")
                self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the server's loop ends at end of input
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def _no_backoff_sleep() -> Iterator[None]:
    """In-process agent runs: the Azure SDK's in-request retries without their waits (see
    killer.no_backoff_sleep; the stream server, a process of its own, keeps them)."""
    from azure.core.pipeline.transport._base import HttpTransport

    original = HttpTransport.sleep
    HttpTransport.sleep = lambda self, duration: None
    try:
        yield
    finally:
        HttpTransport.sleep = original


def _proxy(host: str, port: int, http: bool) -> FaultProxy:
    """A fault proxy on a port below the ephemeral range: while it refuses (an outage), its port is
    free, and an ephemeral port could be handed to some outgoing connection meanwhile; the
    proxy could then not listen on it again."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        p = FaultProxy(host, port, http=http)
        p._port = rng.randint(max(1024, low - 12000), low - 1)  # noqa: SLF001 - the proxy has no port argument
        try:
            return p.start()
        except OSError:
            continue
    raise RuntimeError("no free port below the ephemeral range for a fault proxy")


def proxy_up(p: FaultProxy) -> None:
    """passthrough(), waiting until the refused listener's port is free again: a closed listening
    socket lives on in the kernel until the proxy's accept thread returns from its poll."""
    deadline = time.monotonic() + 30
    while True:
        try:
            p.passthrough()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            p.refuse()  # back to "refusing", so the next passthrough() listens again
            time.sleep(0.05)


def _json(text: str) -> dict | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        # Some commands print a line before the JSON document; take the last document.
        start = text.rfind("\n{")
        try:
            value = json.loads(text[start + 1 :]) if start >= 0 else None
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


@contextlib.contextmanager
def _clean_env() -> Iterator[None]:
    """The test process's own AZURE_/MEDIA_/MYSQL_ variables must not reach the agent's config."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "UPLOAD_"))}
    saved.update({k: os.environ[k] for k in ("GIGHIVE_MEDIA_CONFIG", "JOURNAL_STREAM") if k in os.environ})
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


def _subject(args: tuple, kwargs: dict) -> object:
    for a in args:
        if isinstance(a, str | os.PathLike):
            return os.fspath(a)
    return kwargs.get("name") or (args[0] if args else None)


def resolve(target: str) -> tuple[object, str]:
    """(owner, attribute) of a hook target; owners are modules or the agent's classes."""
    module, attr = target.split(".", 1)
    if module == "os":
        return os, attr
    if module == "store":
        from agent.storage.azure_blob import AzureBlobStore

        return AzureBlobStore, attr
    if module == "pointer":
        from agent.pointer import PointerDB

        return PointerDB, attr
    if module == "state":
        from agent.state import StateStore

        return StateStore, attr
    raise ValueError(target)


@contextlib.contextmanager
def patched(target: str, before: Callable[[object], None]) -> Iterator[None]:
    owner, attr = resolve(target)
    original = getattr(owner, attr, None)
    if original is None:
        # This build has no such function (the code moved): the hook never fires.
        yield
        return
    is_method = owner is not os

    if is_method:

        def wrapper(self, *args, **kwargs):
            before(_subject(args, kwargs))
            return original(self, *args, **kwargs)

    else:

        def wrapper(*args, **kwargs):
            before(_subject(args, kwargs))
            return original(*args, **kwargs)

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)
