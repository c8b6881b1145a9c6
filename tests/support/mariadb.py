"""A private MariaDB server (Debian's mariadbd) standing in for GigHive's MySQL 8.4 `media_db`.

Real authentication (no --skip-grant-tables): the app user `gighive` has a random password, like the
`MYSQL_USER`/`MYSQL_PASSWORD` pair in GigHive's rendered .env.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import pymysql

from . import _proc

# GigHive's media table as its MySQL 8.4 server has it; MariaDB spells JSON as a checked LONGTEXT,
# which behaves the same for the agent's queries.
ASSETS_DDL = """
CREATE TABLE IF NOT EXISTS assets (
    asset_id BIGINT NOT NULL AUTO_INCREMENT,
    tenant_id VARCHAR(64) NOT NULL DEFAULT 'default',
    checksum_sha256 CHAR(64) NOT NULL,
    file_type ENUM('audio','video') NOT NULL,
    file_ext VARCHAR(16) NOT NULL,
    source_relpath VARCHAR(1024) NULL,
    size_bytes BIGINT NULL,
    mime_type VARCHAR(128) NULL,
    duration_seconds DECIMAL(10,3) NULL,
    media_info JSON NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    PRIMARY KEY (asset_id),
    UNIQUE KEY uniq_tenant_checksum (tenant_id, checksum_sha256)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
"""

# GigHive's job tables (create_media_db.sql), without the tenants foreign key: what tells the agent
# that GigHive still works on a file (an AI job queued or running, an upload job in progress).
JOBS_DDL = (
    """
CREATE TABLE IF NOT EXISTS ai_jobs (
  id          BIGINT UNSIGNED  NOT NULL AUTO_INCREMENT PRIMARY KEY,
  tenant_id   int unsigned     NOT NULL DEFAULT 1,
  job_type    VARCHAR(64)      NOT NULL,
  source      VARCHAR(64)      NULL,
  target_type ENUM('asset','event','event_item','participant') NOT NULL,
  target_id   BIGINT UNSIGNED  NOT NULL,
  params_json JSON             NULL,
  status      ENUM('queued','running','done','failed') NOT NULL DEFAULT 'queued',
  priority    SMALLINT         NOT NULL DEFAULT 100,
  attempts    SMALLINT         NOT NULL DEFAULT 0,
  locked_by   VARCHAR(128)     NULL,
  locked_at   DATETIME         NULL,
  error_msg   TEXT             NULL,
  created_at  DATETIME         NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at  DATETIME         NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  KEY idx_ai_jobs_claim  (status, job_type, priority, created_at),
  KEY idx_ai_jobs_target (target_type, target_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
""",
    """
CREATE TABLE IF NOT EXISTS upload_jobs (
    id           INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    tenant_id    int unsigned NOT NULL DEFAULT 1,
    job_id       VARCHAR(64)  NOT NULL,
    job_type     VARCHAR(32)  NOT NULL DEFAULT 'manifest_import',
    status       VARCHAR(32)  NOT NULL DEFAULT 'in_progress',
    total_files  INT UNSIGNED NOT NULL DEFAULT 0,
    started_at   DATETIME     NOT NULL,
    completed_at DATETIME     NULL,
    UNIQUE KEY uq_upload_jobs_job_id (job_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
""",
    """
CREATE TABLE IF NOT EXISTS upload_job_files (
    id              INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    job_id          VARCHAR(64)  NOT NULL,
    checksum_sha256 CHAR(64)     NOT NULL,
    source_relpath  VARCHAR(512) NOT NULL,
    file_type       VARCHAR(16)  NULL,
    state           VARCHAR(32)  NOT NULL DEFAULT 'pending',
    UNIQUE KEY uq_upload_job_file (job_id, checksum_sha256),
    CONSTRAINT fk_upload_job_files_job FOREIGN KEY (job_id) REFERENCES upload_jobs(job_id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
""",
)

# MySQL 8.4's default sql_mode, so queries that MySQL would reject fail here too.
MYSQL84_SQL_MODE = (
    "ONLY_FULL_GROUP_BY,STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,"
    "ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION"
)

# sun_path is 108 bytes; leave room for the terminating NUL.
_MAX_SOCKET_PATH = 100


class MariaDBError(RuntimeError):
    pass


def _binary(name: str, fallback: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found:
        return found
    if os.access(fallback, os.X_OK):
        return fallback
    raise MariaDBError(f"{name} not found; run .ci/setup (installs mariadb-server)")


class MariaDB:
    """One mariadbd with its own data dir under basedir, on 127.0.0.1:<port> and a unix socket.

    start() after stop()/kill() reuses the same port, data and passwords.
    """

    def __init__(
        self,
        basedir: os.PathLike[str] | str,
        *,
        database: str = "media_db",
        user: str = "gighive",
        password: str | None = None,
        port: int = 0,
        startup_timeout: float = 300.0,
    ) -> None:
        self.basedir = Path(basedir)
        self.basedir.mkdir(parents=True, exist_ok=True)
        self.datadir = self.basedir / "data"
        self.tmpdir = self.basedir / "tmp"
        self.log_path = self.basedir / "error.log"
        self.pid_path = self.basedir / "mariadbd.pid"
        sock = self.basedir / "mysqld.sock"
        self._socket_dir: str | None = None
        if len(str(sock)) > _MAX_SOCKET_PATH:
            self._socket_dir = tempfile.mkdtemp(prefix="gmdb-")
            sock = Path(self._socket_dir) / "mysqld.sock"
        self.socket = str(sock)
        self.host = "127.0.0.1"
        self.database = database
        self.user = user
        self.password = password or secrets.token_urlsafe(18)
        self.root_password = secrets.token_urlsafe(18)
        self._port = port
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._bootstrapped = False

    # -- properties --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if not self._port:
            raise MariaDBError("MariaDB has not been started yet")
        return self._port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def log_text(self) -> str:
        return _proc.tail(self.log_path)

    def dsn(self) -> dict[str, object]:
        """Keyword arguments for pymysql.connect as the app user."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.database,
        }

    # -- connections -------------------------------------------------------------------------
    def connect(self, **kw: object) -> pymysql.connections.Connection:
        """A pymysql connection as the app user over TCP (pymysql defaults otherwise, so
        autocommit is off). Pass unix_socket=db.socket to use the socket."""
        args: dict[str, object] = {**self.dsn(), "charset": "utf8mb4", "connect_timeout": 10}
        args.update(kw)
        return pymysql.connect(**args)

    def admin_connect(self, **kw: object) -> pymysql.connections.Connection:
        """root over the unix socket, autocommit on: for test setup that the app user may not do."""
        args: dict[str, object] = {
            "unix_socket": self.socket,
            "user": "root",
            "password": self.root_password,
            "charset": "utf8mb4",
            "autocommit": True,
            "connect_timeout": 10,
        }
        args.update(kw)
        return pymysql.connect(**args)

    def password_file(self, path: os.PathLike[str] | str, *, newline: bool = True) -> Path:
        """Write the app user's password to a new 0600 file (as a secrets file would hold it)."""
        p = Path(path)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + ("\n" if newline else ""))
        return p

    # -- lifecycle ---------------------------------------------------------------------------
    def _install(self) -> None:
        if (self.datadir / "mysql").is_dir():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        argv = [
            _binary("mariadb-install-db", "/usr/bin/mariadb-install-db"),
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--skip-name-resolve",
        ]
        if os.geteuid() == 0:
            argv.append("--user=root")
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if out.returncode != 0:
            raise MariaDBError(f"mariadb-install-db failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")

    def _argv(self, port: int) -> list[str]:
        argv = [
            _binary("mariadbd", "/usr/sbin/mariadbd"),
            "--no-defaults",  # must come first: ignore /etc/mysql, this server is self-contained
            f"--datadir={self.datadir}",
            f"--socket={self.socket}",
            f"--pid-file={self.pid_path}",
            f"--log-error={self.log_path}",
            f"--tmpdir={self.tmpdir}",
            "--bind-address=127.0.0.1",
            f"--port={port}",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
            f"--sql-mode={MYSQL84_SQL_MODE}",
            "--max-connections=300",
            # Small and quick: tests hold little data. Log writes at commit reach the OS, so a
            # SIGKILLed server still recovers every committed row.
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=32M",
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-doublewrite=0",
            # Native AIO is unavailable in some sandboxes and buys nothing here.
            "--innodb-use-native-aio=0",
            "--skip-log-bin",
        ]
        if os.geteuid() == 0:
            argv.append("--user=root")  # mariadbd refuses to run as root otherwise
        return argv

    def start(self) -> MariaDB:
        if self.running:
            return self
        self._install()
        self.tmpdir.mkdir(exist_ok=True)
        fixed = bool(self._port)
        for attempt in range(5):
            port = self._port or _proc.free_port()
            try:
                self._start_once(port)
                self._port = port
                break
            except MariaDBError as exc:
                # Another process may grab a probed port before mariadbd binds it; a fixed port may
                # still be in TIME_WAIT-like limbo right after a kill.
                if "Bind on TCP/IP port" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1) if fixed else 0)
        if not self._bootstrapped:
            self._bootstrap()
        return self

    def _start_once(self, port: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)  # a SIGKILLed server leaves its socket file behind
        offset = _proc.log_size(self.log_path)
        proc = _proc.spawn(self._argv(port), self.basedir / "mariadbd.out")
        self._proc = proc
        deadline = time.monotonic() + self.startup_timeout
        root_password = self.root_password if self._bootstrapped else ""
        last_err: Exception | None = None
        while True:
            if proc.poll() is not None:
                self._fail(f"mariadbd exited with status {proc.returncode} during startup", offset)
            if os.path.exists(self.socket):
                try:
                    pymysql.connect(
                        unix_socket=self.socket, user="root", password=root_password, connect_timeout=2
                    ).close()
                    if _proc.port_open(self.host, port):
                        return
                except pymysql.err.OperationalError as exc:
                    last_err = exc
            if time.monotonic() > deadline:
                self._fail(f"mariadbd not ready within {self.startup_timeout:.0f} s (last error: {last_err})", offset)
            time.sleep(0.05)

    def _fail(self, why: str, offset: int) -> NoReturn:
        _proc.kill(self._proc)
        self._proc = None
        out = self.basedir / "mariadbd.out"
        raise MariaDBError(
            f"{why}\n--- {self.log_path} ---\n{_proc.tail(self.log_path, offset)}"
            f"\n--- {out} ---\n{_proc.tail(out, limit=2000)}"
        )

    def _bootstrap(self) -> None:
        conn = pymysql.connect(unix_socket=self.socket, user="root", password="", autocommit=True)
        try:
            with conn.cursor() as cur:
                # Only root@localhost (socket) stays. Host-named accounts such as root@<hostname> cannot
                # even be ALTERed under --skip-name-resolve, so remove the extras at the table level.
                cur.execute(
                    "DELETE FROM mysql.global_priv WHERE NOT (User = 'root' AND Host = 'localhost') "
                    "AND User <> 'mariadb.sys'"
                )
                cur.execute("FLUSH PRIVILEGES")
                cur.execute("ALTER USER 'root'@'localhost' IDENTIFIED BY %s", (self.root_password,))
                cur.execute(
                    f"CREATE DATABASE IF NOT EXISTS `{self.database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                )
                for host in ("%", "localhost"):
                    cur.execute("CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (self.user, host, self.password))
                    cur.execute(f"GRANT ALL PRIVILEGES ON `{self.database}`.* TO %s@%s", (self.user, host))
                cur.execute(f"USE `{self.database}`")
                cur.execute(ASSETS_DDL)
                for ddl in JOBS_DDL:
                    cur.execute(ddl)
        finally:
            conn.close()
        self._bootstrapped = True

    def reset_database(self) -> None:
        """Drop and recreate the database with GigHive's assets and job tables (as freshly deployed)."""
        conn = self.admin_connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{self.database}`")
                cur.execute(f"CREATE DATABASE `{self.database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
                cur.execute(f"USE `{self.database}`")
                cur.execute(ASSETS_DDL)
                for ddl in JOBS_DDL:
                    cur.execute(ddl)
        finally:
            conn.close()

    def stop(self, timeout: float = 180.0) -> None:
        """Clean shutdown (SIGTERM)."""
        _proc.terminate(self._proc, timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: committed transactions survive (InnoDB recovery on the next start)."""
        _proc.kill(self._proc)
        self._proc = None

    def restart(self) -> MariaDB:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> MariaDB:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MariaDB 127.0.0.1:{self._port or '?'} {state} at {self.basedir}>"
