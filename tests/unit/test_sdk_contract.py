"""What agent/storage/azure_sdk_private.py relies on below the SDK's public API.

If an SDK upgrade renames a private name, changes an operation's parameters, or stops a header
from reaching the wire, these fail here, by name, instead of the agent silently losing an
integrity check. The requests are recorded at the HTTP adapter (no network): what is asserted is
exactly what would be sent.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import io
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobServiceClient
from requests.structures import CaseInsensitiveDict

from agent.storage import azure_sdk_private
from tests.support.azurite import ACCOUNT_KEY, ACCOUNT_NAME

CONN = (
    f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
    f"BlobEndpoint=http://127.0.0.1:9/{ACCOUNT_NAME};"
)


class _Recorder(requests.adapters.BaseAdapter):
    """Answers every request with one canned response and keeps what was sent."""

    def __init__(self, status: int, headers: dict[str, str] | None = None, body: bytes = b""):
        super().__init__()
        self.status, self.headers, self.body = status, headers or {}, body
        self.sent: list[requests.PreparedRequest] = []
        self.raw_type: type[io.BytesIO] = io.BytesIO

    def send(self, request, **kwargs):
        self.sent.append(request)
        r = requests.Response()
        r.status_code = self.status
        r.headers = CaseInsensitiveDict({"x-ms-request-id": "rid", **self.headers})
        r.raw = self.raw_type(self.body)
        r.request, r.url = request, request.url
        return r

    def close(self) -> None:
        pass


def _service(recorder: _Recorder) -> BlobServiceClient:
    session = requests.Session()
    session.mount("http://", recorder)
    return BlobServiceClient.from_connection_string(
        CONN, transport=RequestsTransport(session=session, session_owner=False), retry_total=0
    )


def test_the_private_names_exist_with_the_parameters_used() -> None:
    container = _service(_Recorder(200)).get_container_client("c")
    blob = container.get_blob_client("b")
    assert callable(container._client._client.send_request)
    download = inspect.signature(blob._client.blob.download).parameters
    assert {"range", "kwargs"} <= set(download), download
    stage = inspect.signature(blob._client.block_blob.stage_block).parameters
    assert "transactional_content_md5" in stage, "Put Block no longer takes a transactional MD5"
    assert azure_sdk_private.api_version(container) >= azure_sdk_private.MIN_BEARER_VERSION


def test_a_hand_built_request_carries_version_date_request_id_and_authorization() -> None:
    rec = _Recorder(200, {"Content-Type": "application/xml"}, b"<EnumerationResults/>")
    container = _service(rec).get_container_client("c")
    response = azure_sdk_private.send(container, "GET", f"{container.url}?restype=container&comp=list")
    assert response.status_code == 200
    (sent,) = rec.sent
    assert sent.headers["x-ms-version"] == container.api_version
    assert sent.headers["x-ms-date"].endswith("GMT")
    assert sent.headers["x-ms-client-request-id"]
    assert sent.headers["Authorization"].startswith(f"SharedKey {ACCOUNT_NAME}:")


class _CountingBody(io.BytesIO):
    reads = 0

    def read(self, *args):
        type(self).reads += 1
        return super().read(*args)


def test_a_streamed_hand_built_request_leaves_its_body_to_be_read_in_pieces() -> None:
    """The listing reads each page as it streams in (agent.storage.azure_blob._read_page): with
    stream=True the pipeline must neither read the body nor parse its XML into a tree."""
    body = b"<EnumerationResults>" + b"<Blob><Name>x</Name></Blob>" * 2000 + b"</EnumerationResults>"
    rec = _Recorder(200, {"Content-Type": "application/xml"}, body)
    rec.raw_type = _CountingBody
    container = _service(rec).get_container_client("c")
    _CountingBody.reads = 0
    response = azure_sdk_private.send(container, "GET", f"{container.url}?restype=container&comp=list", stream=True)
    assert _CountingBody.reads == 0, "the pipeline read a streamed body"
    chunks = list(response.iter_bytes())
    response.close()
    assert b"".join(chunks) == body and len(chunks) > 1, len(chunks)


def test_the_per_block_md5_reaches_the_wire_as_content_md5() -> None:
    rec = _Recorder(201, {"Content-MD5": "", "x-ms-request-server-encrypted": "true"})
    blob = _service(rec).get_container_client("c").get_blob_client("b")
    data = b"a block of bytes"
    md5 = hashlib.md5(data).digest()  # noqa: S324
    azure_sdk_private.stage_block(blob, "000000-" + md5.hex(), data, md5)
    (sent,) = rec.sent
    assert sent.headers.get("Content-MD5") == base64.b64encode(md5).decode(), dict(sent.headers)
    assert sent.headers["x-ms-version"] == blob.api_version
    blockid = parse_qs(urlsplit(sent.url).query)["blockid"][0]
    assert base64.b64decode(blockid).decode() == "000000-" + md5.hex()
    assert sent.body == data


def test_a_dropped_md5_is_what_the_previous_test_catches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is not vacuous: with the keyword ignored (as an SDK upgrade might), the
    header is gone from the wire."""
    rec = _Recorder(201)
    blob = _service(rec).get_container_client("c").get_blob_client("b")
    original = blob._client.block_blob.stage_block

    def ignoring_md5(*args, **kwargs):
        kwargs["transactional_content_md5"] = None
        return original(*args, **kwargs)

    monkeypatch.setattr(blob._client.block_blob, "stage_block", ignoring_md5)
    data = b"x"
    azure_sdk_private.stage_block(blob, "000000-" + "0" * 32, data, hashlib.md5(data).digest())  # noqa: S324
    assert "Content-MD5" not in rec.sent[0].headers


def test_download_is_a_ranged_if_match_get_left_unread() -> None:
    rec = _Recorder(206, {"Content-Range": "bytes 10-19/100", "Content-Length": "10"}, b"0123456789")
    blob = _service(rec).get_container_client("c").get_blob_client("b")
    response = azure_sdk_private.download(blob, 10, 10, '"etag"')
    (sent,) = rec.sent
    assert sent.method == "GET"
    assert (sent.headers.get("x-ms-range") or sent.headers.get("Range")) == "bytes=10-19"
    assert sent.headers["If-Match"] == '"etag"'
    assert sent.headers["x-ms-version"] == blob.api_version
    assert isinstance(response, requests.Response)
    assert response.raw.read() == b"0123456789"  # the SDK did not read the body


def test_no_private_sdk_name_is_used_outside_the_one_module() -> None:
    """The one-module rule, checked: a new use of an SDK internal elsewhere fails here."""
    import re
    from pathlib import Path

    agent = Path(azure_sdk_private.__file__).parents[1]
    private = re.compile(
        r"\._client\b|\._pipeline\b|\.raw\._fp\b|\b_fp\b|azure\.(storage\.blob|core|identity)(\.\w+)*\._"
    )
    offenders = [
        f"{path.relative_to(agent.parent)}:{n}: {line.strip()}"
        for path in sorted(agent.rglob("*.py"))
        if path.name != "azure_sdk_private.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not offenders, "SDK internals outside agent/storage/azure_sdk_private.py:\n" + "\n".join(offenders)
