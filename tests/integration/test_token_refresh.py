"""Tokens that expire in the middle of long work: a migration (listing, single-shot and block uploads)
and a long stream read, with the real agent code, managed identity against the loopback IMDS, and
HTTPS + OAuth Azurite, which refuses an expired bearer token (checked first, or the tests would prove
nothing).

Tokens live 20 s here, inside azure-core's 5-minute refresh window, so every request that finds its
token due asks IMDS again. The work is held up (waiting for a state: the first token's expiry, never
for a duration) until the token in use is dead, so it can only finish with fresh ones.
"""

from __future__ import annotations

import time
import uuid
from email.utils import formatdate

import pytest
import requests
from azure.storage.blob import BlobServiceClient

from agent.actions import migrate
from agent.storage.azure_blob import AzureBlobStore
from tests.integration.test_auth import blobs, oauth_harness
from tests.support.media import make_content_addressed, pseudo_random_bytes

LIFETIME = 20


@pytest.fixture
def short_tokens(imds, azurite_oauth, tls):
    # The premise: this Azurite refuses an expired token.
    expired = imds.mint(lifetime=-600)
    r = requests.get(
        f"{azurite_oauth.blob_endpoint}?comp=list",
        headers={
            "Authorization": f"Bearer {expired}",
            "x-ms-version": "2021-12-02",
            # A well-formed request, so the strict gate passes it to Azurite to judge the token.
            "x-ms-date": formatdate(usegmt=True),
        },
        verify=str(tls.ca),
        timeout=30,
    )
    assert r.status_code in (401, 403), r.status_code
    imds.reset()
    imds.set_lifetime(LIFETIME)
    return imds


@pytest.fixture
def imds(monkeypatch, token_server):
    from tests.integration.test_auth import _OTHER_MI_SOURCES

    for var in _OTHER_MI_SOURCES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", token_server.url)
    return token_server


@pytest.fixture
def container(azurite_oauth, tls):
    name = f"tok-{uuid.uuid4().hex[:12]}"
    BlobServiceClient.from_connection_string(
        azurite_oauth.connection_string, connection_verify=str(tls.ca)
    ).create_container(name)
    return name


def wait_until_current_token_expired(server) -> float:
    """Wait until the newest token handed out so far (the one the work is using) is dead; its expiry."""
    issued = server.issued
    assert issued, "no token was issued before the wait"
    deadline = issued[-1]["exp"] + 1
    while time.time() <= deadline:
        time.sleep(0.2)
    return deadline


def fresh_token_after(server, deadline: float) -> bool:
    """A token was minted at or after `deadline`, a second past the old one's expiry (mint: exp = int(now) + lifetime)."""
    return any(t["exp"] - LIFETIME >= deadline for t in server.issued)


def test_a_migration_outliving_its_tokens_finishes(
    tmp_path, media_roots, azurite_oauth, tls, container, short_tokens, monkeypatch
):
    client_id = str(uuid.uuid4())
    h = oauth_harness(
        tmp_path,
        media_roots,
        azurite_oauth,
        tls,
        container,
        AZURE_AUTH_MODE="managed_identity",
        AZURE_CLIENT_ID=client_id,
        UPLOAD_FILE_CONCURRENCY="1",
        UPLOAD_BLOCK_CONCURRENCY="1",
    )
    small = [make_content_addressed(media_roots["audio"], 5000 + i, "mp3", seed=700 + i) for i in range(3)]
    big = make_content_addressed(media_roots["video"], 1024 * 1024 + 7, "mp4", seed=710)  # 5 blocks of 256 KiB

    # Held up twice, each time until the token in use is dead: in the middle of the block upload
    # (before its second block) and between two files.
    calls = {"put": 0, "stage_block": 0}
    deadlines: list[float] = []
    original_put, original_stage = AzureBlobStore.put, AzureBlobStore.stage_block

    def held(fn, name):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            if calls[name] == 2:
                deadlines.append(wait_until_current_token_expired(short_tokens))
            return fn(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(AzureBlobStore, "put", held(original_put, "put"))
    monkeypatch.setattr(AzureBlobStore, "stage_block", held(original_stage, "stage_block"))

    result, code = migrate.run(h.config(), migrate.Options(interactive=False))
    assert code == 0, result
    assert result["uploaded"] == 4, result
    names = blobs(azurite_oauth, tls, container)
    for path, sha in [*small, big]:
        assert f"{path.parent.name}/{sha}{path.suffix}" in names
    assert len(deadlines) == 2, calls
    assert all(fresh_token_after(short_tokens, d) for d in deadlines), (deadlines, short_tokens.issued)
    assert {r.client_id for r in short_tokens.token_requests(kind="imds")} == {client_id}


def test_a_long_stream_read_and_a_later_seek_outlive_their_tokens(
    tmp_path, media_roots, azurite_oauth, tls, container, short_tokens
):
    from agent.stream.settings import load_settings
    from agent.stream.sources import BlobSource

    data = pseudo_random_bytes(3 * 1024 * 1024 + 123, seed=720)
    name = "video/long-stream.mp4"
    service = BlobServiceClient.from_connection_string(azurite_oauth.connection_string, connection_verify=str(tls.ca))
    service.get_container_client(container).upload_blob(name, data)
    h = oauth_harness(tmp_path, media_roots, azurite_oauth, tls, container, AZURE_AUTH_MODE="managed_identity")
    cfg = h.config()
    source = BlobSource(cfg, load_settings(cfg))

    chunks = source.read_range(name, 0, len(data), chunk_size=256 * 1024)
    got = [next(chunks)]
    # A viewer pauses: the token the read started with dies while the response is open.
    deadline = wait_until_current_token_expired(short_tokens)
    got.extend(chunks)
    assert b"".join(got) == data
    # Then seeks: a new request, which needs (and gets) a fresh token.
    seek = b"".join(source.read_range(name, 2 * 1024 * 1024, 1024 * 1024))
    assert seek == data[2 * 1024 * 1024 : 3 * 1024 * 1024]
    assert fresh_token_after(short_tokens, deadline), short_tokens.issued
