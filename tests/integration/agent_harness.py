"""Running the agent against the test services: a config file per test, in-process or as a CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from azure.storage.blob import BlobServiceClient, ContainerClient

from agent.config import Config, load

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Harness:
    tmp: Path
    roots: dict[str, Path]
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    @property
    def config_path(self) -> Path:
        return self.tmp / "agent.env"

    def write_config(self, **overrides: str) -> Path:
        self.settings.update(overrides)
        lines = [f'{k}="{v}"' if ";" in v or " " in v else f"{k}={v}" for k, v in self.settings.items() if v != ""]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.config_path.chmod(0o600)
        return self.config_path

    def config(self, **overrides: str) -> Config:
        self.write_config(**overrides)
        # An explicit, minimal environment: the test process's own variables must not leak in.
        env = {k: v for k, v in os.environ.items() if k in ("AZURE_POD_IDENTITY_AUTHORITY_HOST",)}
        return load(self.config_path, environ=env)

    def cli(self, *args: str, timeout: float = 600, check: bool = False, **popen) -> subprocess.CompletedProcess:
        # The timeout only stops a hang: a run on a loaded 2-core machine may take minutes.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "UPLOAD_"))}
        env.pop("JOURNAL_STREAM", None)
        env.update(popen.pop("env", {}))
        proc = subprocess.run(
            [sys.executable, "-m", "agent", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=env,
            **popen,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}")
        return proc

    def cli_json(self, *args: str, **kw) -> dict:
        proc = self.cli(*args, "--json", **kw)
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError as e:
            raise AssertionError(f"not JSON (exit {proc.returncode}): {proc.stdout}\n{proc.stderr}") from e

    def spawn(self, *args: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "UPLOAD_"))}
        env.pop("JOURNAL_STREAM", None)
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(self.config_path), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )


def connection_string_settings(connection_string: str, container: str, roots: dict[str, Path], state: Path) -> dict:
    return {
        "MEDIA_STORAGE_BACKEND": "azure_blob",
        "AZURE_AUTH_MODE": "connection_string",
        "AZURE_STORAGE_CONNECTION_STRING": connection_string,
        "AZURE_STORAGE_CONTAINER_NAME": container,
        "MEDIA_ROOTS": f"audio={roots['audio']},video={roots['video']}",
        "GIGHIVE_MEDIA_STATE_DIR": str(state),
        "UPLOAD_SETTLE_SECONDS": "0",
        "UPLOAD_IDLE_EXIT_SECONDS": "0",
        "UPLOAD_BLOCK_SIZE": "256KiB",
        "RETRY_BASE_DELAY": "0",
        "RETRY_MAX_DELAY": "0",
        # Test files are minutes old; the eviction policy's age is tested on its own.
        "EVICT_MIN_AGE_DAYS": "0",
    }


def blob_bytes(container: ContainerClient, name: str) -> bytes:
    return container.get_blob_client(name).download_blob().readall()


def blob_names(container: ContainerClient) -> set[str]:
    return {b.name for b in container.list_blobs()}


def container_client(connection_string: str, name: str) -> ContainerClient:
    return BlobServiceClient.from_connection_string(connection_string, retry_total=0).get_container_client(name)
