"""`gighive-media verify`: are the files the agent uploaded still right, in Blob and on disk?

For each uploaded file (all, a random sample, or one root's), the blob's properties (size,
Content-MD5, sha256 metadata) are compared with what was recorded at upload time and, where the
local copy is still there, with the file's own bytes, hashed now. `--readback` also downloads
each blob and hashes it. Evicted files are checked against what was recorded when they were
uploaded. Nothing is changed; the exit code says whether everything matched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..bounded_map import bounded_map
from ..config import Config, MediaRoot
from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE
from ..inventory import iter_listed, prefixes_for
from ..media import media_file_for_blob
from ..notify import Notifier
from ..progress import Progress, human_bytes, human_duration
from ..state import StateStore, Uploaded
from ..storage import Listed, StoreUnavailable
from ..storage.azure_blob import AzureBlobStore

log = logging.getLogger(__name__)

# Verdicts; the first three are failures, the others information.
FAILURES = ("missing_blob", "mismatch", "local_corruption", "unreadable")
INFO = ("changed_locally", "local_missing")

# At most this many problems are in the result (all of them are in the log).
_PROBLEMS_REPORTED = 500
# Below this many files, a HEAD per file is cheaper than listing the prefixes they share.
_LIST_ABOVE = 200


@dataclass(frozen=True)
class Verdict:
    blob_name: str
    verdict: str  # "ok" or one of FAILURES / INFO
    detail: str = ""
    bytes_read: int = 0


def run(
    config: Config,
    roots: tuple[MediaRoot, ...],
    sample: int | None,
    readback: bool,
    seed: int | None = None,
    interactive: bool | None = None,
) -> tuple[dict[str, object], int]:
    started = time.monotonic()
    names = {r.name for r in roots}
    state = StateStore.open_readonly(config.state_dir)
    if state is None:
        return {"checked": 0, "note": "no upload has run yet: nothing to verify"}, EXIT_OK
    try:
        records = state.uploads(names)
    finally:
        state.close()
    if sample is not None and sample < len(records):
        records = random.Random(seed).sample(records, sample)
    store = AzureBlobStore(config)
    try:
        listing = _Listing(store, records, keep=readback) if len(records) > _LIST_ABOVE else None
    except StoreUnavailable as e:
        return {"error": "unavailable", "message": str(e)}, EXIT_UNAVAILABLE
    to_read = sum((r.size or 0) for r in records if r.local_copy) + (
        sum(r.size or 0 for r in records) if readback else 0
    )
    progress = Progress("verify", len(records), to_read, Notifier(), interactive=interactive)
    counts = {k: 0 for k in ("ok", *FAILURES, *INFO)}
    problems: list[dict[str, str]] = []
    checked = bytes_read = 0
    outage: str | None = None

    def check(item: tuple[int, Uploaded]) -> Verdict:
        v = _check(config, store, listing, *item, readback)
        progress.advance(1, v.bytes_read, problems=int(v.verdict in FAILURES))
        return v

    try:
        with ThreadPoolExecutor(config.file_concurrency, thread_name_prefix="verify") as pool:
            # Only the counts and the problems reported are kept (every problem is logged): a
            # verdict per file of a 100,000-file library, and a future per file submitted up
            # front, would hold more than the records themselves.
            for v in bounded_map(pool, check, enumerate(records), ahead=4 * config.file_concurrency):
                checked += 1
                bytes_read += v.bytes_read
                counts[v.verdict] += 1
                if v.verdict != "ok":
                    if len(problems) < _PROBLEMS_REPORTED:
                        problems.append({"blob_name": v.blob_name, "verdict": v.verdict, "detail": v.detail})
                    _log_problem(v)
    except StoreUnavailable as e:
        outage = str(e)
        log.error("verify stopped: Azure Blob is unusable: %s", e)
    finally:
        progress.close()

    result: dict[str, object] = {
        "checked": checked,
        "sampled": sample is not None,
        "readback": readback,
        "counts": counts,
        "problems": problems,
        "bytes_read": bytes_read,
        "duration_s": round(time.monotonic() - started, 3),
        "outage": outage,
    }
    failed = sum(counts[k] for k in FAILURES)
    log.info(
        "verify finished: %d checked, %d ok, %d failed (%s) in %s",
        checked,
        counts["ok"],
        failed,
        ", ".join(f"{k} {counts[k]}" for k in (*FAILURES, *INFO) if counts[k]) or "none",
        human_duration(time.monotonic() - started),
    )
    if outage is not None:
        return result, EXIT_UNAVAILABLE
    return result, EXIT_FAILURE if failed else EXIT_OK


def _log_problem(v: Verdict) -> None:
    level = logging.ERROR if v.verdict in FAILURES else logging.WARNING
    log.log(
        level,
        "verify %s: %s: %s",
        v.blob_name,
        v.verdict,
        v.detail,
        extra={"fields": {"blob_name": v.blob_name, "verdict": v.verdict}},
    )


class _Listing:
    """What the container listing says of each record, judged as the listing arrives and kept
    as a verdict, not as entries (those of a 100,000-blob listing held whole are ~60 MiB): seen
    or not, and the differences where there are any. With `keep` (read-back) each entry is kept
    too, for the size and ETag a read needs."""

    def __init__(self, store: AzureBlobStore, records: list[Uploaded], keep: bool) -> None:
        position = {r.blob_name: i for i, r in enumerate(records)}
        self.seen = bytearray(len(records))
        self.differs: dict[int, str] = {}
        self.kept: dict[int, Listed] = {}
        for name, blob in iter_listed(store, prefixes_for(position), keep=position.__contains__):
            i = position.get(name)
            if i is None:
                continue
            self.seen[i] = 1
            if diffs := _differences(records[i], blob):
                self.differs[i] = diffs
            elif keep:
                self.kept[i] = blob


def _differences(rec: Uploaded, blob: Listed) -> str:
    """How the blob's properties differ from what was recorded at upload ("" if they agree)."""
    recorded_md5 = bytes.fromhex(rec.md5) if rec.md5 else None
    diffs = []
    if blob.size != rec.size:
        diffs.append(f"size {blob.size} != recorded {rec.size}")
    if blob.sha256 != rec.sha256:
        diffs.append(f"sha256 metadata {blob.sha256} != recorded {rec.sha256}")
    if blob.content_md5 is not None and recorded_md5 is not None and blob.content_md5 != recorded_md5:
        diffs.append("Content-MD5 differs from the recorded MD5")
    return "; ".join(diffs)


