"""Fixtures for the fault suite: the agent talking to Azurite through a fault proxy, GigHive's
MySQL (MariaDB) as the DB pointer, and helpers that check what ended up where."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient

from agent.pointer import TABLE
from agent.state import FileRecord, StateStore
from tests.faults.faultproxy import FaultProxy
from tests.integration.agent_harness import Harness, connection_string_settings

# The integration suite's agent fixtures, shared rather than copied.
from tests.integration.conftest import harness, private_harness  # noqa: F401
from tests.support.azurite import ACCOUNT_KEY, ACCOUNT_NAME


def proxied_connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT_NAME};"
    )


@pytest.fixture
def proxy(azurite) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session Azurite."""
    with FaultProxy(azurite.host, azurite.port) as p:
        yield p


@pytest.fixture
def fault_harness(tmp_path, proxy, blob_container, media_roots) -> Harness:
    """The agent configured to reach the session Azurite through `proxy` (a fresh container), with
    short backoff so retries run within the test. The network timeout is generous: a loaded
    machine's Azurite can be slow, and the tests that black-hole the link set a short one."""
    h = Harness(tmp_path, media_roots)
    h.settings = connection_string_settings(
        proxied_connection_string(proxy.port), blob_container.container_name, media_roots, h.state_dir
    )
    h.settings.update(RETRY_BASE_DELAY="0.2", RETRY_MAX_DELAY="1", RETRY_MAX_ATTEMPTS="8", AZURE_NETWORK_TIMEOUT="30")
    h.write_config()
    return h


def with_mysql(h: Harness, db, tmp_path: Path) -> Harness:
    h.write_config(
        MYSQL_HOST=db.host,
        MYSQL_PORT=str(db.port),
        MYSQL_DATABASE=db.database,
        MYSQL_USER=db.user,
        MYSQL_PASSWORD_FILE=str(db.password_file(tmp_path / "mysql-password")),
        MYSQL_CONNECT_TIMEOUT="2",
    )
    h.cli("db-migrate", check=True)
    return h


def records(h: Harness) -> dict[str, FileRecord]:
    s = StateStore.open(h.state_dir)
    try:
        return {
            r.blob_name: r
            for r in s.in_state("pending", "uploading", "uploaded", "failed", "dead", "quarantined", "evicted")
        }
    finally:
        s.close()


def pointer_rows(db) -> dict[str, dict]:
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT media_path, provider, etag, size_bytes, content_sha256, local_copy FROM {TABLE}")
            cols = [d[0] for d in cur.description]
            return {r[0]: dict(zip(cols, r, strict=True)) for r in cur.fetchall()}
    finally:
        conn.close()


def assert_blobs_identical(container: ContainerClient, expected: dict[str, bytes]) -> None:
    """Every expected blob is there and byte-identical (downloaded, not just its properties)."""
    names = {b.name for b in container.list_blobs()}
    assert names == set(expected), f"missing {set(expected) - names}, extra {names - set(expected)}"
    for name, data in expected.items():
        got = container.get_blob_client(name).download_blob().readall()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), f"{name} differs"


@dataclass
class BlobWatcher:
    """Lists the container (directly, not through the proxy) in a loop while uploads run and
    records any blob whose listed size is not its file's size: a partial blob made visible."""

    container: ContainerClient
    sizes: dict[str, int]
    listings: int = 0
    sightings: int = 0
    bad: list[tuple[str, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            for b in self.container.list_blobs():
                self.sightings += 1
                if self.sizes.get(b.name) != b.size:
                    self.bad.append((b.name, b.size))
            self.listings += 1
            self._stop.wait(0.05)

    def __enter__(self) -> BlobWatcher:
        self._thread = threading.Thread(target=self._run, name="blob-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)


def direct_container(azurite, name: str) -> ContainerClient:
    return BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(name)
