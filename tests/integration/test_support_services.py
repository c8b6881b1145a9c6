"""The test infrastructure itself, exercised with the real Azure SDK and PyMySQL."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import uuid

import pymysql
import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError
from azure.identity import CertificateCredential, ClientSecretCredential, ManagedIdentityCredential
from azure.storage.blob import BlobServiceClient

from tests.conftest import unique_name
from tests.support.media import make_content_addressed, make_thumbnail, pseudo_random_bytes, sha256_file
from tests.support.tokens import STORAGE_RESOURCE, decode_jwt

STORAGE_SCOPE = STORAGE_RESOURCE + "/.default"

# Any of these would make ManagedIdentityCredential pick another source than IMDS.
_OTHER_IDENTITY_ENV = (
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_CLIENT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_TENANT_ID",
)


@pytest.fixture
def imds_env(monkeypatch: pytest.MonkeyPatch, token_server):
    for var in _OTHER_IDENTITY_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", token_server.url)
    return token_server


def _roundtrip(service: BlobServiceClient, data: bytes) -> bytes:
    container = service.create_container(unique_name())
    container.upload_blob("video/sample.mp4", data)
    return container.download_blob("video/sample.mp4").readall()


def test_connection_string_upload_download(blob_container):
    data = pseudo_random_bytes(300_000, seed=1)
    blob_container.upload_blob("audio/x.mp3", data)
    assert blob_container.download_blob("audio/x.mp3").readall() == data
    assert blob_container.download_blob("audio/x.mp3", offset=1000, length=10).readall() == data[1000:1010]


def test_managed_identity_user_assigned(azurite_oauth, imds_env, tls):
    client_id = str(uuid.uuid4())
    cred = ManagedIdentityCredential(client_id=client_id)
    service = BlobServiceClient(azurite_oauth.blob_endpoint, credential=cred, connection_verify=str(tls.ca))

    assert _roundtrip(service, b"managed identity") == b"managed identity"

    reqs = imds_env.token_requests(client_id)
    assert len(reqs) == 1
    assert reqs[0].kind == "imds"
    assert reqs[0].path.startswith("/metadata/identity/oauth2/token?")
    assert reqs[0].headers["metadata"] == "true"
    assert reqs[0].resource == STORAGE_RESOURCE
    assert imds_env.issued[-1]["aud"] == STORAGE_RESOURCE


def test_managed_identity_injected_failure_then_success(imds_env):
    client_id = str(uuid.uuid4())
    # 400 is what IMDS answers for an unassigned identity; azure-identity does not retry it.
    imds_env.fail_next(1, 400)
    cred = ManagedIdentityCredential(client_id=client_id)
    with pytest.raises(ClientAuthenticationError):
        cred.get_token(STORAGE_SCOPE)
    token = cred.get_token(STORAGE_SCOPE)
    assert decode_jwt(token.token)[1]["tid"] == imds_env.tenant_id
    assert [r.status for r in imds_env.token_requests(client_id)] == [400, 200]


def test_client_secret_credential(azurite_oauth, token_server_https, tls):
    client_id, client_secret = str(uuid.uuid4()), secrets.token_urlsafe()
    token_server_https.add_client(client_id, secret=client_secret)
    cred = ClientSecretCredential(
        token_server_https.tenant_id,
        client_id,
        client_secret,
        authority=token_server_https.authority,
        disable_instance_discovery=True,
        connection_verify=str(tls.ca),
    )
    service = BlobServiceClient(azurite_oauth.blob_endpoint, credential=cred, connection_verify=str(tls.ca))

    assert _roundtrip(service, b"service principal") == b"service principal"

    kinds = [(r.kind, r.status) for r in token_server_https.requests]
    assert kinds == [("discovery", 200), ("token", 200)]
    (req,) = token_server_https.token_requests(client_id)
    assert req.grant_type == "client_credentials"
    assert req.auth == "secret"
    assert STORAGE_SCOPE in req.resource.split()


def test_client_secret_wrong_secret_is_rejected(token_server_https, tls):
    client_id, client_secret = str(uuid.uuid4()), secrets.token_urlsafe()
    token_server_https.add_client(client_id, secret=client_secret)
    cred = ClientSecretCredential(
        token_server_https.tenant_id,
        client_id,
        client_secret + "-wrong",
        authority=token_server_https.authority,
        disable_instance_discovery=True,
        connection_verify=str(tls.ca),
    )
    with pytest.raises(ClientAuthenticationError) as err:
        cred.get_token(STORAGE_SCOPE)
    assert "AADSTS7000215" in str(err.value)
    assert [r.status for r in token_server_https.token_requests(client_id)] == [401]


def test_client_certificate_credential(azurite_oauth, token_server_https, tls):
    client_id = str(uuid.uuid4())
    token_server_https.add_client(client_id, certificate=tls.client_cert)
    cred = CertificateCredential(
        token_server_https.tenant_id,
        client_id,
        certificate_path=str(tls.client_bundle),
        authority=token_server_https.authority,
        disable_instance_discovery=True,
        connection_verify=str(tls.ca),
    )
    service = BlobServiceClient(azurite_oauth.blob_endpoint, credential=cred, connection_verify=str(tls.ca))

    assert _roundtrip(service, b"certificate") == b"certificate"
    (req,) = token_server_https.token_requests(client_id)
    assert req.auth == "assertion"
    assert req.status == 200


def test_client_certificate_not_registered_is_rejected(token_server_https, tls):
    client_id = str(uuid.uuid4())
    token_server_https.add_client(client_id, secret=secrets.token_urlsafe())
    cred = CertificateCredential(
        token_server_https.tenant_id,
        client_id,
        certificate_path=str(tls.client_bundle),
        authority=token_server_https.authority,
        disable_instance_discovery=True,
        connection_verify=str(tls.ca),
    )
    with pytest.raises(ClientAuthenticationError):
        cred.get_token(STORAGE_SCOPE)


class _StaticCredential:
    """Hands out one fixed token and claims it is fresh, as a client with a skewed clock would."""

    def __init__(self, token: str) -> None:
        self._token = token

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + 3600)


def test_expired_token_gets_403_authentication_failed(azurite_oauth, token_server, tls):
    expired = token_server.mint(lifetime=-600)
    service = BlobServiceClient(
        azurite_oauth.blob_endpoint,
        credential=_StaticCredential(expired),
        connection_verify=str(tls.ca),
        retry_total=0,
    )
    with pytest.raises(HttpResponseError) as err:
        service.create_container(unique_name())
    assert err.value.status_code == 403
    assert err.value.error_code == "AuthenticationFailed"


def test_expired_token_from_endpoint_gets_403(azurite_oauth, imds_env, tls):
    imds_env.set_lifetime(-600)
    cred = ManagedIdentityCredential(client_id=str(uuid.uuid4()))
    service = BlobServiceClient(
        azurite_oauth.blob_endpoint,
        credential=cred,
        connection_verify=str(tls.ca),
        retry_total=0,
    )
    with pytest.raises(HttpResponseError) as err:
        service.create_container(unique_name())
    assert err.value.status_code == 403
    assert err.value.error_code == "AuthenticationFailed"


def test_mariadb_stop_start_keeps_data(mariadb):
    port = mariadb.port
    sha = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    conn = mariadb.connect()
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO assets (checksum_sha256, file_type, file_ext, size_bytes, media_info) "
            "VALUES (%s, 'video', 'mp4', 123, %s)",
            (sha, '{"codec": "h264"}'),
        )
    conn.commit()
    conn.close()

    mariadb.stop()
    with pytest.raises(pymysql.err.OperationalError):
        mariadb.connect(connect_timeout=2)
    mariadb.start()

    assert mariadb.port == port
    conn = mariadb.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT file_type, size_bytes FROM assets WHERE checksum_sha256 = %s", (sha,))
        assert cur.fetchall() == (("video", 123),)
    conn.close()


def test_mariadb_kill_keeps_committed_rows(mariadb):
    sha = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    conn = mariadb.connect(autocommit=True)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO assets (checksum_sha256, file_type, file_ext) VALUES (%s, 'audio', 'mp3')", (sha,))
    conn.close()
    mariadb.kill()
    mariadb.start()
    conn = mariadb.connect(unix_socket=mariadb.socket)
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM assets WHERE checksum_sha256 = %s", (sha,))
        assert cur.fetchone() == (1,)
    conn.close()


def test_mariadb_real_auth_and_schema(media_db, tmp_path):
    with pytest.raises(pymysql.err.OperationalError) as err:
        media_db.connect(password=media_db.password + "x")
    assert err.value.args[0] == 1045  # access denied

    pw = media_db.password_file(tmp_path / "db-password")
    assert pw.stat().st_mode & 0o777 == 0o600
    assert pw.read_text().strip() == media_db.password

    conn = media_db.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM assets")
        assert cur.fetchone() == (0,)
        sha = "a" * 64
        cur.execute("INSERT INTO assets (checksum_sha256, file_type, file_ext) VALUES (%s, 'video', 'mp4')", (sha,))
        with pytest.raises(pymysql.err.IntegrityError):
            cur.execute("INSERT INTO assets (checksum_sha256, file_type, file_ext) VALUES (%s, 'video', 'mp4')", (sha,))
        # The app user may migrate its own database, as GigHive's db_migrations role does.
        cur.execute("CREATE TABLE agent_probe (id INT PRIMARY KEY)")
    conn.rollback()
    conn.close()


def test_azurite_kill_then_start_on_same_port(azurite_factory):
    az = azurite_factory()
    port = az.port
    service = BlobServiceClient.from_connection_string(az.connection_string, retry_total=0)
    name = unique_name()
    service.create_container(name).upload_blob("a", b"before")
    # A clean stop persists everything.
    az.stop()
    az.start()
    assert az.port == port
    assert service.get_blob_client(name, "a").download_blob().readall() == b"before"

    az.kill()
    assert not az.running
    with pytest.raises(ServiceRequestError):
        service.get_service_properties()
    az.start()
    assert az.port == port
    assert _roundtrip(service, b"after") == b"after"


def test_session_azurite_comes_back_after_a_test_killed_it(azurite):
    azurite.kill()
    # The autouse guard restarts it before the next test; here just prove start() is enough.
    azurite.start()
    assert _roundtrip(BlobServiceClient.from_connection_string(azurite.connection_string), b"x") == b"x"


def test_media_helpers(media_roots):
    path, sha = make_content_addressed(media_roots["video"], 5000, "mp4", seed=3)
    assert path == media_roots["video"] / f"{sha}.mp4"
    assert sha256_file(path) == sha
    thumb = make_thumbnail(media_roots["video"], sha)
    assert thumb == media_roots["thumbnails"] / f"{sha}.png"
    assert thumb.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    again, sha_again = make_content_addressed(media_roots["audio"], 5000, "mp3", seed=3)
    assert sha_again == sha and again.suffix == ".mp3"
    assert not [p for p in os.listdir(media_roots["video"]) if p.startswith(".tmp")]


def test_short_lived_tokens_are_fetched_again(azurite_oauth, imds_env, tls):
    # The SDK renews a token that expires within 5 minutes before each use, so 240 s forces it.
    imds_env.set_lifetime(240)
    client_id = str(uuid.uuid4())
    cred = ManagedIdentityCredential(client_id=client_id)
    service = BlobServiceClient(azurite_oauth.blob_endpoint, credential=cred, connection_verify=str(tls.ca))
    container = service.create_container(unique_name())
    container.upload_blob("a", b"1")
    assert len(imds_env.token_requests(client_id)) >= 2


def test_dropped_connection_is_retried_by_the_imds_client(imds_env):
    client_id = str(uuid.uuid4())
    imds_env.fail_next(1, 0)
    ManagedIdentityCredential(client_id=client_id).get_token(STORAGE_SCOPE)
    assert [r.status for r in imds_env.token_requests(client_id)] == [0, 200]


def test_token_endpoint_needs_the_metadata_header(token_server):
    import urllib.error
    import urllib.request

    url = f"{token_server.url}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={STORAGE_RESOURCE}"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)  # noqa: S310 - loopback test server
    assert err.value.code == 400
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Metadata": "true"}), timeout=10) as r:  # noqa: S310
        body = json.loads(r.read())
    assert body["token_type"] == "Bearer" and int(body["expires_in"]) == 3600
    header, claims = decode_jwt(body["access_token"])
    assert header["alg"] == "RS256"
    assert claims["iss"] == f"https://sts.windows.net/{token_server.tenant_id}/"
    assert claims["nbf"] <= time.time() < claims["exp"]
