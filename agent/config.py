"""Loading and validating the agent's configuration.

One env-style file (what systemd's EnvironmentFile= reads), overridden by the process
environment. Every problem is collected and reported together, each naming its variable,
and the CLI exits 78 (EX_CONFIG) so systemd's RestartPreventExitStatus= stops a restart loop.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError, ConfigErrors
from .secrets import Secret, check_private_file, credential_path, read_secret_file

DEFAULT_CONFIG_PATH = Path("/etc/gighive-media-agent/agent.env")
DEFAULT_STATE_DIR = Path("/var/lib/gighive-media-agent")

BACKENDS = ("local", "azure_blob")
AUTH_MODES = ("managed_identity", "service_principal", "connection_string")

# Names of the credentials the units hand over with LoadCredential=.
CRED_CLIENT_SECRET = "azure-client-secret"  # noqa: S105 - a credential name, not a secret
CRED_CLIENT_CERTIFICATE = "azure-client-certificate"
CRED_CONNECTION_STRING = "azure-storage-connection-string"
CRED_MYSQL_PASSWORD = "mysql-password"  # noqa: S105 - a credential name

# Variables that would put a secret in the environment (inherited by children, visible in
# /proc/<pid>/environ to the same user); the agent insists on files instead.
FORBIDDEN_INLINE = {
    "AZURE_CLIENT_SECRET": "AZURE_CLIENT_SECRET_FILE or LoadCredential=" + CRED_CLIENT_SECRET,
    "MYSQL_PASSWORD": "MYSQL_PASSWORD_FILE or LoadCredential=" + CRED_MYSQL_PASSWORD,
}

_ACCOUNT_RE = re.compile(r"^[a-z0-9]{3,24}$")
_CONTAINER_RE = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_ROOT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_ENV_LINE_RE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
_SIZE_RE = re.compile(r"^(\d+)\s*([kmgt]?)(i?b?)$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

# Azure's limits: a block blob has at most 50,000 blocks of at most 4000 MiB.
MIN_BLOCK_SIZE = 256 * 1024
MAX_BLOCK_SIZE = 4000 * 1024 * 1024


@dataclass(frozen=True)
class MediaRoot:
    """A local directory and the blob prefix (= URL prefix) it maps to."""

    name: str
    path: Path
    content_addressed: bool


@dataclass(frozen=True)
class MysqlConfig:
    host: str
    port: int
    database: str
    user: str
    password: Secret | None
    connect_timeout: float = 5.0


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 12
    base_delay: float = 60.0
    max_delay: float = 6 * 3600.0


@dataclass(frozen=True)
class Config:
    backend: str
    roots: tuple[MediaRoot, ...]
    state_dir: Path
    account_name: str | None = None
    container: str | None = None
    endpoint: str | None = None
    auth_mode: str = "managed_identity"
    client_id: str | None = None
    tenant_id: str | None = None
    client_secret: Secret | None = None
    client_certificate_path: Path | None = None
    authority_host: str | None = None
    ca_bundle: Path | None = None
    connection_string: Secret | None = None
    credential_timeout: float = 10.0
    # The whole of one token fetch, retries and backoff included (credential_timeout bounds each try).
    credential_retry_timeout: float = 90.0
    network_timeout: float = 30.0
    delete_local: bool = False
    # Eviction policy (agent/eviction_policy.py): which uploaded files may lose their local copy.
    evict_min_age_days: float = 7.0
    evict_above_disk_percent: float = 0.0
    evict_wait_for_gighive: bool = True
    # Blobs of assets deleted in GigHive: purged this long after the delete was seen (0: never).
    purge_deleted_after_days: float = 30.0
    mysql: MysqlConfig | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    block_size: int = 8 * 1024 * 1024
    block_concurrency: int = 4
    file_concurrency: int = 4
    bandwidth_limit: int = 0
    settle_seconds: float = 5.0
    idle_exit_seconds: float = 60.0
    verify_readback: bool = False
    log_level: str = "info"
    source: Path | None = None
    # Every variable as read (file + environment), for components that own their own settings
    # (the stream server reads STREAM_* from here). Never printed: it may hold secrets.
    values: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_azure(self) -> bool:
        return self.backend == "azure_blob"

    def root_named(self, name: str) -> MediaRoot | None:
        return next((r for r in self.roots if r.name == name), None)

    def summary(self) -> dict[str, object]:
        """What `status` shows: everything an operator needs, no secret values."""
        return {
            "config_file": str(self.source) if self.source else None,
            "backend": self.backend,
            "account": self.account_name,
            "container": self.container,
            "endpoint": self.endpoint,
            "auth_mode": self.auth_mode,
            "client_id": self.client_id,
            "tenant_id": self.tenant_id,
            "media_roots": {r.name: str(r.path) for r in self.roots},
            "content_addressed_roots": [r.name for r in self.roots if r.content_addressed],
            "delete_local_after_upload": self.delete_local,
            "evict_min_age_days": self.evict_min_age_days,
            "evict_above_disk_percent": self.evict_above_disk_percent,
            "evict_wait_for_gighive": self.evict_wait_for_gighive,
            "purge_deleted_after_days": self.purge_deleted_after_days,
            "database": (
                f"mysql://{self.mysql.user}@{self.mysql.host}:{self.mysql.port}/{self.mysql.database}"
                if self.mysql
                else None
            ),
            "state_dir": str(self.state_dir),
            "retry": {
                "max_attempts": self.retry.max_attempts,
                "base_delay_s": self.retry.base_delay,
                "max_delay_s": self.retry.max_delay,
            },
            "block_size": self.block_size,
            "block_concurrency": self.block_concurrency,
            "file_concurrency": self.file_concurrency,
            "bandwidth_limit_bytes_per_s": self.bandwidth_limit,
            "verify_readback": self.verify_readback,
        }


def parse_env_file(text: str, origin: str = "config") -> dict[str, str]:
    """Parse the subset of systemd's EnvironmentFile= syntax that operators write.

    KEY=VALUE lines, `#` and `;` comments, optional single or double quotes around the
    value. Anything else is an error with its line number, rather than a silently dropped line.
    """
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = _ENV_LINE_RE.match(line)
        if not m:
            raise ConfigError(f"{origin}:{lineno}", f"not a KEY=VALUE line: {raw.strip()[:60]!r}")
        key, value = m.group(1), m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
            if m.group(2).strip()[0] == '"':
                value = re.sub(r'\\(["\\$`])', r"\1", value)
        values[key] = value
    return values


def parse_size(value: str) -> int:
    """Bytes from '8MiB', '4M', '512k' or '262144' (binary units); ValueError says why not."""
    m = _SIZE_RE.match(value.replace(" ", ""))
    if not m:
        raise ValueError(f"{value!r} is not a size (examples: 8MiB, 4M, 262144)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


class Reader:
    """Looks variables up and records every problem instead of stopping at the first."""

    def __init__(self, values: Mapping[str, str]):
        self.values = values
        self.errors: list[ConfigError] = []

    def raw(self, name: str) -> str | None:
        value = self.values.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def fail(self, name: str, problem: str) -> None:
        self.errors.append(ConfigError(name, problem))

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.raw(name) or default
        if value not in choices:
            self.fail(name, f"{value!r} is not one of {', '.join(choices)}")
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        self.fail(name, f"{value!r} is not a boolean (use true or false)")
        return default

    def number(self, name: str, default: float, minimum: float, maximum: float, integer: bool = False):
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed = int(value) if integer else float(value)
        except ValueError:
            kind = "an integer" if integer else "a number"
            self.fail(name, f"{value!r} is not {kind}")
            return default
        if not (minimum <= parsed <= maximum):
            self.fail(name, f"{value} is outside the allowed range {minimum:g}..{maximum:g}")
            return default
        return parsed

    def size(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed = parse_size(value)
        except ValueError as e:
            self.fail(name, str(e))
            return default
        if not (minimum <= parsed <= maximum):
            self.fail(name, f"{value} is outside the allowed range {minimum}..{maximum} bytes")
            return default
        return parsed

    def secret(
        self, file_var: str, credential: str, inline_var: str | None = None, required: bool = False
    ) -> Secret | None:
        """A secret from <file_var>, else from $CREDENTIALS_DIRECTORY/<credential>."""
        path_text = self.raw(file_var)
        path = Path(path_text) if path_text else credential_path(credential, dict(self.values))
        if path is None:
            if inline_var and self.raw(inline_var):
                return Secret(self.raw(inline_var) or "")
            if required:
                self.fail(
                    file_var,
                    f"not set and no systemd credential {credential!r} was passed; put the secret in "
                    f"/etc/credstore/gighive-media-agent.{credential} (mode 0600; the units load it "
                    "with LoadCredential=), or name a file holding it",
                )
            return None
        try:
            return read_secret_file(path, file_var)
        except ConfigError as e:
            self.errors.append(e)
            return None


def _parse_roots(r: Reader) -> tuple[MediaRoot, ...]:
    text = r.raw("MEDIA_ROOTS")
    if text is None:
        r.fail("MEDIA_ROOTS", "not set; example: audio=/home/ubuntu/audio,video=/home/ubuntu/video")
        return ()
    ca_text = r.raw("MEDIA_CONTENT_ADDRESSED_ROOTS")
    ca_names = {"audio", "video"} if ca_text is None else {n.strip() for n in ca_text.split(",") if n.strip()}
    roots: list[MediaRoot] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, path_text = item.partition("=")
        name, path_text = name.strip(), path_text.strip()
        if not sep or not name or not path_text:
            r.fail("MEDIA_ROOTS", f"entry {item!r} is not name=/absolute/path")
            continue
        if not _ROOT_NAME_RE.match(name):
            r.fail("MEDIA_ROOTS", f"root name {name!r} must be lowercase letters, digits, '-' or '_'")
            continue
        path = Path(path_text)
        if not path.is_absolute():
            r.fail("MEDIA_ROOTS", f"path for {name!r} must be absolute, got {path_text!r}")
            continue
        if any(part in ("..", ".") for part in path.parts):
            r.fail("MEDIA_ROOTS", f"path for {name!r} must not contain '.' or '..'")
            continue
        if any(existing.name == name for existing in roots):
            r.fail("MEDIA_ROOTS", f"root name {name!r} appears twice")
            continue
        for existing in roots:
            if path == existing.path or path in existing.path.parents or existing.path in path.parents:
                r.fail("MEDIA_ROOTS", f"roots {existing.name!r} and {name!r} overlap ({existing.path}, {path})")
        roots.append(MediaRoot(name=name, path=path, content_addressed=name in ca_names))
    unknown = ca_names - {root.name for root in roots}
    if ca_text is not None and unknown:
        r.fail("MEDIA_CONTENT_ADDRESSED_ROOTS", f"names {sorted(unknown)} are not in MEDIA_ROOTS")
    if not roots and not any(e.variable == "MEDIA_ROOTS" for e in r.errors):
        r.fail("MEDIA_ROOTS", "no media roots given")
    return tuple(roots)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_endpoint(r: Reader, account: str | None, auth_mode: str) -> str | None:
    text = r.raw("AZURE_BLOB_ENDPOINT")
    if text is None:
        return f"https://{account}.blob.core.windows.net" if account else None
    parts = urlsplit(text)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("https", "http") or not host:
        r.fail("AZURE_BLOB_ENDPOINT", f"{text!r} is not an https:// URL")
        return None
    if ".privatelink." in f".{host}":
        public = host.replace(".privatelink.", ".", 1)
        r.fail(
            "AZURE_BLOB_ENDPOINT",
            f"{host} is the private DNS zone's name; the storage certificate is issued for "
            f"{public}, so TLS would fail with a name mismatch. Use https://{public}: the private "
            "DNS zone makes that name resolve to the Private Endpoint's address",
        )
        return None
    if parts.scheme == "http" and not _is_loopback(host):
        r.fail("AZURE_BLOB_ENDPOINT", "plain http is only allowed for a loopback emulator (Azurite)")
        return None
    if parts.scheme == "http" and auth_mode != "connection_string":
        r.fail("AZURE_BLOB_ENDPOINT", "bearer tokens (managed identity, service principal) need https")
        return None
    if parts.query or parts.fragment:
        r.fail("AZURE_BLOB_ENDPOINT", "must not carry a query string (no SAS tokens in the config)")
        return None
    return text.rstrip("/")


def _parse_mysql(r: Reader) -> MysqlConfig | None:
    host = r.raw("MYSQL_HOST")
    if host is None:
        for name in ("MYSQL_DATABASE", "MYSQL_USER", "MYSQL_PASSWORD_FILE"):
            if r.raw(name):
                r.fail("MYSQL_HOST", f"not set although {name} is; set MYSQL_HOST (e.g. 127.0.0.1) or drop {name}")
                break
        return None
    port = int(r.number("MYSQL_PORT", 3306, 1, 65535, integer=True))
    database = r.raw("MYSQL_DATABASE") or "media_db"
    if not re.match(r"^[A-Za-z0-9_$]{1,64}$", database):
        r.fail("MYSQL_DATABASE", f"{database!r} is not a plain MySQL database name")
    user = r.raw("MYSQL_USER")
    if user is None:
        r.fail("MYSQL_USER", "not set although MYSQL_HOST is")
        user = ""
    password = r.secret("MYSQL_PASSWORD_FILE", CRED_MYSQL_PASSWORD)
    timeout = float(r.number("MYSQL_CONNECT_TIMEOUT", 5.0, 0.5, 120.0))
    return MysqlConfig(host=host, port=port, database=database, user=user, password=password, connect_timeout=timeout)


def _check_config_file(path: Path, values: Mapping[str, str]) -> None:
    """A config file that holds a secret inline must not be world-readable."""
    st = path.stat()
    if st.st_mode & stat.S_IROTH and values.get("AZURE_STORAGE_CONNECTION_STRING", "").strip():
        raise ConfigError(
            "AZURE_STORAGE_CONNECTION_STRING",
            f"{path} holds an account key but is readable by other users; chmod o-rwx {path}, "
            "or move the connection string to AZURE_STORAGE_CONNECTION_STRING_FILE",
        )


def load(
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    explicit: bool = False,
) -> Config:
    """Read the config file (if any) and the environment; raise ConfigErrors listing every problem."""
    environ = dict(os.environ if environ is None else environ)
    path = config_path or Path(environ.get("GIGHIVE_MEDIA_CONFIG") or DEFAULT_CONFIG_PATH)
    explicit = explicit or config_path is not None or "GIGHIVE_MEDIA_CONFIG" in environ
    file_values: dict[str, str] = {}
    source: Path | None = None
    try:
        file_values = parse_env_file(path.read_text(encoding="utf-8"), origin=str(path))
        _check_config_file(path, file_values)
        source = path
    except FileNotFoundError:
        if explicit:
            raise ConfigErrors([ConfigError("--config", f"{path} does not exist")]) from None
    except PermissionError:
        raise ConfigErrors([ConfigError("--config", f"{path} is not readable by this user")]) from None
    except UnicodeDecodeError:
        raise ConfigErrors([ConfigError("--config", f"{path} is not UTF-8 text")]) from None
    except ConfigError as e:
        raise ConfigErrors([e]) from None

    # The environment wins: systemd's EnvironmentFile= has already put the same file there,
    # and an operator's one-off `FOO=bar gighive-media ...` should override the file.
    values = {**file_values, **environ}
    r = Reader(values)

    for name, alternative in FORBIDDEN_INLINE.items():
        if r.raw(name):
            r.fail(name, f"secrets are not read from variables; use {alternative}")

    backend = r.choice("MEDIA_STORAGE_BACKEND", BACKENDS, "local")
    roots = _parse_roots(r)
    state_text = r.raw("STATE_DIRECTORY") or r.raw("GIGHIVE_MEDIA_STATE_DIR")
    # systemd may pass several colon-separated directories; the first is ours.
    state_dir = Path(state_text.split(":")[0]) if state_text else DEFAULT_STATE_DIR
    if not state_dir.is_absolute():
        r.fail("STATE_DIRECTORY", f"must be an absolute path, got {state_text!r}")

    kwargs: dict[str, object] = {}
    auth_mode = r.choice("AZURE_AUTH_MODE", AUTH_MODES, "managed_identity")
    account = r.raw("AZURE_STORAGE_ACCOUNT_NAME")
    container = r.raw("AZURE_STORAGE_CONTAINER_NAME")
    connection_string: Secret | None = None
    if backend == "azure_blob":
        if auth_mode == "connection_string":
            connection_string = r.secret(
                "AZURE_STORAGE_CONNECTION_STRING_FILE",
                CRED_CONNECTION_STRING,
                inline_var="AZURE_STORAGE_CONNECTION_STRING",
            )
            if connection_string is None and not any(
                e.variable == "AZURE_STORAGE_CONNECTION_STRING_FILE" for e in r.errors
            ):
                r.fail(
                    "AZURE_STORAGE_CONNECTION_STRING",
                    "AZURE_AUTH_MODE=connection_string needs AZURE_STORAGE_CONNECTION_STRING "
                    "or AZURE_STORAGE_CONNECTION_STRING_FILE",
                )
            if connection_string is not None:
                parts = _connection_string_parts(connection_string.reveal())
                account = account or parts.get("accountname")
                if not r.raw("AZURE_BLOB_ENDPOINT") and parts.get("blobendpoint"):
                    kwargs["endpoint"] = parts["blobendpoint"].rstrip("/")
        elif account is None:
            r.fail("AZURE_STORAGE_ACCOUNT_NAME", "not set; it is required when MEDIA_STORAGE_BACKEND=azure_blob")
        if account is not None and not _ACCOUNT_RE.match(account):
            r.fail(
                "AZURE_STORAGE_ACCOUNT_NAME",
                f"{account!r} is not a storage account name (3-24 lowercase letters/digits)",
            )
        if container is None:
            r.fail("AZURE_STORAGE_CONTAINER_NAME", "not set; it is required when MEDIA_STORAGE_BACKEND=azure_blob")
        elif not _CONTAINER_RE.match(container):
            r.fail(
                "AZURE_STORAGE_CONTAINER_NAME",
                f"{container!r} is not a container name (3-63 of a-z, 0-9 and single '-', starting "
                "and ending with a letter or digit)",
            )
        endpoint = kwargs.pop("endpoint", None) or _parse_endpoint(r, account, auth_mode)
        client_id = r.raw("AZURE_CLIENT_ID")
        tenant_id = r.raw("AZURE_TENANT_ID")
        if client_id is not None and not _GUID_RE.match(client_id):
            r.fail("AZURE_CLIENT_ID", f"{client_id!r} is not a GUID")
        if tenant_id is not None and not _GUID_RE.match(tenant_id):
            r.fail("AZURE_TENANT_ID", f"{tenant_id!r} is not a GUID")
        if auth_mode == "service_principal":
            if client_id is None:
                r.fail("AZURE_CLIENT_ID", "the service principal's application (client) id is required")
            if tenant_id is None:
                r.fail("AZURE_TENANT_ID", "required for AZURE_AUTH_MODE=service_principal")
            cert_text = r.raw("AZURE_CLIENT_CERTIFICATE_FILE")
            cert = Path(cert_text) if cert_text else credential_path(CRED_CLIENT_CERTIFICATE, values)
            if cert is not None:
                try:
                    check_private_file(cert, "AZURE_CLIENT_CERTIFICATE_FILE")
                    kwargs["client_certificate_path"] = cert
                except ConfigError as e:
                    r.errors.append(e)
            else:
                kwargs["client_secret"] = r.secret("AZURE_CLIENT_SECRET_FILE", CRED_CLIENT_SECRET, required=True)
        authority = r.raw("AZURE_AUTHORITY_HOST")
        if authority is not None and urlsplit(authority).scheme != "https":
            r.fail("AZURE_AUTHORITY_HOST", f"{authority!r} must be an https:// URL")
        ca_text = r.raw("AZURE_CA_BUNDLE")
        if ca_text is not None and not Path(ca_text).is_file():
            r.fail("AZURE_CA_BUNDLE", f"{ca_text} is not a file")
        kwargs.update(
            endpoint=endpoint,
            client_id=client_id,
            tenant_id=tenant_id,
            authority_host=authority,
            ca_bundle=Path(ca_text) if ca_text else None,
        )

    mysql = _parse_mysql(r)
    retry = RetryPolicy(
        max_attempts=int(r.number("RETRY_MAX_ATTEMPTS", 12, 1, 1000, integer=True)),
        base_delay=float(r.number("RETRY_BASE_DELAY", 60.0, 0.0, 86400.0)),
        max_delay=float(r.number("RETRY_MAX_DELAY", 6 * 3600.0, 0.0, 7 * 86400.0)),
    )
    if retry.max_delay < retry.base_delay:
        r.fail("RETRY_MAX_DELAY", f"{retry.max_delay:g} is below RETRY_BASE_DELAY ({retry.base_delay:g})")

    level = (r.raw("LOG_LEVEL") or "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        r.fail("LOG_LEVEL", f"{level!r} is not one of debug, info, warning, error")
        level = "info"

    num: Callable[..., float] = r.number
    config = Config(
        backend=backend,
        roots=roots,
        state_dir=state_dir,
        account_name=account,
        container=container,
        auth_mode=auth_mode,
        connection_string=connection_string,
        credential_timeout=float(num("AZURE_CREDENTIAL_TIMEOUT", 10.0, 1.0, 300.0)),
        # 90 s: IMDS answers 410 for up to 70 s while it updates, and azure-identity's retries
        # for it need that long (docs/azure-infrastructure.md, "IMDS").
        credential_retry_timeout=float(num("AZURE_CREDENTIAL_RETRY_TIMEOUT", 90.0, 1.0, 900.0)),
        network_timeout=float(num("AZURE_NETWORK_TIMEOUT", 30.0, 1.0, 600.0)),
        delete_local=r.boolean("DELETE_LOCAL_AFTER_UPLOAD", False),
        evict_min_age_days=float(r.number("EVICT_MIN_AGE_DAYS", 7.0, 0.0, 36500.0)),
        evict_above_disk_percent=float(r.number("EVICT_ABOVE_DISK_PERCENT", 0.0, 0.0, 99.0)),
        evict_wait_for_gighive=r.boolean("EVICT_WAIT_FOR_GIGHIVE", True),
        purge_deleted_after_days=float(r.number("PURGE_DELETED_AFTER_DAYS", 30.0, 0.0, 36500.0)),
        mysql=mysql,
        retry=retry,
        block_size=r.size("UPLOAD_BLOCK_SIZE", 8 * 1024 * 1024, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE),
        block_concurrency=int(num("UPLOAD_BLOCK_CONCURRENCY", 4, 1, 64, integer=True)),
        file_concurrency=int(num("UPLOAD_FILE_CONCURRENCY", 4, 1, 64, integer=True)),
        bandwidth_limit=r.size("UPLOAD_BANDWIDTH_LIMIT", 0, 0, 100 * 1024**3),
        settle_seconds=float(num("UPLOAD_SETTLE_SECONDS", 5.0, 0.0, 3600.0)),
        idle_exit_seconds=float(num("UPLOAD_IDLE_EXIT_SECONDS", 60.0, 0.0, 86400.0)),
        verify_readback=r.boolean("UPLOAD_VERIFY_READBACK", False),
        log_level=level,
        source=source,
        values=values,
        **kwargs,  # type: ignore[arg-type]
    )
    if config.bandwidth_limit and config.bandwidth_limit < 16 * 1024:
        r.fail("UPLOAD_BANDWIDTH_LIMIT", "below 16KiB/s uploads cannot finish a block before Azure times out")
    if r.errors:
        if source is None and not explicit:
            r.errors.append(ConfigError("--config", f"note: {path} does not exist, only the environment was read"))
        raise ConfigErrors(r.errors)
    return config


def _connection_string_parts(text: str) -> dict[str, str]:
    """Key=value pairs of a storage connection string, keys lowercased (values may hold '=')."""
    parts = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            parts[key.strip().lower()] = value.strip()
    return parts
