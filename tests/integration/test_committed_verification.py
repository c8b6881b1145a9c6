"""A block upload is proven by the service's own record (the committed block list, whose ids carry
the MD5 the service checked each block against), and a per-block MD5 that stops reaching the
wire fails loudly. Against Azurite through the strict gate."""

from __future__ import annotations

import base64
import hashlib

import pytest
from azure.storage.blob import BlobBlock, ContentSettings

from agent.errors import VerificationFailed
from agent.media import media_file_for_path
from agent.storage import StoreUnavailable, azure_sdk_private
from agent.storage.azure_blob import AzureBlobStore, block_id
from agent.transfer import Transfer
from tests.support.media import make_content_addressed

BLOCK = 256 * 1024


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()  # noqa: S324


def _upload(harness, media_roots, size: int, seed: int):
    config = harness.config(UPLOAD_BLOCK_SIZE="256KiB")
    store = AzureBlobStore(config)
    path, sha = make_content_addressed(media_roots["video"], size, "mp4", seed=seed)
    mf = media_file_for_path(config, path)
    result = Transfer(store, BLOCK, 2).upload(mf)
    return store, mf, path.read_bytes(), result


def test_a_block_upload_is_verified_by_its_committed_block_list(harness, media_roots, azurite):
    store, mf, data, result = _upload(harness, media_roots, 3 * BLOCK + 100, seed=41)
    ids = [block_id(i, _md5(data[o : o + BLOCK])) for i, o in enumerate(range(0, len(data), BLOCK))]
    assert [b for b, _ in store.committed_blocks(mf.blob_name)] == ids
    args = (mf.blob_name, len(data), _md5(data), result.sha256)
    assert store.verify_committed(*args, result.etag) is None
    assert store.verify_committed(*args, result.etag, block_ids=ids) is None
    assert store.verify_committed(*args, '"0xother"').startswith("the blob changed since it was uploaded")
    assert store.verify_committed("video/none.mp4", 1, b"0" * 16, "0" * 64, None) == "the blob does not exist"
    # Every block went out with its transactional Content-MD5, the MD5 its id names.
    sent = [s for s in azurite.gate.requests(method="PUT", comp="block") if mf.blob_name in s.path]
    assert len(sent) == 4
    for s in sent:
        bid = base64.b64decode(s.query["blockid"]).decode()
        assert base64.b64decode(s.headers["content-md5"]).hex() == bid.split("-")[1]


def test_a_blob_recommitted_with_other_blocks_is_not_proven(harness, media_roots):
    store, mf, data, result = _upload(harness, media_roots, 3 * BLOCK, seed=42)
    ids = [block_id(i, _md5(data[o : o + BLOCK])) for i, o in enumerate(range(0, len(data), BLOCK))]
    # Another writer replaces the middle block with other bytes of the same size and commits with
    # the very properties the agent set (Content-MD5 and sha256 metadata are client-written).
    other = bytes(BLOCK)
    forged = block_id(1, _md5(other))
    blob = store.blob(mf.blob_name)
    azure_sdk_private.stage_block(blob, forged, other, _md5(other))
    blob.commit_block_list(
        [BlobBlock(ids[0]), BlobBlock(forged), BlobBlock(ids[2])],
        content_settings=ContentSettings(content_type="video/mp4", content_md5=bytearray(_md5(data))),
        metadata={"sha256": result.sha256},
    )
    reason = store.verify_committed(mf.blob_name, len(data), _md5(data), result.sha256, None, block_ids=ids)
    assert reason is not None and "not the 3 blocks of the file" in reason
    # The agent's own check after a commit is this comparison: a forged list fails the upload.
    with pytest.raises(VerificationFailed, match="does not match the local file"):
        Transfer(store, BLOCK, 2)._verify_committed(mf, len(data), result.sha256, _md5(data), None, ids)


def test_a_committed_list_of_foreign_ids_or_sizes_is_not_proven(harness, media_roots):
    store, mf, data, result = _upload(harness, media_roots, 2 * BLOCK, seed=43)
    blob = store.blob(mf.blob_name)
    for bid in ("000000-foreign-block-id-of-len-39", "000001-foreign-block-id-of-len-39"):
        blob.stage_block(bid, data[:BLOCK], validate_content="md5")
    blob.commit_block_list(
        [BlobBlock("000000-foreign-block-id-of-len-39"), BlobBlock("000001-foreign-block-id-of-len-39")],
        content_settings=ContentSettings(content_type="video/mp4", content_md5=bytearray(_md5(data))),
        metadata={"sha256": result.sha256},
    )
    reason = store.verify_committed(mf.blob_name, len(data), _md5(data), result.sha256, None)
    assert reason is not None and "not one of the agent's" in reason


def test_a_single_put_blob_is_proven_by_the_content_md5_the_service_checked(harness, media_roots):
    store, mf, data, result = _upload(harness, media_roots, 1000, seed=44)
    assert store.committed_blocks(mf.blob_name) == []
    assert store.verify_committed(mf.blob_name, 1000, _md5(data), result.sha256, result.etag) is None
    reason = store.verify_committed(mf.blob_name, 1000, _md5(b"other"), result.sha256, None)
    assert reason == "the blob's Content-MD5 differs from the file's MD5"


def test_verify_committed_raises_store_unavailable_when_the_service_is_down(private_harness, media_roots):
    h, az = private_harness
    store = AzureBlobStore(h.config(AZURE_NETWORK_TIMEOUT="2"))
    az.kill()
    with pytest.raises(StoreUnavailable):
        store.verify_committed("video/x.mp4", 1, b"0" * 16, "0" * 64, None)


def test_a_per_block_md5_that_stops_reaching_the_wire_fails_the_upload(harness, media_roots, azurite, monkeypatch):
    """A stand-in for an SDK upgrade that drops the transactional MD5: the gate's agent rule
    refuses the blocks, so the upload fails (and an unexpected refusal would fail any test)."""

    def without_md5(blob, block_id, data, md5, **options):
        return blob.stage_block(block_id, data, length=len(data), **options)

    monkeypatch.setattr(azure_sdk_private, "stage_block", without_md5)
    with azurite.gate.expecting("GateMissingTransactionalMd5"), pytest.raises(StoreUnavailable) as e:
        _upload(harness, media_roots, 2 * BLOCK, seed=45)
    assert "GateMissingTransactionalMd5" in str(e.value)
    assert {r.rule for r in azurite.gate.refusals} == {"agent-block-md5"}


def test_the_stream_download_keeps_its_zero_copy_reader(blob_container):
    """azure_sdk_private.download/body_reader against a real HTTP response: if urllib3 or the SDK
    change what they rely on, streams fall back to copying reads; this says so loudly."""
    data = bytes(range(256)) * 1024
    blob = blob_container.get_blob_client("video/s.mp4")
    etag = blob.upload_blob(data)["etag"]
    response = azure_sdk_private.download(blob, 1000, 5000, etag)
    reader = azure_sdk_private.body_reader(response)
    assert reader is not None, "urllib3 no longer exposes the socket-level reader (_fp.readinto)"
    buf = bytearray(5000)
    got = 0
    while got < 5000 and (n := reader.readinto(memoryview(buf)[got:])):
        got += n
    assert bytes(buf[:got]) == data[1000:6000]
    assert azure_sdk_private.body_finished(response)
    response.raw.release_conn()
