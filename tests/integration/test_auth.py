"""Azure identity paths, through the real azure-identity credentials, against Azurite over HTTPS
with --oauth basic and a loopback token endpoint."""

from __future__ import annotations

import uuid

import pytest
from azure.storage.blob import BlobServiceClient

from agent.actions import upload
from tests.integration.agent_harness import Harness
from tests.support.media import make_content_addressed

# Any of these would make ManagedIdentityCredential pick another source than IMDS.
_OTHER_MI_SOURCES = (
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IMDS_ENDPOINT",
    "AZURE_FEDERATED_TOKEN_FILE",
    "IDENTITY_SERVER_THUMBPRINT",
)


@pytest.fixture
def oauth_container(azurite_oauth, tls):
    name = f"auth-{uuid.uuid4().hex[:12]}"
    BlobServiceClient.from_connection_string(
        azurite_oauth.connection_string, connection_verify=str(tls.ca)
    ).create_container(name)
    return name


def oauth_harness(tmp_path, media_roots, azurite_oauth, tls, container, **settings) -> Harness:
    h = Harness(tmp_path, media_roots)
    h.settings = {
        "MEDIA_STORAGE_BACKEND": "azure_blob",
        "AZURE_STORAGE_ACCOUNT_NAME": "devstoreaccount1",
        "AZURE_STORAGE_CONTAINER_NAME": container,
        "AZURE_BLOB_ENDPOINT": azurite_oauth.blob_endpoint,
        "AZURE_CA_BUNDLE": str(tls.ca),
        "MEDIA_ROOTS": f"audio={media_roots['audio']},video={media_roots['video']}",
        "GIGHIVE_MEDIA_STATE_DIR": str(h.state_dir),
        "UPLOAD_SETTLE_SECONDS": "0",
        "UPLOAD_BLOCK_SIZE": "256KiB",
        **settings,
    }
    return h


def blobs(azurite_oauth, tls, container) -> set[str]:
    service = BlobServiceClient.from_connection_string(azurite_oauth.connection_string, connection_verify=str(tls.ca))
    return {b.name for b in service.get_container_client(container).list_blobs()}


@pytest.fixture
def imds(monkeypatch, token_server):
    for var in _OTHER_MI_SOURCES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", token_server.url)
    return token_server


def test_user_assigned_managed_identity(tmp_path, media_roots, azurite_oauth, tls, oauth_container, imds):
    client_id = str(uuid.uuid4())
    h = oauth_harness(
        tmp_path,
        media_roots,
        azurite_oauth,
        tls,
        oauth_container,
        AZURE_AUTH_MODE="managed_identity",
        AZURE_CLIENT_ID=client_id,
    )
    _, sha = make_content_addressed(media_roots["video"], 700_000, "mp4", seed=21)
    result = upload.run(h.config(), watch=False)
    assert result["uploaded"] == 1
    assert f"video/{sha}.mp4" in blobs(azurite_oauth, tls, oauth_container)
    fetched = imds.token_requests(kind="imds")
    assert fetched, "the managed identity endpoint was never asked"
    assert {r.client_id for r in fetched} == {client_id}
    # One token serves the whole run (several block requests): it is cached, not refetched per call.
    assert len(fetched) == 1


def test_system_assigned_managed_identity(tmp_path, media_roots, azurite_oauth, tls, oauth_container, imds):
    h = oauth_harness(tmp_path, media_roots, azurite_oauth, tls, oauth_container, AZURE_AUTH_MODE="managed_identity")
    make_content_addressed(media_roots["audio"], 3000, "mp3", seed=22)
    assert upload.run(h.config(), watch=False)["uploaded"] == 1
    assert [r.client_id for r in imds.token_requests(kind="imds")] == [None]


def test_managed_identity_endpoint_failing_records_a_retryable_failure(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, imds
):
    h = oauth_harness(tmp_path, media_roots, azurite_oauth, tls, oauth_container, AZURE_AUTH_MODE="managed_identity")
    path, _ = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=23)
    imds.fail_next(50, status=500)
    result = upload.run(h.config(), watch=False)
    assert result["failed"] == 1
    assert "token" in result["errors"][0]["error"]
    assert path.exists()


def sp_harness(tmp_path, media_roots, azurite_oauth, tls, container, entra, client_id, **settings) -> Harness:
    """The agent as a service principal of the HTTPS token endpoint `entra`."""
    return oauth_harness(
        tmp_path,
        media_roots,
        azurite_oauth,
        tls,
        container,
        AZURE_AUTH_MODE="service_principal",
        AZURE_TENANT_ID=entra.tenant_id,
        AZURE_CLIENT_ID=client_id,
        AZURE_AUTHORITY_HOST=entra.url,
        **settings,
    )


