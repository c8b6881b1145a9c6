"""Copying one local media file to the blob store, verified.

One read of the file feeds everything: the whole-file sha256 and MD5, the per-block MD5 the
service checks on arrival, and the upload itself. Nothing is committed until the bytes read
match the name (for content-addressed files) and the file did not change while being read, so
a blob only ever appears whole and right. After a block commit the service's committed block list
is read back and compared with the ids sent (each id carries the MD5 the service checked that
block against), because the service does not check a whole-blob MD5 on commit.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from . import interrupts
from .errors import ContentMismatch, FileRejected, Interrupted, VerificationFailed
from .media import MediaFile
from .ratelimit import RateLimiter
from .storage import Listed, ObjectInfo
from .storage.azure_blob import AzureBlobStore, block_id


@dataclass(frozen=True)
class TransferResult:
    size: int
    mtime_ns: int
    inode: int
    sha256: str
    md5: bytes
    etag: str
    already_present: bool
    blocks_total: int
    blocks_reused: int
    seconds: float


def open_media_file(path: str) -> tuple[int, os.stat_result]:
    """Open a regular file without following symlinks and without blocking on FIFOs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileRejected("symbolic link; media links are not followed") from None
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(path) from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise PermissionError(e.errno, f"permission denied reading {path}") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileRejected("not a regular file")
    return fd, st


class _Hasher:
    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()  # noqa: S324 - Content-MD5 is Azure's integrity field, not security
        self.size = 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        self.md5.update(data)
        self.size += len(data)


