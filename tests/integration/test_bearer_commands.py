"""The commands that list the container, with a managed identity over HTTPS through the strict
gate: real Azure refuses a bearer-token request without x-ms-version >= 2017-11-09, Azurite does
not, so these only prove something with the gate in front."""

from __future__ import annotations

import uuid

from tests.integration import test_auth
from tests.integration.test_auth import _OTHER_MI_SOURCES, blobs, oauth_harness
from tests.support.media import make_content_addressed

oauth_container = test_auth.oauth_container  # the fixture, registered in this module


def test_migrate_verify_and_reconcile_with_a_managed_identity(
    tmp_path,
    media_roots,
    azurite_oauth,
    tls,
    token_server,
    monkeypatch,
    request,
):
    container = request.getfixturevalue("oauth_container")
    for var in _OTHER_MI_SOURCES:
        monkeypatch.delenv(var, raising=False)
    h = oauth_harness(
        tmp_path,
        media_roots,
        azurite_oauth,
        tls,
        container,
        AZURE_AUTH_MODE="managed_identity",
        AZURE_CLIENT_ID=str(uuid.uuid4()),
    )
    h.write_config()
    env = {"AZURE_POD_IDENTITY_AUTHORITY_HOST": token_server.url}
    _, big = make_content_addressed(media_roots["video"], 700_000, "mp4", seed=31)  # three 256 KiB blocks
    _, small = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=32)

    plan = h.cli_json("migrate", "--dry-run", env=env, check=True)
    assert plan["bytes_to_send"] == 700_000 + 3000, plan
    done = h.cli_json("migrate", env=env, check=True)
    assert done["uploaded"] == 2 and done["complete"] is True, done
    assert {f"video/{big}.mp4", f"audio/{small}.mp3"} <= blobs(azurite_oauth, tls, container)
    h.cli("verify", "--all", "--no-progress", env=env, check=True)
    h.cli("reconcile", env=env, check=True)
    listed = azurite_oauth.gate.requests(method="GET", comp="list")
    by_agent = [s for s in listed if s.headers.get("authorization", "").startswith("Bearer ")]
    assert by_agent and all(s.headers.get("x-ms-version", "") >= "2017-11-09" for s in by_agent)
    # The block upload went out with a transactional MD5 on every block.
    blocks = azurite_oauth.gate.requests(method="PUT", comp="block")
    assert len(blocks) == 3 and all("content-md5" in s.headers for s in blocks)