def private_file(path, text: str, mode: int = 0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_service_principal_with_secret(tmp_path, media_roots, azurite_oauth, tls, oauth_container, token_server_https):
    client_id = str(uuid.uuid4())
    token_server_https.add_client(client_id, secret="correct horse")
    secret = private_file(tmp_path / "sp-secret", "correct horse\n")
    h = sp_harness(
        tmp_path,
        media_roots,
        azurite_oauth,
        tls,
        oauth_container,
        token_server_https,
        client_id,
        AZURE_CLIENT_SECRET_FILE=str(secret),
    )
    _, sha = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=24)
    assert upload.run(h.config(), watch=False)["uploaded"] == 1
    assert f"audio/{sha}.mp3" in blobs(azurite_oauth, tls, oauth_container)
    assert token_server_https.token_requests(client_id)


def test_service_principal_secret_from_systemd_credentials(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, token_server_https, monkeypatch
):
    client_id = str(uuid.uuid4())
    token_server_https.add_client(client_id, secret="from-credentials-dir")
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "azure-client-secret").write_text("from-credentials-dir")
    (creds / "azure-client-secret").chmod(0o400)
    h = sp_harness(
        tmp_path,
        media_roots,
        azurite_oauth,
        tls,
        oauth_container,
        token_server_https,
        client_id,
        CREDENTIALS_DIRECTORY=str(creds),
    )
    make_content_addressed(media_roots["audio"], 3000, "mp3", seed=25)
    assert upload.run(h.config(), watch=False)["uploaded"] == 1


def test_service_principal_with_certificate(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, token_server_https
):
    client_id = str(uuid.uuid4())
    token_server_https.add_client(client_id, certificate=tls.client_cert)
    bundle = tmp_path / "sp.pem"
    bundle.write_bytes(tls.client_bundle.read_bytes())
    bundle.chmod(0o600)
    h = sp_harness(
        tmp_path,
        media_roots,
        azurite_oauth,
        tls,
        oauth_container,
        token_server_https,
        client_id,
        AZURE_CLIENT_CERTIFICATE_FILE=str(bundle),
    )
    make_content_addressed(media_roots["audio"], 3000, "mp3", seed=26)
    assert upload.run(h.config(), watch=False)["uploaded"] == 1
    assert token_server_https.token_requests(client_id)


def test_wrong_service_principal_secret_fails_clearly_and_keeps_the_file(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, token_server_https
):
    client_id = str(uuid.uuid4())
    token_server_https.add_client(client_id, secret="the real one")
    secret = private_file(tmp_path / "sp-secret", "a wrong one")
    h = sp_harness(
        tmp_path,
        media_roots,
        azurite_oauth,
        tls,
        oauth_container,
        token_server_https,
        client_id,
        AZURE_CLIENT_SECRET_FILE=str(secret),
    )
    path, _ = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=27)
    result = upload.run(h.config(), watch=False)
    assert result["failed"] == 1
    error = result["errors"][0]["error"]
    assert "cannot get a token" in error
    assert "a wrong one" not in error
    assert path.exists()
    assert blobs(azurite_oauth, tls, oauth_container) == set()


def test_token_is_refreshed_before_it_expires(tmp_path, media_roots, azurite_oauth, tls, oauth_container, imds):
    """Tokens that live 240 s sit inside the SDK's 300 s refresh window, so the credential fetches a
    fresh one while the current one is still valid: a long run never sends an expired token."""
    import time

    from agent.context import queue_worker

    imds.set_lifetime(240)
    h = oauth_harness(tmp_path, media_roots, azurite_oauth, tls, oauth_container, AZURE_AUTH_MODE="managed_identity")
    cfg = h.config()
    make_content_addressed(media_roots["audio"], 3000, "mp3", seed=600)
    with queue_worker(cfg, wait_for_lock=False) as worker:
        worker.scan()
        assert worker.run_due().uploaded == 1
        make_content_addressed(media_roots["audio"], 3000, "mp3", seed=601)
        worker.scan()
        assert worker.run_due().uploaded == 1
    fetches = imds.token_requests(kind="imds")
    issued = imds.issued
    assert len(fetches) >= 2
    # Each new token was fetched while the previous one still had most of its life left.
    for previous, request in zip(issued, fetches[1:], strict=False):
        assert previous["exp"] - request.time > 200
    assert all(t["exp"] > time.time() for t in issued)
