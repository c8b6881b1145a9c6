"""Putting a file back (agent/restore.py) asks whether it is still wanted once its bytes are
verified, before and after they go in place: GigHive may delete the file during the download, and
its admin delete unlinks the local file only if it is there (the way back's part of "nothing the
operator deleted comes back"). Real files and Azurite."""

from __future__ import annotations

from agent.actions import upload
from agent.media import media_file_for_blob
from agent.restore import restore
from agent.storage.azure_blob import AzureBlobStore
from tests.support.media import make_content_addressed


def _uploaded(harness, media_roots):
    path, sha = make_content_addressed(media_roots["audio"], 50_000, "mp3", seed=4242)
    data = path.read_bytes()
    result = upload.run(harness.config(), watch=False)
    assert result["uploaded"] == 1, result
    path.unlink()  # evicted, as far as this test is concerned
    config = harness.config()
    mf = media_file_for_blob(config, f"audio/{sha}.mp3")
    assert mf is not None
    return AzureBlobStore(config), mf, data, sha


def test_a_delete_before_the_link_keeps_the_file_out(harness, blob_container, media_roots) -> None:
    store, mf, data, sha = _uploaded(harness, media_roots)
    r = restore(store, mf, len(data), sha, None, still_wanted=lambda: False)
    assert r.withdrawn and not mf.path.exists()
    assert not any(p.name.endswith(".gighive-restore") for p in mf.path.parent.iterdir())


def test_a_delete_between_the_checks_takes_the_new_copy_away_again(harness, blob_container, media_roots) -> None:
    store, mf, data, sha = _uploaded(harness, media_roots)
    answers = iter([True, False])  # wanted before the link, deleted by the time it is in place
    r = restore(store, mf, len(data), sha, None, still_wanted=lambda: next(answers))
    assert r.withdrawn and not mf.path.exists()
    assert blob_container.get_blob_client(f"audio/{sha}.mp3").download_blob().readall() == data  # untouched


def test_a_file_still_wanted_comes_back(harness, blob_container, media_roots) -> None:
    store, mf, data, sha = _uploaded(harness, media_roots)
    r = restore(store, mf, len(data), sha, None, still_wanted=lambda: True)
    assert not r.withdrawn and mf.path.read_bytes() == data