def _check(
    config: Config, store: AzureBlobStore, listing: _Listing | None, i: int, rec: Uploaded, readback: bool
) -> Verdict:
    name = rec.blob_name
    blob: Listed | None
    if listing is not None:
        present, diffs, blob = bool(listing.seen[i]), listing.differs.get(i, ""), listing.kept.get(i)
    else:
        info = store.stat(name)
        blob = Listed(info.size, info.etag, info.content_md5, info.sha256) if info is not None else None
        present, diffs = blob is not None, _differences(rec, blob) if blob is not None else ""
    if not present:
        where = (
            "the local copy is still there; `gighive-media reconcile` queues it again"
            if rec.local_copy
            else ("the local copy was deleted after upload: this file is lost unless a backup has it")
        )
        return Verdict(name, "missing_blob", where)
    if diffs:
        return Verdict(name, "mismatch", diffs)
    recorded_md5 = bytes.fromhex(rec.md5) if rec.md5 else None
    read = 0
    if readback:
        assert blob is not None  # a listing keeps every matching entry when reading back
        sha, md5, size = hashlib.sha256(), hashlib.md5(), 0  # noqa: S324 - Content-MD5 comparison
        for chunk in store.read_range(name, 0, blob.size, etag=blob.etag):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
        read += size
        if size != rec.size or sha.hexdigest() != rec.sha256 or (recorded_md5 and md5.digest() != recorded_md5):
            return Verdict(name, "mismatch", f"read-back: {size} bytes, sha256 {sha.hexdigest()}", read)
    if not rec.local_copy:
        return Verdict(name, "ok", bytes_read=read)
    mf = media_file_for_blob(config, name)
    if mf is None:
        return Verdict(name, "local_missing", "no longer under a configured media root", read)
    try:
        st = os.lstat(mf.path)
        size, sha, md5 = _hash_file(str(mf.path))
    except FileNotFoundError:
        return Verdict(name, "local_missing", f"{mf.path} is gone; the blob holds the only copy", read)
    except OSError as e:
        return Verdict(name, "unreadable", f"cannot read {mf.path}: {e.strerror}", read)
    read += size
    if (size, sha) == (rec.size, rec.sha256) and (recorded_md5 is None or md5 == recorded_md5):
        return Verdict(name, "ok", bytes_read=read)
    if (st.st_size, st.st_mtime_ns, st.st_ino) != (rec.size, rec.mtime_ns, rec.inode):
        return Verdict(
            name, "changed_locally", "the file was rewritten since its upload; the next scan uploads it", read
        )
    return Verdict(
        name,
        "local_corruption",
        f"{mf.path} hashes to {sha} but was {rec.sha256} when uploaded, with the same size and mtime "
        "(disk or filesystem corruption); the blob is intact",
        read,
    )


def _hash_file(path: str) -> tuple[int, str, bytes]:
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0  # noqa: S324 - Content-MD5 comparison
    with open(path, "rb", buffering=0) as f:
        while data := f.read(4 * 1024 * 1024):
            sha.update(data)
            md5.update(data)
            size += len(data)
    return size, sha.hexdigest(), md5.digest()


def render(result: dict[str, object]) -> str:
    if "error" in result:
        return f"verify: {result['message']}"
    if result.get("outage"):
        return f"verify stopped after {result['checked']} file(s): Azure Blob is unusable: {result['outage']}"
    if not result.get("checked"):
        return str(result.get("note") or "nothing to verify")
    counts = result["counts"]
    assert isinstance(counts, dict)
    lines = [
        f"checked {result['checked']} file(s){' (sample)' if result['sampled'] else ''}: {counts['ok']} ok"
        + "".join(f", {k.replace('_', ' ')} {v}" for k, v in counts.items() if k != "ok" and v)
        + f"; {human_bytes(int(result['bytes_read']))} read in {human_duration(float(result['duration_s']))}"  # type: ignore[call-overload, arg-type]
    ]
    for p in result.get("problems") or []:  # type: ignore[union-attr]
        lines.append(f"  {p['verdict']:<17} {p['blob_name']}: {p['detail']}")
    return "\n".join(lines)
