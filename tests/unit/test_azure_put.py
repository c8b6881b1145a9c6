"""The urllib3 Put Blob (agent/storage/azure_put.py) sends what the SDK's upload_blob sends.

The SDK's request is recorded at the HTTP adapter (no network), then compared header by header
with the one azure_put builds, and its Shared Key signature recomputed: if an SDK upgrade changes
what a Put Blob carries, or the signing rules drift, this fails here by name. Azurite (which
checks Shared Key signatures) and the strict-Azure gate check the same requests end to end in
tests/integration/test_upload_fast_put.py.
"""

from __future__ import annotations

import base64
import hashlib
import time
from types import SimpleNamespace

import pytest
from azure.storage.blob import ContentSettings

from agent.storage import azure_put
from tests.support.azurite import ACCOUNT_KEY, ACCOUNT_NAME
from tests.unit.test_sdk_contract import _Recorder, _service

# Headers that are the transport's or the client's own, not part of the Put Blob request.
_TRANSPORT = {"user-agent", "accept-encoding", "connection", "x-ms-date", "x-ms-client-request-id", "authorization"}
NAME = "audio/ab cd+é~(1).mp3"


def _sdk_put(overwrite: bool) -> tuple[object, bytes, bytes]:
    rec = _Recorder(201, {"ETag": '"0x1"', "Last-Modified": "Mon, 30 Nov 2026 04:00:00 GMT"})
    blob = _service(rec).get_container_client("c").get_blob_client(NAME)
    data = b"some bytes of audio"
    md5 = hashlib.md5(data).digest()  # noqa: S324
    blob.upload_blob(
        data,
        length=len(data),
        overwrite=overwrite,
        content_settings=ContentSettings(content_type="audio/mpeg", content_md5=bytearray(md5)),
        metadata={"sha256": "ab" * 32},
        transactional_content_md5=bytearray(md5),
    )
    (sent,) = rec.sent
    return sent, data, md5


def _ours(api_version: str) -> azure_put.PutBlob:
    return azure_put.PutBlob(
        f"http://127.0.0.1:9/{ACCOUNT_NAME}/c",
        api_version,
        azure_put.SharedKey(ACCOUNT_NAME, ACCOUNT_KEY),
        timeout=5,
        pool_size=2,
        ca_bundle=None,
        user_agent="test",
    )


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_request_is_the_sdks_header_for_header(overwrite: bool) -> None:
    sent, data, md5 = _sdk_put(overwrite)
    api_version = sent.headers["x-ms-version"]
    ours = _ours(api_version)
    path = ours.path(NAME)
    assert sent.path_url == path
    headers = ours.headers(path, len(data), "audio/mpeg", md5, "ab" * 32, overwrite)
    theirs = {k.lower(): v for k, v in sent.headers.items() if k.lower() not in _TRANSPORT}
    mine = {k.lower(): v for k, v in headers.items() if k.lower() not in _TRANSPORT}
    assert mine == theirs
    assert ("if-none-match" in mine) is (not overwrite)
    assert mine["content-md5"] == base64.b64encode(md5).decode()


def test_the_shared_key_signature_is_the_sdks() -> None:
    sent, _data, _md5 = _sdk_put(False)
    key = azure_put.SharedKey(ACCOUNT_NAME, ACCOUNT_KEY)
    assert key.sign("PUT", sent.path_url, dict(sent.headers)) == sent.headers["Authorization"]
    # And it depends on what is signed: another MD5 is another signature.
    changed = {**sent.headers, "Content-MD5": base64.b64encode(b"\0" * 16).decode()}
    assert key.sign("PUT", sent.path_url, changed) != sent.headers["Authorization"]


def test_a_bearer_token_is_reused_until_five_minutes_before_it_expires() -> None:
    calls: list[str] = []
    expires = [time.time() + 3600]

    def get_token(scope: str) -> SimpleNamespace:
        calls.append(scope)
        return SimpleNamespace(token=f"t{len(calls)}", expires_on=expires[0])

    token = azure_put.BearerToken(SimpleNamespace(get_token=get_token))
    assert token.header() == "Bearer t1"
    assert token.header() == "Bearer t1"
    assert calls == [azure_put.STORAGE_SCOPE]
    expires[0] = time.time() + 100  # the next token is due for renewal at once
    token._expires_on = time.time() + 200
    assert token.header() == "Bearer t2"


def test_a_bearer_token_is_never_sent_over_http() -> None:
    with pytest.raises(ValueError, match="HTTPS"):
        azure_put.PutBlob(
            "http://example.invalid/c",
            "2026-10-06",
            azure_put.BearerToken(SimpleNamespace()),
            timeout=5,
            pool_size=1,
            ca_bundle=None,
            user_agent="test",
        )


def test_a_sas_url_is_not_taken() -> None:
    with pytest.raises(ValueError, match="SAS"):
        azure_put.PutBlob(
            "https://a.blob.core.windows.net/c?sig=x",
            "2026-10-06",
            azure_put.SharedKey(ACCOUNT_NAME, ACCOUNT_KEY),
            timeout=5,
            pool_size=1,
            ca_bundle=None,
            user_agent="test",
        )


def test_what_is_reported_without_the_sdk_is_what_the_sdk_would_not_retry() -> None:
    """A refusal reported straight from the fast path's answer (azure_put.Refused) must be one the
    SDK's retry policy gives up on at once; the rest go through the SDK."""
    from azure.storage.blob._shared.models import LocationMode
    from azure.storage.blob._shared.policies import is_retry

    def retried(status: int) -> bool:
        http = SimpleNamespace(status_code=status, headers={})
        return is_retry(SimpleNamespace(http_response=http), LocationMode.PRIMARY)

    for status in range(400, 500):
        if status not in azure_put.SDK_HANDLES:
            assert not retried(status), status
    assert retried(408) and retried(500) and retried(503)
