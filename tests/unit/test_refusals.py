"""A refused request is reported with the service's code, what it named, the request id and a hint
for that code; "the credentials are wrong" only when they are. The refusals are Azure's answers
as the SDK raises them (canned at the HTTP adapter)."""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError

from agent.storage.azure_blob import _describe
from tests.unit.test_sdk_contract import _Recorder, _service


def _refusal(status: int, code: str, message: str, **details: str) -> str:
    extra = "".join(f"<{k}>{v}</{k}>" for k, v in details.items())
    body = (
        f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}\n'
        f"RequestId:5f0c1d2e-0000-0000-0000-000000000000\nTime:2026-11-30T01:00:00.0000000Z</Message>{extra}</Error>"
    ).encode()
    rec = _Recorder(
        status,
        {
            "Content-Type": "application/xml",
            "x-ms-error-code": code,
            "x-ms-request-id": "5f0c1d2e-0000-0000-0000-000000000000",
        },
        body,
    )
    blob = _service(rec).get_container_client("c").get_blob_client("b")
    with pytest.raises(HttpResponseError) as e:
        blob.set_blob_metadata({"a": "b"})
    return _describe(e.value)


def test_bearer_not_supported_in_this_version_blames_the_request_not_the_credential() -> None:
    text = _refusal(
        403,
        "AuthenticationFailed",
        "Server failed to authenticate the request.",
        AuthenticationErrorDetail="Authentication scheme Bearer is not supported in this version.",
    )
    assert "HTTP 403 AuthenticationFailed" in text
    assert "x-ms-version" in text and "not a credential problem" in text
    assert "wrong account key" not in text
    assert "request id 5f0c1d2e-0000-0000-0000-000000000000" in text


def test_a_signature_mismatch_is_about_the_key() -> None:
    text = _refusal(
        403,
        "AuthenticationFailed",
        "Server failed to authenticate the request.",
        AuthenticationErrorDetail="The MAC signature found in the HTTP request 'x' is not the same as any "
        "computed signature. Signature did not match.",
    )
    assert "account key does not match" in text


def test_an_invalid_header_value_names_the_header_and_is_not_a_credential_problem() -> None:
    text = _refusal(
        400,
        "InvalidHeaderValue",
        "The value for one of the HTTP headers is not in the correct format.",
        HeaderName="x-ms-version",
        HeaderValue="2099-01-01",
    )
    assert "header x-ms-version='2099-01-01'" in text
    assert "not a credential problem" in text
    assert "request id 5f0c1d2e" in text


def test_a_conflict_says_what_holds_the_blob() -> None:
    text = _refusal(409, "LeaseIdMissing", "There is currently a lease on the blob.")
    assert text.startswith("HTTP 409 LeaseIdMissing") and "lease" in text.split("(")[-1]
