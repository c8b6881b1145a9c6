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
    # As on a VM: only identities assigned to it (add_identity) get tokens.
    monkeypatch.setattr(token_server, "require_known_identity", True)
    return token_server


def test_user_assigned_managed_identity(tmp_path, media_roots, azurite_oauth, tls, oauth_container, imds):
    client_id = str(uuid.uuid4())
    imds.add_identity(client_id)
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
    # What real IMDS insists on (the loopback IMDS refuses anything else with IMDS's own 400s).
    first = fetched[0]
    assert first.status == 200 and first.headers.get("metadata") == "true"
    assert "api-version=2018-02-01" in first.path and f"client_id={client_id}" in first.path
    assert first.resource.rstrip("/") == "https://storage.azure.com"
    assert "x-forwarded-for" not in first.headers
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
    h = oauth_harness(
        tmp_path,
        media_roots,
        azurite_oauth,
        tls,
        oauth_container,
        AZURE_AUTH_MODE="managed_identity",
        AZURE_CREDENTIAL_RETRY_TIMEOUT="3",
    )
    path, _ = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=23)
    imds.fail_next(50, status=500)
    result = upload.run(h.config(), watch=False)
    # No token for anything: an outage, retried later, charging the file no attempt.
    assert result["failed"] == 0 and result["held_back"] == 1
    assert "token" in result["outage"] and "token" in result["errors"][0]["error"]
    assert path.exists()


# ---- IMDS as Azure serves it: retried statuses, outages, hangs, identities being assigned ---------------------


def mi_config(tmp_path, media_roots, azurite_oauth, tls, container, client_id=None, **settings):
    extra = {"AZURE_CLIENT_ID": client_id} if client_id else {}
    return oauth_harness(
        tmp_path, media_roots, azurite_oauth, tls, container, AZURE_AUTH_MODE="managed_identity", **extra, **settings
    ).config()


def imds_statuses(imds) -> list[int]:
    return [r.status for r in imds.token_requests(kind="imds")]


def test_imds_throttling_and_server_errors_are_retried_until_a_token_comes(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, imds
):
    """Microsoft: retry 429 and 5xx with exponential backoff. azure-identity's ImdsRetryPolicy does;
    the agent must not have switched it off or shortened it below these."""
    client_id = str(uuid.uuid4())
    imds.add_identity(client_id)
    imds.fail_next(1, status=429)
    imds.fail_next(1, status=500)
    imds.fail_next(1, status=503)
    cfg = mi_config(tmp_path, media_roots, azurite_oauth, tls, oauth_container, client_id)
    _, sha = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=30)
    result = upload.run(cfg, watch=False)
    assert result["uploaded"] == 1, result
    assert imds_statuses(imds) == [429, 500, 503, 200]
    assert f"audio/{sha}.mp3" in blobs(azurite_oauth, tls, oauth_container)


def test_imds_404_and_410_while_the_identity_is_being_assigned_are_waited_out(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, imds
):
    """Right after `az vm identity assign`, IMDS answers 404, or 410 while it updates (for up to 70 s);
    both are retried, not reported as a missing identity."""
    client_id = str(uuid.uuid4())
    imds.add_identity(client_id, settling=1, status=410)
    imds.fail_next(1, status=404)
    cfg = mi_config(tmp_path, media_roots, azurite_oauth, tls, oauth_container, client_id)
    make_content_addressed(media_roots["audio"], 3000, "mp3", seed=31)
    assert upload.run(cfg, watch=False)["uploaded"] == 1
    assert imds_statuses(imds) == [410, 404, 200]


def test_imds_outage_is_reported_as_an_outage_naming_imds(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, imds
):
    from agent.storage import StoreUnavailable
    from agent.storage.azure_blob import AzureBlobStore

    client_id = str(uuid.uuid4())
    imds.add_identity(client_id)
    imds.fail_next(1000, status=503)
    cfg = mi_config(
        tmp_path, media_roots, azurite_oauth, tls, oauth_container, client_id, AZURE_CREDENTIAL_RETRY_TIMEOUT="3"
    )
    with pytest.raises(StoreUnavailable) as raised:
        AzureBlobStore(cfg).stat("audio/none.mp3")
    e = raised.value
    assert e.outage is True
    text = str(e)
    assert "IMDS" in text and "unavailable" in text and "HTTP 503" in text and client_id in text, text
    # More than one try: the retries ran, inside the bound.
    assert len(imds.token_requests(kind="imds")) >= 2

    # The upload run stops at the outage (instead of failing file after file) and keeps the file.
    path, _ = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=32)
    result = upload.run(cfg, watch=False)
    assert result["uploaded"] == 0 and path.exists()
    assert result["outage"] and "IMDS" in result["outage"], result


def test_a_hung_imds_is_bounded_and_named(tmp_path, media_roots, azurite_oauth, tls, oauth_container, imds):
    """IMDS that accepts the connection and never answers: each try ends after AZURE_CREDENTIAL_TIMEOUT,
    the whole fetch after AZURE_CREDENTIAL_RETRY_TIMEOUT (the hang itself would last 10 minutes)."""
    from agent.storage import StoreUnavailable
    from agent.storage.azure_blob import AzureBlobStore

    imds.hang_next(1000, seconds=600)
    cfg = mi_config(
        tmp_path,
        media_roots,
        azurite_oauth,
        tls,
        oauth_container,
        AZURE_CREDENTIAL_TIMEOUT="1",
        AZURE_CREDENTIAL_RETRY_TIMEOUT="4",
    )
    with pytest.raises(StoreUnavailable) as raised:
        AzureBlobStore(cfg).stat("audio/none.mp3")
    assert raised.value.outage is True
    text = str(raised.value)
    assert "IMDS" in text and "did not answer" in text and "system-assigned" not in text, text
    assert "IPAddressAllow" in text


