"""The strict-Azure gate itself: each rule refuses a crafted bad request the way Azure would, and
the same request made right goes through to Azurite (docs/azure-conformance.md lists the rules
and their sources)."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
import xml.etree.ElementTree as ET
from email.utils import formatdate

import pytest
import requests
from azure.core.credentials import AccessToken
from azure.storage.blob import BlobServiceClient

from agent.storage.azure_blob import _listing_error
from tests.conftest import unique_name
from tests.support.strict_gate import StrictGate, _Refuse

VERSION = "2021-12-02"


class _StaticToken:
    def __init__(self, token: str):
        self.token = token

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


@pytest.fixture
def oauth(azurite_oauth, token_server_https, tls):
    """(send, container_url): crafted bearer requests to a fresh container through the HTTPS gate."""
    token = token_server_https.mint()
    service = BlobServiceClient(
        azurite_oauth.blob_endpoint, credential=_StaticToken(token), connection_verify=str(tls.ca)
    )
    container = service.create_container(unique_name())
    session = requests.Session()
    session.trust_env = False

    def send(method: str, path: str = "", headers: dict | None = None, data: bytes = b"", **params: str):
        h = {"Authorization": f"Bearer {token}", "x-ms-version": VERSION, "x-ms-date": formatdate(usegmt=True)}
        for k, v in (headers or {}).items():
            if v is None:
                h.pop(k, None)
            else:
                h[k] = v
        url = f"{container.url}/{path}" if path else container.url
        return session.request(method, url, headers=h, data=data, params=params, verify=str(tls.ca), timeout=30)

    return send, container, azurite_oauth.gate


def _error(response: requests.Response) -> tuple[str, ET.Element]:
    root = ET.fromstring(response.content)  # noqa: S314 - the gate's own answer
    assert response.headers["x-ms-error-code"] == root.findtext("Code")
    assert response.headers.get("x-ms-request-id")
    return root.findtext("Code") or "", root


def _put_blob(send, name: str, data: bytes = b"hello", headers: dict | None = None):
    return send("PUT", name, {"x-ms-blob-type": "BlockBlob", **(headers or {})}, data)


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324


def _bid(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_bearer_without_x_ms_version_is_refused_as_azure_does(oauth):
    send, _container, gate = oauth
    with gate.expecting("AuthenticationFailed"):
        r = send("GET", restype="container", comp="list", headers={"x-ms-version": None})
    assert r.status_code == 403
    code, root = _error(r)
    assert code == "AuthenticationFailed"
    assert (
        root.findtext("AuthenticationErrorDetail") == "Authentication scheme Bearer is not supported in this version."
    )
    # The agent's reading of that refusal blames the version, not the credential.
    text = str(_listing_error(r.status_code, r.content, r.headers))
    assert "x-ms-version" in text and "not a credential problem" in text
    assert r.headers["x-ms-request-id"] in text
    assert send("GET", restype="container", comp="list").status_code == 200


def test_bearer_with_a_version_older_than_2017_11_09_is_refused(oauth):
    send, _c, gate = oauth
    with gate.expecting("AuthenticationFailed"):
        assert send("GET", restype="container", comp="list", headers={"x-ms-version": "2017-07-29"}).status_code == 403
    assert send("GET", restype="container", comp="list", headers={"x-ms-version": "2017-11-09"}).status_code == 200


def test_bearer_over_plain_http_is_refused(azurite, token_server_https, blob_container):
    token = token_server_https.mint()
    headers = {"Authorization": f"Bearer {token}", "x-ms-version": VERSION, "x-ms-date": formatdate(usegmt=True)}
    with azurite.gate.expecting("AuthenticationFailed"):
        r = requests.get(
            blob_container.url, params={"restype": "container", "comp": "list"}, headers=headers, timeout=30
        )
    assert r.status_code == 403
    assert "HTTP" in _error(r)[1].findtext("AuthenticationErrorDetail")


def test_unknown_version_is_an_invalid_header_value(oauth):
    send, _c, gate = oauth
    with gate.expecting("InvalidHeaderValue"):
        r = send("GET", restype="container", comp="list", headers={"x-ms-version": "2099-01-01"})
    assert r.status_code == 400
    code, root = _error(r)
    assert (code, root.findtext("HeaderName"), root.findtext("HeaderValue")) == (
        "InvalidHeaderValue",
        "x-ms-version",
        "2099-01-01",
    )


def test_an_authorized_request_needs_a_date_in_rfc_1123_form(oauth):
    send, _c, gate = oauth
    with gate.expecting("MissingRequiredHeader", "InvalidHeaderValue"):
        assert send("GET", restype="container", comp="list", headers={"x-ms-date": None}).status_code == 400
        bad = send("GET", restype="container", comp="list", headers={"x-ms-date": "2026-11-30T01:00:00Z"})
    assert bad.status_code == 400
    assert _error(bad)[1].findtext("HeaderName") == "x-ms-date"


def test_shared_key_date_older_than_15_minutes_is_refused():
    gate = StrictGate("127.0.0.1", 9)
    old = formatdate(time.time() - 16 * 60, usegmt=True)
    headers = {"authorization": "SharedKey devstoreaccount1:x", "x-ms-version": VERSION, "x-ms-date": old}
    with pytest.raises(_Refuse) as e:
        gate._check("GET", "/a/c", {}, headers, 0)
    assert (e.value.status, e.value.code, e.value.rule) == (403, "AuthenticationFailed", "date-skew")
    headers["x-ms-date"] = formatdate(usegmt=True)
    gate._check("GET", "/a/c", {}, headers, 0)


def test_client_request_id_over_1_kib_is_refused(oauth):
    send, _c, gate = oauth
    with gate.expecting("InvalidHeaderValue"):
        r = send("GET", restype="container", comp="list", headers={"x-ms-client-request-id": "a" * 1025})
    assert r.status_code == 400
    assert send("GET", restype="container", comp="list", headers={"x-ms-client-request-id": "a" * 1024}).ok


def test_content_md5_must_be_base64_of_16_bytes(oauth):
    send, _c, gate = oauth
    with gate.expecting("InvalidMd5"):
        r = _put_blob(send, "a.bin", b"abc", {"Content-MD5": base64.b64encode(b"12345678").decode()})
        r2 = _put_blob(send, "a.bin", b"abc", {"x-ms-blob-content-md5": "not base64!"})
    assert (r.status_code, _error(r)[0], r2.status_code) == (400, "InvalidMd5", 400)
    assert _put_blob(send, "a.bin", b"abc", {"Content-MD5": _md5(b"abc")}).status_code == 201


@pytest.mark.parametrize("name", ["1starts_with_digit", "has-dash", "has.dot"])
def test_metadata_names_must_be_c_sharp_identifiers(oauth, name):
    send, _c, gate = oauth
    with gate.expecting("InvalidMetadata"):
        r = _put_blob(send, "m.bin", headers={f"x-ms-meta-{name}": "v"})
    assert (r.status_code, _error(r)[0]) == (400, "InvalidMetadata")
    assert _put_blob(send, "m.bin", headers={"x-ms-meta-_good_Name1": "v"}).status_code == 201


def test_metadata_over_8_kib_is_too_large(oauth):
    send, _c, gate = oauth
    with gate.expecting("MetadataTooLarge"):
        r = _put_blob(send, "m.bin", headers={f"x-ms-meta-k{i}": "v" * 1000 for i in range(9)})
    assert (r.status_code, _error(r)[0]) == (400, "MetadataTooLarge")


def test_block_ids_must_be_base64_of_at_most_64_bytes(oauth):
    send, _c, gate = oauth
    data = b"block"
    md5 = {"Content-MD5": _md5(data)}
    with gate.expecting("InvalidQueryParameterValue"):
        assert send("PUT", "b.bin", md5, data, comp="block", blockid="not base64!").status_code == 400
        assert send("PUT", "b.bin", md5, data, comp="block", blockid=_bid("x" * 65)).status_code == 400
    assert send("PUT", "b.bin", md5, data, comp="block", blockid=_bid("x" * 64)).status_code == 201


def test_block_ids_of_one_blob_must_have_one_length(oauth):
    send, _c, gate = oauth
    data = b"block"
    md5 = {"Content-MD5": _md5(data)}
    assert send("PUT", "b.bin", md5, data, comp="block", blockid=_bid("000000")).status_code == 201
    with gate.expecting("InvalidBlobOrBlock"):
        r = send("PUT", "b.bin", md5, data, comp="block", blockid=_bid("0000001"))
    assert (r.status_code, _error(r)[0]) == (400, "InvalidBlobOrBlock")
    assert send("PUT", "b.bin", md5, data, comp="block", blockid=_bid("000001")).status_code == 201
    # Another blob has its own length.
    assert send("PUT", "c.bin", md5, data, comp="block", blockid=_bid("0000001")).status_code == 201


def test_block_list_ids_must_be_valid_and_of_one_length(oauth):
    send, _c, gate = oauth
    body = f"<BlockList><Latest>{_bid('00')}</Latest><Latest>{_bid('000')}</Latest></BlockList>".encode()
    with gate.expecting("InvalidBlockList"):
        r = send("PUT", "l.bin", {}, body, comp="blocklist")
    assert (r.status_code, _error(r)[0]) == (400, "InvalidBlockList")


def test_block_list_over_50000_blocks_is_too_long(oauth):
    send, _c, gate = oauth
    ids = "".join(f"<Latest>{_bid(f'{i:06d}')}</Latest>" for i in range(50_001))
    with gate.expecting("BlockListTooLong"):
        r = send("PUT", "l.bin", {}, f"<BlockList>{ids}</BlockList>".encode(), comp="blocklist")
    assert (r.status_code, _error(r)[0]) == (400, "BlockListTooLong")


def test_put_block_needs_the_transactional_md5_agent_rule(oauth):
    send, _c, gate = oauth
    with gate.expecting("GateMissingTransactionalMd5"):
        assert send("PUT", "b.bin", {}, b"x", comp="block", blockid=_bid("000000")).status_code == 400
    assert send("PUT", "b.bin", {"Content-MD5": _md5(b"x")}, b"x", comp="block", blockid=_bid("000000")).ok


def test_a_chunked_upload_needs_content_length(oauth):
    send, _c, gate = oauth
    with gate.expecting("MissingContentLengthHeader"):
        r = _put_blob(send, "c.bin", iter([b"abc"]))  # a generator body goes out chunked
    assert (r.status_code, _error(r)[0]) == (411, "MissingContentLengthHeader")


def test_list_blobs_parameters(oauth):
    send, _c, gate = oauth
    with gate.expecting("OutOfRangeQueryParameterValue", "InvalidQueryParameterValue"):
        assert send("GET", restype="container", comp="list", maxresults="0").status_code == 400
        assert send("GET", restype="container", comp="list", include="metadata,bogus").status_code == 400
    assert send("GET", restype="container", comp="list", maxresults="5000", include="metadata").status_code == 200


@pytest.mark.parametrize(
    ("version", "length", "rule"),
    [
        ("2015-12-11", 4 * 1024 * 1024 + 1, "block-size"),
        ("2019-07-07", 100 * 1024 * 1024 + 1, "block-size"),
        ("2021-12-02", 4000 * 1024 * 1024 + 1, "block-size"),
    ],
)
def test_block_size_limits_follow_the_version(version, length, rule):
    gate = StrictGate("127.0.0.1", 9)
    h = {"authorization": "SharedKey a:b", "x-ms-version": version, "x-ms-date": formatdate(usegmt=True)}
    h.update({"content-length": str(length), "content-md5": _md5(b"")})
    with pytest.raises(_Refuse) as e:
        gate._check("PUT", "/a/c/b", {"comp": "block", "blockid": _bid("0")}, h, length)
    assert (e.value.status, e.value.code, e.value.rule) == (413, "RequestBodyTooLarge", rule)
    gate._check("PUT", "/a/c/b", {"comp": "block", "blockid": _bid("0")}, h, length - 1)


@pytest.mark.parametrize(("version", "limit"), [("2015-12-11", 64), ("2019-07-07", 256), ("2021-12-02", 5000)])
def test_put_blob_size_limits_follow_the_version(version, limit):
    gate = StrictGate("127.0.0.1", 9)
    length = limit * 1024 * 1024 + 1
    h = {"authorization": "SharedKey a:b", "x-ms-version": version, "x-ms-date": formatdate(usegmt=True)}
    h.update({"content-length": str(length), "x-ms-blob-type": "BlockBlob"})
    with pytest.raises(_Refuse) as e:
        gate._check("PUT", "/a/c/b", {}, h, length)
    assert (e.value.status, e.value.code) == (413, "RequestBodyTooLarge")


def test_100000_uncommitted_blocks_is_the_limit():
    gate = StrictGate("127.0.0.1", 9)
    for i in range(100_000):
        gate._after("PUT", "/a/c/b", {"comp": "block", "blockid": _bid(f"{i:06d}")}, 201)
    h = {"authorization": "SharedKey a:b", "x-ms-version": VERSION, "x-ms-date": formatdate(usegmt=True)}
    h.update({"content-length": "1", "content-md5": _md5(b"x")})
    with pytest.raises(_Refuse) as e:
        gate._check("PUT", "/a/c/b", {"comp": "block", "blockid": _bid("100000")}, h, 1)
    assert (e.value.status, e.value.code) == (409, "BlockCountExceedsLimit")
    gate._after("PUT", "/a/c/b", {"comp": "blocklist"}, 201)  # a commit drops the uncommitted blocks
    gate._check("PUT", "/a/c/b", {"comp": "block", "blockid": _bid("100000")}, h, 1)


def test_the_gate_passes_ranges_and_keep_alive_through(oauth):
    send, container, gate = oauth
    data = bytes(range(256)) * 4096
    assert _put_blob(send, "r.bin", data).status_code == 201
    r = send("GET", "r.bin", {"Range": "bytes=1000-1999"})
    assert (r.status_code, r.content) == (206, data[1000:2000])
    before = len(gate.requests())
    blob = container.get_blob_client("r.bin")
    assert blob.download_blob().readall() == data
    assert len(gate.requests()) > before


def test_sdk_requests_carry_what_azure_requires(blob_container, azurite):
    """The SDK's own requests (as the agent sends them) pass every rule and carry the headers."""
    blob_container.upload_blob(f"{uuid.uuid4().hex}.bin", b"x" * 10)
    seen = azurite.gate.requests(method="PUT")
    assert seen and all(s.refused is None for s in seen)
    assert all({"x-ms-version", "x-ms-date", "x-ms-client-request-id"} <= set(s.headers) for s in seen)