class Transfer:
    """Uploads files to one store with the configured block size, concurrency and rate."""

    def __init__(
        self,
        store: AzureBlobStore,
        block_size: int,
        block_concurrency: int,
        limiter: RateLimiter | None = None,
        readback: bool = False,
        stop: threading.Event | None = None,
    ):
        self.store = store
        self.block_size = block_size
        self.block_concurrency = block_concurrency
        self.limiter = limiter
        self.readback = readback
        # Set when the run is stopping: block uploads give up between blocks (staged blocks
        # stay, so the next run sends only what is missing).
        self.stop = stop or threading.Event()

    def upload(self, mf: MediaFile, listed: Listed | None = None) -> TransferResult:
        """Copy one file, verified. `listed` is what a container listing said is already stored
        under its name (migrate lists the container once for many files instead of asking per file)."""
        started = time.monotonic()
        fd, st = open_media_file(str(mf.path))
        # A stop gives a transfer in flight a short grace to finish or give up between blocks.
        with interrupts.busy(), os.fdopen(fd, "rb", buffering=0) as f:
            if st.st_size <= self.block_size:
                result = self._upload_small(mf, f, st, listed)
            else:
                result = self._upload_blocks(mf, f, st, block_size_for(st.st_size, self.block_size), listed)
            self._check_unchanged(mf, f.fileno(), st)
        return TransferResult(**{**result.__dict__, "seconds": time.monotonic() - started})

    # ---- small files: one request ---------------------------------------------------------

    def _upload_small(self, mf: MediaFile, f, st: os.stat_result, listed: Listed | None) -> TransferResult:
        data = _read_exact(f, st.st_size)
        h = _Hasher()
        h.update(data)
        self._check_name(mf, h)
        self._check_unchanged(mf, f.fileno(), st)
        sha, md5 = h.sha256.hexdigest(), h.md5.digest()
        if listed is not None and listed.content_md5 is not None and _same_content(listed, len(data), sha, md5):
            # The listing carries the service's own size and Content-MD5 plus our sha256: the
            # same check a fresh HEAD would make, so the bytes are not sent again.
            return TransferResult(len(data), st.st_mtime_ns, st.st_ino, sha, md5, listed.etag, True, 1, 0, 0.0)
        self._throttle(len(data))
        put = self.store.put(mf.blob_name, data, mf.content_type, md5, sha, overwrite=False)
        already = False
        if put is None:
            # Something is there: the same content (a re-run, another host) or stale bytes.
            existing = self.store.stat(mf.blob_name)
            if existing is not None and _same_content(existing, len(data), sha, md5):
                already = True
                put = existing
            else:
                put = self.store.put(mf.blob_name, data, mf.content_type, md5, sha, overwrite=True)
                assert put is not None
        if self.readback or put.content_md5 is None:
            info = self._verify(mf, len(data), sha, md5)
        else:
            # A single Put Blob is checked by the service against our transactional MD5 over the
            # whole body, and answers with the MD5 it stored: comparing that is the verification,
            # with no second request (unlike a block list, whose commit checks no whole-blob MD5).
            if put.content_md5 != md5 or put.size != len(data):
                raise VerificationFailed(f"blob {mf.blob_name}: the service stored other bytes than were sent")
            info = put
        return TransferResult(len(data), st.st_mtime_ns, st.st_ino, sha, md5, info.etag, already, 1, 0, 0.0)

    # ---- large files: staged blocks --------------------------------------------------------

    def _upload_blocks(
        self, mf: MediaFile, f, st: os.stat_result, block_size: int, listed: Listed | None
    ) -> TransferResult:
        existing = listed if listed is not None else self.store.stat(mf.blob_name)
        if existing is not None and existing.size == st.st_size and existing.sha256:
            expected = mf.expected_sha256
            if expected is None or existing.sha256 == expected:
                h = _Hasher()
                for data in _blocks(f, block_size):
                    h.update(data)
                _check_size(h, st)
                self._check_name(mf, h)
                sha, md5 = h.sha256.hexdigest(), h.md5.digest()
                # What is already there counts only when the service's own record proves it
                # (verify_committed); a blob that is not proven is uploaded again, verified.
                if _same_content(existing, h.size, sha, md5) and (
                    self.store.verify_committed(mf.blob_name, h.size, md5, sha, existing.etag) is None
                ):
                    self._check_unchanged(mf, f.fileno(), st)
                    etag = self._verify(mf, h.size, sha, md5).etag if self.readback else existing.etag
                    n = -(-h.size // block_size)
                    return TransferResult(
                        h.size,
                        st.st_mtime_ns,
                        st.st_ino,
                        h.sha256.hexdigest(),
                        h.md5.digest(),
                        etag,
                        True,
                        n,
                        0,
                        0.0,
                    )
                f.seek(0)

        staged = self.store.staged_blocks(mf.blob_name)
        h = _Hasher()
        ids: list[str] = []
        reused = 0
        # At most block_concurrency blocks are held in memory: the reader waits for a free
        # slot before reading the next block, whatever the file size.
        slots = threading.BoundedSemaphore(self.block_concurrency)
        futures: list[Future[None]] = []
        failure: list[BaseException] = []

        def send(bid: str, data: bytes, md5: bytes) -> None:
            try:
                self._throttle(len(data))
                self.store.stage_block(mf.blob_name, bid, data, md5)
            except BaseException as e:
                failure.append(e)
                raise
            finally:
                slots.release()

        with ThreadPoolExecutor(self.block_concurrency, thread_name_prefix="block") as pool:
            for index, data in enumerate(_blocks(f, block_size, before_read=slots.acquire)):
                if failure or self.stop.is_set():
                    slots.release()
                    break
                h.update(data)
                md5 = hashlib.md5(data).digest()  # noqa: S324 - transactional Content-MD5
                bid = block_id(index, md5)
                ids.append(bid)
                if staged.get(bid) == len(data):
                    reused += 1
                    slots.release()
                    continue
                futures.append(pool.submit(send, bid, data, md5))
            else:
                slots.release()  # the slot taken for the read that found end-of-file
        for fut in futures:
            fut.result()  # re-raises the first staging error
        if self.stop.is_set():
            raise Interrupted(f"stopped after staging {len(ids)} block(s) of {mf.blob_name}")
        _check_size(h, st)
        self._check_name(mf, h)
        self._check_unchanged(mf, f.fileno(), st)
        sha, md5 = h.sha256.hexdigest(), h.md5.digest()
        etag = self.store.commit_blocks(mf.blob_name, ids, mf.content_type, md5, sha)
        self._verify_committed(mf, h.size, sha, md5, etag, ids)
        return TransferResult(h.size, st.st_mtime_ns, st.st_ino, sha, md5, etag, False, len(ids), reused, 0.0)

    # ---- checks ---------------------------------------------------------------------------

    def _check_name(self, mf: MediaFile, h: _Hasher) -> None:
        expected = mf.expected_sha256
        if expected is not None and h.sha256.hexdigest() != expected:
            raise ContentMismatch(expected, h.sha256.hexdigest())

    @staticmethod
    def _check_unchanged(mf: MediaFile, fd: int, st: os.stat_result) -> None:
        now = os.fstat(fd)
        if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise FileRejected("file changed while it was being read (still being written?)")
        try:
            on_disk = os.stat(mf.path, follow_symlinks=False)
        except FileNotFoundError:
            raise FileRejected("file was removed or renamed while it was being read") from None
        if on_disk.st_ino != st.st_ino:
            raise FileRejected("file was replaced while it was being read")

    def _verify(self, mf: MediaFile, size: int, sha: str, md5: bytes) -> ObjectInfo:
        info = self.store.stat(mf.blob_name)
        if info is None:
            raise VerificationFailed(f"blob {mf.blob_name} is missing right after its upload")
        problems = []
        if info.size != size:
            problems.append(f"size {info.size} != {size}")
        if info.content_md5 != md5:
            problems.append("Content-MD5 differs")
        if info.sha256 != sha:
            problems.append(f"sha256 metadata {info.sha256} != {sha}")
        if not problems and self.readback:
            digest = hashlib.sha256()
            for chunk in self.store.read_range(mf.blob_name, 0, size, etag=info.etag):
                digest.update(chunk)
            if digest.hexdigest() != sha:
                problems.append(f"read-back sha256 {digest.hexdigest()} != {sha}")
        if problems:
            raise VerificationFailed(f"blob {mf.blob_name} does not match the local file: {'; '.join(problems)}")
        return info

    def _verify_committed(self, mf: MediaFile, size: int, sha: str, md5: bytes, etag: str, ids: list[str]) -> None:
        """A block upload is proven by the service's record, not by the MD5 and sha256 the agent
        set at commit: the committed block list must be exactly the ids sent, and each id names
        the MD5 the service checked that block against on arrival."""
        reason = self.store.verify_committed(mf.blob_name, size, md5, sha, etag, block_ids=ids)
        if reason is None and self.readback:
            digest = hashlib.sha256()
            for chunk in self.store.read_range(mf.blob_name, 0, size, etag=etag):
                digest.update(chunk)
            if digest.hexdigest() != sha:
                reason = f"read-back sha256 {digest.hexdigest()} != {sha}"
        if reason is not None:
            raise VerificationFailed(f"blob {mf.blob_name} does not match the local file: {reason}")

    def _throttle(self, nbytes: int) -> None:
        # Called before every request that sends bytes: a stopping run sends no more.
        if self.stop.is_set():
            raise Interrupted("stopping")
        if self.limiter is not None:
            self.limiter.consume(nbytes, self.stop)


MAX_BLOCKS = 50_000  # Azure's limit per block blob
_MIB = 1024 * 1024


def block_size_for(size: int, configured: int) -> int:
    """The configured block size, grown (in whole MiB) when a file would need over 50,000 blocks."""
    if -(-size // configured) <= MAX_BLOCKS:
        return configured
    needed = -(-size // MAX_BLOCKS)
    return -(-needed // _MIB) * _MIB


def _same_content(info: ObjectInfo | Listed, size: int, sha: str, md5: bytes) -> bool:
    return info.size == size and info.sha256 == sha and (info.content_md5 is None or info.content_md5 == md5)


def _check_size(h: _Hasher, st: os.stat_result) -> None:
    if h.size != st.st_size:
        raise FileRejected(f"read {h.size} bytes but the file has {st.st_size} (changed while being read?)")


def _read_exact(f, size: int) -> bytes:
    data = _read_up_to(f, size)
    if len(data) != size:
        raise FileRejected(f"read {len(data)} bytes but the file has {size} (changed while being read?)")
    return data


def _blocks(f, block_size: int, before_read=None):
    while True:
        if before_read is not None:
            before_read()
        data = _read_up_to(f, block_size)
        if not data:
            return
        yield data


def _read_up_to(f, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = f.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