def test_unassigned_client_id_names_the_identity_and_the_fix(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, imds
):
    """IMDS answers 400 Identity not found for a client id not assigned to the VM (often the identity's
    principal id pasted instead of its client id): not retried, and said in those words."""
    wrong = str(uuid.uuid4())
    cfg = mi_config(tmp_path, media_roots, azurite_oauth, tls, oauth_container, wrong)
    path, _ = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=33)
    result = upload.run(cfg, watch=False)
    assert result["uploaded"] == 0 and path.exists()
    text = result["outage"] or result["errors"][0]["error"]
    assert wrong in text and "AZURE_CLIENT_ID" in text and "principal" in text, text
    # One fetch is one request: a 400 is a design-time error, never retried.
    from agent.storage.azure_auth import STORAGE_SCOPE, TokenUnavailable, build_credential

    imds.reset()
    with pytest.raises(TokenUnavailable):
        build_credential(cfg).get_token(STORAGE_SCOPE)
    assert imds_statuses(imds) == [400]


def test_imds_is_reached_directly_never_through_a_proxy(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, imds, monkeypatch
):
    """Microsoft: bypass web proxies when querying IMDS. A proxy in the environment (here a dead one)
    must not carry the token request."""
    for var in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    client_id = str(uuid.uuid4())
    imds.add_identity(client_id)
    cfg = mi_config(tmp_path, media_roots, azurite_oauth, tls, oauth_container, client_id)
    make_content_addressed(media_roots["audio"], 3000, "mp3", seed=34)
    assert upload.run(cfg, watch=False)["uploaded"] == 1
    assert imds_statuses(imds) == [200]


@pytest.fixture
def sp(tmp_path, media_roots, azurite_oauth, tls, oauth_container, token_server_https):
    """sp(client_id, **settings): the agent as a service principal of the HTTPS token endpoint."""

    def harness(client_id, **settings) -> Harness:
        return oauth_harness(
            tmp_path,
            media_roots,
            azurite_oauth,
            tls,
            oauth_container,
            AZURE_AUTH_MODE="service_principal",
            AZURE_TENANT_ID=token_server_https.tenant_id,
            AZURE_CLIENT_ID=client_id,
            AZURE_AUTHORITY_HOST=token_server_https.url,
            **settings,
        )

    return harness


def private_file(path, text: str, mode: int = 0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_service_principal_with_secret(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, token_server_https, sp
):
    client_id = str(uuid.uuid4())
    token_server_https.add_client(client_id, secret="correct horse")
    secret = private_file(tmp_path / "sp-secret", "correct horse\n")
    h = sp(
        client_id,
        AZURE_CLIENT_SECRET_FILE=str(secret),
    )
    _, sha = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=24)
    assert upload.run(h.config(), watch=False)["uploaded"] == 1
    assert f"audio/{sha}.mp3" in blobs(azurite_oauth, tls, oauth_container)
    assert token_server_https.token_requests(client_id)


def test_service_principal_secret_from_systemd_credentials(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, token_server_https, sp, monkeypatch
):
    client_id = str(uuid.uuid4())
    token_server_https.add_client(client_id, secret="from-credentials-dir")
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "azure-client-secret").write_text("from-credentials-dir")
    (creds / "azure-client-secret").chmod(0o400)
    h = sp(
        client_id,
        CREDENTIALS_DIRECTORY=str(creds),
    )
    make_content_addressed(media_roots["audio"], 3000, "mp3", seed=25)
    assert upload.run(h.config(), watch=False)["uploaded"] == 1


def test_service_principal_with_certificate(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, token_server_https, sp
):
    client_id = str(uuid.uuid4())
    token_server_https.add_client(client_id, certificate=tls.client_cert)
    bundle = tmp_path / "sp.pem"
    bundle.write_bytes(tls.client_bundle.read_bytes())
    bundle.chmod(0o600)
    h = sp(
        client_id,
        AZURE_CLIENT_CERTIFICATE_FILE=str(bundle),
    )
    make_content_addressed(media_roots["audio"], 3000, "mp3", seed=26)
    assert upload.run(h.config(), watch=False)["uploaded"] == 1
    assert token_server_https.token_requests(client_id)


def test_wrong_service_principal_secret_fails_clearly_and_keeps_the_file(
    tmp_path, media_roots, azurite_oauth, tls, oauth_container, token_server_https, sp
):
    client_id = str(uuid.uuid4())
    token_server_https.add_client(client_id, secret="the real one")
    secret = private_file(tmp_path / "sp-secret", "a wrong one")
    h = sp(
        client_id,
        AZURE_CLIENT_SECRET_FILE=str(secret),
    )
    path, _ = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=27)
    result = upload.run(h.config(), watch=False)
    assert result["failed"] == 0 and result["held_back"] == 1  # every request would fail: an outage
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
