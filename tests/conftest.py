"""Shared fixtures: real loopback services (Azurite, MariaDB, token endpoints) for the whole suite.

Session services are started on first use and stopped at the end (also on failure; see
tests/support/_proc.py for the SIGKILL-safe backstop). A test may stop or kill a session service to
simulate an outage; the next test gets it running again on the same port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient

from tests.support.azurite import Azurite
from tests.support.mariadb import MariaDB
from tests.support.media import make_media_roots
from tests.support.tls import TLSFiles, make_tls
from tests.support.tokens import TokenServer


def _keep_loopback_off_proxies() -> None:
    # A CI proxy must never see (or break) traffic to the loopback services.
    for var in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in os.environ.get(var, "").split(",") if h]
        for h in ("127.0.0.1", "localhost"):
            if h not in hosts:
                hosts.append(h)
        os.environ[var] = ",".join(hosts)


_keep_loopback_off_proxies()


def _children_hear_ctrl_c() -> None:
    # A launcher that started the suite in the background (`cmd &` in a script, some CI runners)
    # leaves SIGINT ignored, and an ignored signal stays ignored across exec: every agent the
    # tests start would then ignore a Ctrl-C that lands before its own handler is installed, as
    # no terminal user's agent does. A handler (not SIG_IGN) here gives each child the default.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_children_hear_ctrl_c()

# Session services that the per-test guard keeps healthy.
_azurites: list[Azurite] = []
_mariadbs: list[MariaDB] = []
_token_servers: list[TokenServer] = []


@pytest.fixture(autouse=True)
def _session_services_ready() -> Iterator[None]:
    """Undo what an earlier test did to shared services: restart what it stopped or killed, forget
    recorded token requests and injected failures. Afterwards, fail the test if the strict-Azure
    gate refused a request it did not expect: real Azure would have refused it too, and the
    agent's retries must not hide that."""
    for a in _azurites:
        a.resume()
        if not a.running:
            a.start()
        if a.gate is not None:
            a.gate.take_unexpected()
    for m in _mariadbs:
        if not m.running:
            m.start()
    for t in _token_servers:
        t.reset()
    yield
    refused = [r for a in _azurites if a.gate is not None for r in a.gate.take_unexpected()]
    if refused:
        lines = "\n  ".join(str(r) for r in refused[:20])
        pytest.fail(
            f"the strict-Azure gate refused {len(refused)} request(s) real Azure would refuse "
            f"(docs/azure-conformance.md):\n  {lines}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """Throwaway CA + server cert for 127.0.0.1/localhost + client cert (see tests/support/tls.py)."""
    return make_tls(tmp_path_factory.mktemp("tls"))


def _gated(a: Azurite) -> Iterator[Azurite]:
    """Start an Azurite behind the strict-Azure gate, register it for the gate's end-of-session
    report, and stop both at the end."""
    try:
        a.start()
        a.attach_gate()
        _azurites.append(a)
        yield a
    finally:
        if a in _azurites:
            _azurites.remove(a)
        a.close_gate()
        a.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite blob service over HTTP, SharedKey auth (connection_string), behind the strict-Azure
    gate: its port, blob_endpoint and connection_string are the gate's (a.gate; direct_* bypass it)."""
    yield from _gated(Azurite(tmp_path_factory.mktemp("azurite")))


@pytest.fixture(scope="session")
def azurite_oauth(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> Iterator[Azurite]:
    """Azurite over HTTPS (certificate signed by tls.ca) accepting bearer tokens (--oauth basic)
    as well as the dev key, behind the strict-Azure gate (HTTPS too, same certificate)."""
    yield from _gated(
        Azurite(tmp_path_factory.mktemp("azurite-oauth"), https=True, cert=tls.cert, key=tls.key, oauth=True)
    )


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    """mariadbd with database media_db, user gighive (random password) and GigHive's assets table."""
    m = MariaDB(tmp_path_factory.mktemp("mariadb"))
    try:
        m.start()
        _mariadbs.append(m)
        yield m
    finally:
        if m in _mariadbs:
            _mariadbs.remove(m)
        m.cleanup()


@pytest.fixture
def media_db(mariadb: MariaDB) -> MariaDB:
    """The session MariaDB with media_db dropped and recreated (only the assets table, no rows)."""
    mariadb.reset_database()
    return mariadb


@pytest.fixture(scope="session")
def token_server() -> Iterator[TokenServer]:
    """HTTP token endpoint for managed identity: set AZURE_POD_IDENTITY_AUTHORITY_HOST=token_server.url.
    Requests and failure injections are reset before every test."""
    t = TokenServer()
    try:
        t.start()
        _token_servers.append(t)
        yield t
    finally:
        if t in _token_servers:
            _token_servers.remove(t)
        t.stop()


@pytest.fixture(scope="session")
def token_server_https(tls: TLSFiles) -> Iterator[TokenServer]:
    """HTTPS Entra-like endpoint for service principals: authority=token_server_https.url,
    tenant token_server_https.tenant_id, connection_verify=str(tls.ca). Register clients with
    add_client(). Requests and failure injections are reset before every test."""
    t = TokenServer(certfile=tls.cert, keyfile=tls.key)
    try:
        t.start()
        _token_servers.append(t)
        yield t
    finally:
        if t in _token_servers:
            _token_servers.remove(t)
        t.stop()


@pytest.fixture
def azurite_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Azurite]]:
    """Private Azurite instances for tests that break them; stopped at teardown.
    Call as azurite_factory() or azurite_factory(https=True, oauth=True) (uses the tls fixture)."""
    made: list[Azurite] = []

    def make(*, https: bool = False, oauth: bool = False, **kw: object) -> Azurite:
        if https and "cert" not in kw:
            files: TLSFiles = request.getfixturevalue("tls")
            kw.update(cert=files.cert, key=files.key)
        a = Azurite(tmp_path / f"azurite-{len(made)}", https=https, oauth=oauth, **kw)  # type: ignore[arg-type]
        made.append(a)
        return a.start()

    try:
        yield make
    finally:
        for a in made:
            a.stop()


def unique_name(prefix: str = "t") -> str:
    """A valid, unique container name (3-63 chars, lower case, digits and dashes)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@pytest.fixture
def blob_container(azurite: Azurite) -> Iterator[ContainerClient]:
    """A fresh, uniquely named container in the session Azurite (dev-key auth)."""
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = service.create_container(unique_name())
    try:
        yield container
    finally:
        # Best effort: the test may have killed Azurite; a throwaway emulator needs no cleanup then.
        azurite.resume()
        with contextlib.suppress(Exception):
            service = BlobServiceClient.from_connection_string(azurite.connection_string, retry_total=0)
            service.delete_container(container.container_name)


@pytest.fixture
def media_roots(tmp_path: Path) -> dict[str, Path]:
    """GigHive's media library layout: {"root", "audio", "video", "thumbnails"} directories."""
    return make_media_roots(tmp_path / "media")
