"""Small files go up in one Put Blob sent on urllib3 (agent/storage/azure_put.py), through the
strict-Azure gate, with the same checks as through the SDK; anything but a plain success is sent
again through the SDK."""

from __future__ import annotations

import hashlib

from azure.storage.blob import ContentSettings

from agent.actions import upload
from agent.state import StateStore
from agent.storage import azure_put
from tests.integration import test_auth
from tests.integration.agent_harness import blob_bytes, blob_names
from tests.integration.test_auth import blobs, oauth_harness
from tests.support.media import make_content_addressed

AGENT_UA = "gighive-media-agent/"

# test_auth's fixtures, registered in this module.
oauth_container = test_auth.oauth_container
imds = test_auth.imds


def _puts(gate) -> list:
    return [s for s in gate.requests(method="PUT") if s.comp is None]


def test_small_files_go_up_in_one_fast_put_each_with_every_check(harness, azurite, blob_container, media_roots):
    files = {}
    for seed in range(5):
        path, sha = make_content_addressed(media_roots["audio"], 3000 + seed, "mp3", seed=700 + seed)
        files[f"audio/{sha}.mp3"] = path
    azurite.gate.take_unexpected()
    result = upload.run(harness.config(), watch=False)
    assert result["uploaded"] == 5 and result["failed"] == 0, result
    assert blob_names(blob_container) == set(files)
    puts = _puts(azurite.gate)
    assert len(puts) == 5
    for seen in puts:
        assert seen.headers["user-agent"].startswith(AGENT_UA)
        assert seen.headers["authorization"].startswith("SharedKey ")
        assert seen.headers["if-none-match"] == "*"
        assert seen.headers["content-md5"] == seen.headers["x-ms-blob-content-md5"]
    for name, path in files.items():
        data = path.read_bytes()
        assert blob_bytes(blob_container, name) == data
        props = blob_container.get_blob_client(name).get_blob_properties()
        assert bytes(props.content_settings.content_md5) == hashlib.md5(data).digest()  # noqa: S324
        assert props.metadata["sha256"] == hashlib.sha256(data).hexdigest()
        assert props.content_settings.content_type == "audio/mpeg"
    state = StateStore.open(harness.state_dir)
    try:
        for name in files:
            rec = state.get(name)
            assert rec is not None and rec.state == "uploaded"
            assert rec.etag == blob_container.get_blob_client(name).get_blob_properties().etag
    finally:
        state.close()


def test_an_existing_blob_is_answered_409_and_checked_not_overwritten(harness, azurite, blob_container, media_roots):
    path, sha = make_content_addressed(media_roots["audio"], 4000, "mp3", seed=710)
    name = f"audio/{sha}.mp3"
    data = path.read_bytes()
    blob_container.get_blob_client(name).upload_blob(
        data,
        content_settings=ContentSettings(content_type="audio/mpeg", content_md5=hashlib.md5(data).digest()),  # noqa: S324
        metadata={"sha256": sha},
    )
    etag = blob_container.get_blob_client(name).get_blob_properties().etag
    result = upload.run(harness.config(), watch=False)
    assert result["already_present"] == 1 and result["uploaded"] == 0, result
    assert blob_container.get_blob_client(name).get_blob_properties().etag == etag


def test_a_fast_put_that_does_not_succeed_is_sent_again_through_the_sdk(
    harness, azurite, blob_container, media_roots, monkeypatch
):
    path, sha = make_content_addressed(media_roots["audio"], 5000, "mp3", seed=720)
    real_put = azure_put.PutBlob.put
    tries: list[str] = []

    def failing_once(self, *args, **kwargs):
        tries.append("fast")
        if len(tries) == 1:
            # What urllib3 raises on a connection the server reset, seen as the fast path does.
            self.pool.close()
            raise azure_put.Fallback("ProtocolError: connection reset")
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(azure_put.PutBlob, "put", failing_once)
    azurite.gate.take_unexpected()
    result = upload.run(harness.config(), watch=False)
    assert result["uploaded"] == 1 and result["failed"] == 0, result
    assert tries == ["fast"]
    (seen,) = _puts(azurite.gate)
    assert not seen.headers["user-agent"].startswith(AGENT_UA)  # the SDK sent it
    assert seen.headers["content-md5"] == seen.headers["x-ms-blob-content-md5"]
    assert blob_bytes(blob_container, f"audio/{sha}.mp3") == path.read_bytes()


def test_a_refused_fast_put_is_reported_as_the_sdk_reports_it(private_harness, media_roots):
    """A wrong account key: the fast path's 403 falls back to the SDK, whose refusal (with its
    code and hint) is what the run records, as an outage."""
    h, az = private_harness
    make_content_addressed(media_roots["audio"], 3000, "mp3", seed=730)
    wrong = az.connection_string.replace(az.account_key, "d3Jvbmcga2V5" * 4)
    h.settings["AZURE_STORAGE_CONNECTION_STRING"] = wrong
    h.write_config()
    result = upload.run(h.config(), watch=False)
    assert result["uploaded"] == 0
    text = str(result["errors"])
    assert "AuthenticationFailed" in text or "403" in text, result


def test_small_files_with_a_managed_identity_go_up_fast_with_a_bearer_token(
    tmp_path, media_roots, azurite_oauth, tls, request
):
    request.getfixturevalue("imds")
    container = request.getfixturevalue("oauth_container")
    h = oauth_harness(tmp_path, media_roots, azurite_oauth, tls, container, AZURE_AUTH_MODE="managed_identity")
    names = set()
    for seed in range(3):
        _, sha = make_content_addressed(media_roots["audio"], 2000 + seed, "mp3", seed=740 + seed)
        names.add(f"audio/{sha}.mp3")
    azurite_oauth.gate.take_unexpected()
    result = upload.run(h.config(), watch=False)
    assert result["uploaded"] == 3 and result["failed"] == 0, result
    assert blobs(azurite_oauth, tls, container) == names
    puts = _puts(azurite_oauth.gate)
    assert len(puts) == 3
    for seen in puts:
        assert seen.headers["user-agent"].startswith(AGENT_UA)
        assert seen.headers["authorization"].startswith("Bearer ")
        assert seen.headers["x-ms-version"] >= "2017-11-09"
