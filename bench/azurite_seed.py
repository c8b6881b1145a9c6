"""Give a stopped Azurite a container of N blobs by writing its on-disk store, then check it served.

Why: Azurite 3.35's LokiJS blob store makes every Put Blob quadratic. `createBlob` looks the new
blob up with `findOne` over a collection whose first binary index is `accountName`, the same for
every blob, so each put scans the whole container: about 350 puts/s on an empty container, 30/s
at 40,000 blobs, and a 100,000-blob fill through the API never finishes (it died at 65,000).

What it does: Azurite itself (started on `--location DIR`, then stopped) creates the container and
one template blob through the real API, so the database, the container document and the blob
document have exactly the shapes this Azurite writes. `seed` then replaces the blob collection
with one document per file (the agent's name, Content-Length, Content-MD5, ETag, Last-Modified,
metadata sha256, BlockBlob, Hot, all copied from the template's shape) and the extent collection
with one extent per blob, whose file under `__blobstorage__/` is a hard link to the library file
(zero bytes copied, the blob's bytes are the file's; a copy when linking is not possible). The
link is safe for the library: Azurite only reads an extent it did not create (it appends new data
to new extents of its own), and its garbage collector, if it ever dropped one, would unlink only
the link. The
binary indices are written sorted as LokiJS would sort them. Only the loading is skipped:
afterwards Azurite loads this store and serves every List Blobs, Get Blob and Get Blob
Properties of the measurement itself. `check` proves that through the HTTP API.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from azure.storage.blob import BlobServiceClient, ContentSettings

BLOB_DB = "__azurite_db_blob__.json"
EXTENT_DB = "__azurite_db_blob_extent__.json"
BLOBS = "$BLOBS_COLLECTION$"
EXTENTS = "$EXTENTS_COLLECTION$"
TEMPLATE = "seed-template"


def prepare(connection_string: str, container: str) -> None:
    """Through the running Azurite: the container, and one blob written as `fill` writes one."""
    client = BlobServiceClient.from_connection_string(connection_string).get_container_client(container)
    client.create_container()
    data = b"template"
    client.upload_blob(
        TEMPLATE,
        data,
        metadata={"sha256": hashlib.sha256(data).hexdigest()},
        content_settings=ContentSettings(content_md5=hashlib.md5(data).digest()),  # noqa: S324 - Content-MD5
    )


def digests(path: Path) -> tuple[int, bytes, str]:
    data = path.read_bytes()
    return len(data), hashlib.md5(data).digest(), hashlib.sha256(data).hexdigest()  # noqa: S324 - Content-MD5


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _sorted_positions(values: list[str]) -> list[int]:
    # LokiJS compares two non-numeric strings with `<` (UTF-16 code units); for these ASCII names
    # that is Python's order. Equal values (account, container, snapshot) may stand in any order.
    return sorted(range(len(values)), key=values.__getitem__)


def seed(
    location: Path, container: str, files: list[tuple[str, Path]], *, rng_seed: int = 1, workers: int = 2
) -> dict[str, tuple[int, bytes, str]]:
    """Write the blobs of `files` (blob name, path) into the stopped Azurite's store at `location`.

    Returns blob name -> (size, MD5, SHA-256 hex), what `check` compares against.
    """
    db_path, extent_path = location / BLOB_DB, location / EXTENT_DB
    db = json.loads(db_path.read_text())
    extent_db = json.loads(extent_path.read_text())
    blobs = next(c for c in db["collections"] if c["name"] == BLOBS)
    extents = next(c for c in extent_db["collections"] if c["name"] == EXTENTS)
    template = next(d for d in blobs["data"] if d["name"] == TEMPLATE and d["containerName"] == container)
    if any(d["persistency"]["id"] != template["persistency"]["id"] for d in blobs["data"]):
        raise RuntimeError(f"{location} holds more than the template blob; seed an emptied store")
    storage = location / "__blobstorage__"
    # The template's extent goes with it: nothing will refer to it.
    (storage / template["persistency"]["id"]).unlink(missing_ok=True)

    with ThreadPoolExecutor(workers) as pool:
        sums = dict(zip((n for n, _ in files), pool.map(digests, (p for _, p in files)), strict=True))

    rng = random.Random(rng_seed)
    now = int(time.time() * 1000)
    blob_docs, extent_docs = [], []
    for i, (name, path) in enumerate(files):
        size, md5, sha = sums[name]
        ms = now + i // 50  # Put Blob times as a fill of a few thousand blobs/s would stamp them
        extent_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        target = storage / extent_id
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
        doc = json.loads(json.dumps(template))
        props = doc["properties"]
        props["creationTime"] = props["lastModified"] = props["accessTierChangeTime"] = _iso(ms)
        # Azurite's newEtag: the time in ms times a random 70,000..100,000, in upper-case hex.
        props["etag"] = f'"0x{ms * rng.randint(70000, 100000):X}"'
        props["contentLength"] = size
        props["contentMD5"] = {"type": "Buffer", "data": list(md5)}
        doc.update(name=name, metadata={"sha256": sha}, persistency={"id": extent_id, "offset": 0, "count": size})
        doc["meta"] = {"revision": 0, "created": ms, "version": 0}
        doc["$loki"] = i + 1
        blob_docs.append(doc)
        extent_docs.append(
            {
                "id": extent_id,
                "locationId": "Default",
                "path": extent_id,
                "size": size,
                "lastModifiedInMS": ms,
                "meta": {"revision": 0, "created": ms, "version": 0},
                "$loki": i + 1,
                "LastModifyInMS": ms,
            }
        )

    blobs["data"], blobs["maxId"], blobs["idIndex"] = blob_docs, len(blob_docs), None
    for prop, index in blobs["binaryIndices"].items():
        index.update(dirty=False, values=_sorted_positions([d[prop] for d in blob_docs]))
    extents["data"], extents["maxId"], extents["idIndex"] = extent_docs, len(extent_docs), None
    extents["binaryIndices"]["id"].update(dirty=False, values=_sorted_positions([d["id"] for d in extent_docs]))
    for path, content in ((db_path, db), (extent_path, extent_db)):
        tmp = path.with_suffix(".seed-tmp")
        tmp.write_text(json.dumps(content, separators=(",", ":")))
        tmp.replace(path)
    return sums


def check(
    connection_string: str, container: str, sums: dict[str, tuple[int, bytes, str]], files: list[tuple[str, Path]]
) -> dict[str, int]:
    """Through the running Azurite: the listing is exactly `sums`; a sample GETs and HEADs right."""
    client = BlobServiceClient.from_connection_string(connection_string).get_container_client(container)
    listed = 0
    for props in client.list_blobs(include=["metadata"]):
        size, md5, sha = sums[props.name]
        cs = props.content_settings
        if (props.size, bytes(cs.content_md5 or b""), props.metadata.get("sha256")) != (size, md5, sha):
            raise RuntimeError(f"listing of {props.name} differs: {props.size} {cs.content_md5!r} {props.metadata}")
        listed += 1
    if listed != len(sums):
        raise RuntimeError(f"listed {listed} blobs, seeded {len(sums)}")
    sample = random.Random(0).sample(files, min(200, len(files))) + [files[0], files[-1]]
    for name, path in sample:
        blob = client.get_blob_client(name)
        data = blob.download_blob().readall()
        if data != path.read_bytes():
            raise RuntimeError(f"GET {name} returned other bytes than {path}")
        p = blob.get_blob_properties()
        size, md5, sha = sums[name]
        got = (p.size, bytes(p.content_settings.content_md5), p.metadata.get("sha256"), p.blob_type, p.blob_tier)
        if got != (size, md5, sha, "BlockBlob", "Hot") or not p.etag or not p.last_modified:
            raise RuntimeError(f"HEAD {name}: {got} {p.etag} {p.last_modified}")
    return {"listed": listed, "get_and_head_checked": len(sample)}
