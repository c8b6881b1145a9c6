"""Configuration: every bad value is named, secrets come from private files only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load, parse_env_file
from agent.errors import ConfigError, ConfigErrors

GUID = "11111111-2222-3333-4444-555555555555"


def base(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "MEDIA_STORAGE_BACKEND": "azure_blob",
        "AZURE_STORAGE_ACCOUNT_NAME": "gighivemedia",
        "AZURE_STORAGE_CONTAINER_NAME": "media",
        "MEDIA_ROOTS": f"audio={tmp_path}/audio,video={tmp_path}/video",
        "GIGHIVE_MEDIA_STATE_DIR": str(tmp_path / "state"),
    }
    env.update(extra)
    return env


def errors_of(tmp_path: Path, **extra: str) -> dict[str, str]:
    with pytest.raises(ConfigErrors) as info:
        load(empty_config(tmp_path), environ=base(tmp_path, **extra))
    return {e.variable: e.problem for e in info.value.errors}


def empty_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "empty.env"
    cfg.write_text("")
    cfg.chmod(0o600)
    return cfg


def load_env(tmp_path: Path, **extra: str):
    return load(empty_config(tmp_path), environ=base(tmp_path, **extra))


def private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_minimal_managed_identity_config_uses_the_account_host_name(tmp_path):
    cfg = load_env(tmp_path)
    assert cfg.is_azure
    assert cfg.endpoint == "https://gighivemedia.blob.core.windows.net"
    assert cfg.auth_mode == "managed_identity"
    assert [r.name for r in cfg.roots] == ["audio", "video"]
    assert all(r.content_addressed for r in cfg.roots)
    assert cfg.delete_local is False
    assert cfg.mysql is None
    assert cfg.state_dir == tmp_path / "state"


def test_local_backend_is_the_default_and_needs_no_azure_settings(tmp_path):
    env = {"MEDIA_ROOTS": f"audio={tmp_path}/a"}
    cfg = load(empty_config(tmp_path), environ=env)
    assert cfg.backend == "local"
    assert cfg.state_dir == Path("/var/lib/gighive-media-agent")


def test_systemd_state_directory_wins(tmp_path):
    cfg = load_env(tmp_path, STATE_DIRECTORY=f"{tmp_path}/sd:{tmp_path}/other")
    assert cfg.state_dir == tmp_path / "sd"


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("MEDIA_STORAGE_BACKEND", "s3", "not one of local, azure_blob"),
        ("AZURE_AUTH_MODE", "password", "not one of"),
        ("AZURE_STORAGE_ACCOUNT_NAME", "Bad_Name", "not a storage account name"),
        ("AZURE_STORAGE_CONTAINER_NAME", "a--b", "not a container name"),
        ("AZURE_STORAGE_CONTAINER_NAME", "UPPER", "not a container name"),
        ("AZURE_CLIENT_ID", "not-a-guid", "not a GUID"),
        ("DELETE_LOCAL_AFTER_UPLOAD", "maybe", "not a boolean"),
        ("UPLOAD_BLOCK_SIZE", "lots", "not a size"),
        ("UPLOAD_BLOCK_SIZE", "1K", "outside the allowed range"),
        ("UPLOAD_BLOCK_CONCURRENCY", "0", "outside the allowed range"),
        ("UPLOAD_FILE_CONCURRENCY", "four", "not an integer"),
        ("RETRY_MAX_ATTEMPTS", "-1", "outside the allowed range"),
        ("RETRY_BASE_DELAY", "soon", "not a number"),
        ("UPLOAD_BANDWIDTH_LIMIT", "1K", "16KiB/s"),
        ("LOG_LEVEL", "loud", "not one of"),
        ("AZURE_BLOB_ENDPOINT", "ftp://x", "not an https:// URL"),
        ("AZURE_BLOB_ENDPOINT", "http://gighivemedia.blob.core.windows.net", "only allowed for a loopback"),
        ("AZURE_BLOB_ENDPOINT", "https://gighivemedia.blob.core.windows.net/?sv=x", "no SAS"),
        ("MEDIA_ROOTS", "audio=relative/path", "must be absolute"),
        ("MEDIA_ROOTS", "audio", "not name=/absolute/path"),
        ("MEDIA_ROOTS", "Audio=/srv/a", "lowercase"),
        ("MEDIA_ROOTS", "audio=/srv/a,video=/srv/a/v", "overlap"),
        ("MEDIA_ROOTS", "audio=/srv/a,audio=/srv/b", "appears twice"),
        ("MEDIA_CONTENT_ADDRESSED_ROOTS", "audio,movies", "not in MEDIA_ROOTS"),
        ("MYSQL_DATABASE", "media_db", "MYSQL_HOST"),
    ],
)
def test_each_bad_value_is_reported_by_name(tmp_path, variable, value, fragment):
    problems = errors_of(tmp_path, **{variable: value})
    text = " | ".join(f"{k}: {v}" for k, v in problems.items())
    assert fragment in text
    # The message names the variable that is wrong (MYSQL_* names the missing partner).
    assert variable in problems or "MYSQL_HOST" in problems


def test_all_problems_are_reported_at_once(tmp_path):
    problems = errors_of(
        tmp_path, AZURE_STORAGE_ACCOUNT_NAME="X", AZURE_STORAGE_CONTAINER_NAME="Y", UPLOAD_BLOCK_SIZE="z"
    )
    assert {"AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_CONTAINER_NAME", "UPLOAD_BLOCK_SIZE"} <= set(problems)


def test_missing_required_values_are_named(tmp_path):
    env = base(tmp_path)
    del env["AZURE_STORAGE_ACCOUNT_NAME"], env["AZURE_STORAGE_CONTAINER_NAME"], env["MEDIA_ROOTS"]
    with pytest.raises(ConfigErrors) as info:
        load(empty_config(tmp_path), environ=env)
    names = {e.variable for e in info.value.errors}
    assert {"AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_CONTAINER_NAME", "MEDIA_ROOTS"} <= names


def test_privatelink_host_is_refused_with_the_reason(tmp_path):
    problems = errors_of(tmp_path, AZURE_BLOB_ENDPOINT="https://gighivemedia.privatelink.blob.core.windows.net")
    msg = problems["AZURE_BLOB_ENDPOINT"]
    assert "name mismatch" in msg
    assert "https://gighivemedia.blob.core.windows.net" in msg


def test_service_principal_needs_tenant_client_and_a_secret_file(tmp_path):
    problems = errors_of(tmp_path, AZURE_AUTH_MODE="service_principal")
    assert "AZURE_TENANT_ID" in problems
    assert "AZURE_CLIENT_ID" in problems
    assert "AZURE_CLIENT_SECRET_FILE" in problems


def test_service_principal_secret_comes_from_the_systemd_credential(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    private_file(creds / "azure-client-secret", "s3cr3t-value\n", 0o400)
    cfg = load_env(
        tmp_path,
        AZURE_AUTH_MODE="service_principal",
        AZURE_TENANT_ID=GUID,
        AZURE_CLIENT_ID=GUID,
        CREDENTIALS_DIRECTORY=str(creds),
    )
    assert cfg.client_secret is not None
    assert cfg.client_secret.reveal() == "s3cr3t-value"
    # The secret never shows in the object's printed form or in the status summary.
    assert "s3cr3t" not in repr(cfg)
    assert "s3cr3t" not in str(cfg.summary())


def test_world_readable_secret_file_is_refused(tmp_path):
    secret = private_file(tmp_path / "sp.secret", "hunter2", 0o644)
    problems = errors_of(
        tmp_path,
        AZURE_AUTH_MODE="service_principal",
        AZURE_TENANT_ID=GUID,
        AZURE_CLIENT_ID=GUID,
        AZURE_CLIENT_SECRET_FILE=str(secret),
    )
    assert "readable or writable by other users" in problems["AZURE_CLIENT_SECRET_FILE"]
    assert "chmod o-rwx" in problems["AZURE_CLIENT_SECRET_FILE"]


def test_group_readable_secret_file_is_accepted(tmp_path):
    secret = private_file(tmp_path / "sp.secret", "hunter2", 0o640)
    cfg = load_env(
        tmp_path,
        AZURE_AUTH_MODE="service_principal",
        AZURE_TENANT_ID=GUID,
        AZURE_CLIENT_ID=GUID,
        AZURE_CLIENT_SECRET_FILE=str(secret),
    )
    assert cfg.client_secret.reveal() == "hunter2"


def test_certificate_file_is_preferred_and_must_be_private(tmp_path):
    cert = private_file(tmp_path / "sp.pem", "-----BEGIN PRIVATE KEY-----\n", 0o604)
    problems = errors_of(
        tmp_path,
        AZURE_AUTH_MODE="service_principal",
        AZURE_TENANT_ID=GUID,
        AZURE_CLIENT_ID=GUID,
        AZURE_CLIENT_CERTIFICATE_FILE=str(cert),
    )
    assert "AZURE_CLIENT_CERTIFICATE_FILE" in problems


def test_inline_secrets_in_variables_are_refused(tmp_path):
    problems = errors_of(tmp_path, AZURE_CLIENT_SECRET="hunter2", MYSQL_PASSWORD="pw")
    assert "AZURE_CLIENT_SECRET_FILE" in problems["AZURE_CLIENT_SECRET"]
    assert "MYSQL_PASSWORD_FILE" in problems["MYSQL_PASSWORD"]
    assert "hunter2" not in str(problems)


def test_empty_secret_file_is_refused(tmp_path):
    pw = private_file(tmp_path / "pw", "\n")
    problems = errors_of(tmp_path, MYSQL_HOST="127.0.0.1", MYSQL_USER="gighive", MYSQL_PASSWORD_FILE=str(pw))
    assert "is empty" in problems["MYSQL_PASSWORD_FILE"]


def test_mysql_settings(tmp_path):
    pw = private_file(tmp_path / "pw", "dbpass\n")
    cfg = load_env(
        tmp_path, MYSQL_HOST="127.0.0.1", MYSQL_PORT="3307", MYSQL_USER="gighive", MYSQL_PASSWORD_FILE=str(pw)
    )
    assert cfg.mysql is not None
    assert (cfg.mysql.host, cfg.mysql.port, cfg.mysql.database, cfg.mysql.user) == (
        "127.0.0.1",
        3307,
        "media_db",
        "gighive",
    )
    assert cfg.mysql.password.reveal() == "dbpass"
    assert "dbpass" not in str(cfg.summary())


def test_connection_string_mode_takes_account_and_endpoint_from_the_string(tmp_path):
    env = base(tmp_path, AZURE_AUTH_MODE="connection_string")
    del env["AZURE_STORAGE_ACCOUNT_NAME"]
    env["AZURE_STORAGE_CONNECTION_STRING"] = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
        "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
    )
    cfg = load(empty_config(tmp_path), environ=env)
    assert cfg.account_name == "devstoreaccount1"
    assert cfg.endpoint == "http://127.0.0.1:10000/devstoreaccount1"
    assert "a2V5" not in str(cfg.summary())


def test_connection_string_mode_without_a_string_is_named(tmp_path):
    problems = errors_of(tmp_path, AZURE_AUTH_MODE="connection_string")
    assert "AZURE_STORAGE_CONNECTION_STRING" in problems


def test_world_readable_config_file_with_an_account_key_is_refused(tmp_path):
    cfg = tmp_path / "agent.env"
    cfg.write_text('AZURE_STORAGE_CONNECTION_STRING="AccountName=a;AccountKey=k"\n')
    cfg.chmod(0o644)
    with pytest.raises(ConfigErrors) as info:
        load(cfg, environ=base(tmp_path, AZURE_AUTH_MODE="connection_string"))
    assert info.value.errors[0].variable == "AZURE_STORAGE_CONNECTION_STRING"


def test_environment_overrides_the_file(tmp_path):
    cfg = tmp_path / "agent.env"
    cfg.write_text("UPLOAD_BLOCK_CONCURRENCY=2\nDELETE_LOCAL_AFTER_UPLOAD=yes\n")
    loaded = load(cfg, environ=base(tmp_path, UPLOAD_BLOCK_CONCURRENCY="8"))
    assert loaded.block_concurrency == 8
    assert loaded.delete_local is True


def test_sizes_accept_binary_suffixes(tmp_path):
    assert load_env(tmp_path, UPLOAD_BLOCK_SIZE="16MiB").block_size == 16 * 1024 * 1024
    assert load_env(tmp_path, UPLOAD_BLOCK_SIZE="512k").block_size == 512 * 1024
    assert load_env(tmp_path, UPLOAD_BANDWIDTH_LIMIT="2M").bandwidth_limit == 2 * 1024 * 1024


def test_env_file_syntax():
    values = parse_env_file(
        '# comment\n; also a comment\n\nA=1\nexport B = two words\nC="quoted \\"x\\""\nD=\'single\'\n'
    )
    assert values == {"A": "1", "B": "two words", "C": 'quoted "x"', "D": "single"}


def test_env_file_garbage_line_is_an_error_with_its_line_number():
    with pytest.raises(ConfigError) as info:
        parse_env_file("A=1\nthis is not valid\n", origin="agent.env")
    assert info.value.variable == "agent.env:2"


def test_cli_exits_78_and_names_the_variable(tmp_path):
    cfg = tmp_path / "agent.env"
    cfg.write_text(
        f"MEDIA_STORAGE_BACKEND=azure_blob\nAZURE_STORAGE_ACCOUNT_NAME=NOPE\nAZURE_STORAGE_CONTAINER_NAME=media\n"
        f"MEDIA_ROOTS=audio={tmp_path}\n"
    )
    cfg.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(cfg), "upload"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 78
    assert "AZURE_STORAGE_ACCOUNT_NAME" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_explicit_config_file_exits_78(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(tmp_path / "nope.env"), "status"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 78
    assert "does not exist" in proc.stderr


def test_shipped_example_config_is_valid(tmp_path):
    example = Path(__file__).resolve().parents[2] / "docs" / "agent.env.example"
    cfg = tmp_path / "agent.env"
    cfg.write_text(example.read_text())
    cfg.chmod(0o640)
    assert load(cfg, environ={}).backend == "local"
    # Switching the backend on is the only change an Azure VM with a managed identity needs.
    assert load(cfg, environ={"MEDIA_STORAGE_BACKEND": "azure_blob"}).auth_mode == "managed_identity"


@pytest.mark.parametrize("command", ["upload", "retry", "status", "requeue", "db-migrate"])
def test_every_command_has_help(command):
    proc = subprocess.run([sys.executable, "-m", "agent", command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--config" in proc.stdout and "--json" in proc.stdout
