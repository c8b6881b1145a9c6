"""The loopback IMDS refuses what real IMDS refuses, so a test that gets a token from it proves the
agent's request would get one on a VM (how-to-use-vm-token: "Get a token using HTTP", "Error
handling"; instance-metadata-service: versions, headers, proxies)."""

from __future__ import annotations

import uuid

import pytest
import requests

GOOD = {"api-version": "2018-02-01", "resource": "https://storage.azure.com/"}


def ask(server, params: dict, headers: dict | None = None) -> requests.Response:
    session = requests.Session()
    session.trust_env = False
    return session.get(
        f"{server.url}/metadata/identity/oauth2/token",
        params=params,
        headers={"Metadata": "true"} if headers is None else headers,
        timeout=30,
    )


def test_the_documented_request_gets_a_token(token_server):
    r = ask(token_server, GOOD)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"].isdigit() and body["resource"] == GOOD["resource"]


@pytest.mark.parametrize(
    ("params", "headers", "error"),
    [
        (GOOD, {}, "bad_request_102"),
        (GOOD, {"Metadata": "True"}, "bad_request_102"),  # "true, in all lower case"
        (GOOD, {"Metadata": "true", "X-Forwarded-For": "10.0.0.9"}, "invalid_request"),
        ({"resource": GOOD["resource"]}, None, "api-version was not specified"),
        ({**GOOD, "api-version": "2017-09-01"}, None, "is not supported"),
        ({"api-version": "2018-02-01"}, None, "invalid_request"),
        ({**GOOD, "resource": "https://example.com"}, None, "invalid_resource"),
        ({**GOOD, "client_id": "not-a-guid"}, None, "invalid_request"),
        ({**GOOD, "client_id": str(uuid.uuid4()), "object_id": str(uuid.uuid4())}, None, "invalid_request"),
    ],
)
def test_what_imds_refuses_is_refused(token_server, params, headers, error):
    r = ask(token_server, params, headers)
    assert r.status_code == 400, r.text
    assert error in r.text


def test_an_identity_not_assigned_to_the_vm_is_not_found(token_server, monkeypatch):
    monkeypatch.setattr(token_server, "require_known_identity", True)
    assigned, other = str(uuid.uuid4()), str(uuid.uuid4())
    token_server.add_identity(assigned)
    assert ask(token_server, {**GOOD, "client_id": assigned}).status_code == 200
    r = ask(token_server, {**GOOD, "client_id": other})
    assert r.status_code == 400 and r.json()["error_description"] == "Identity not found"


def test_an_identity_being_assigned_answers_404_then_a_token(token_server):
    client_id = str(uuid.uuid4())
    token_server.add_identity(client_id, settling=2, status=404)
    got = [ask(token_server, {**GOOD, "client_id": client_id}).status_code for _ in range(3)]
    assert got == [404, 404, 200]
