"""Azure Blob Storage behind the storage seam.

The agent drives block uploads itself (rather than `upload_blob` for large files) because it
needs what the SDK's helper does not give: deterministic block ids so a restarted upload reuses
staged blocks, a transactional MD5 it computed once per block, and a bounded amount of memory.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import logging
import platform
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlencode

import requests
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobBlock, BlobServiceClient, ContentSettings, ExponentialRetry, LinearRetry

from .. import __version__
from ..config import Config, _connection_string_parts
from ..media import MediaFile
from . import (
    Listed,
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    RangeReader,
    StoreUnavailable,
    UpstreamError,
    azure_put,
    azure_sdk_private,
    iter_range,
)
from .azure_auth import build_credential

if TYPE_CHECKING:  # the stream server's settings; importing them here would be a cycle
    from ..stream.settings import StreamSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

SHA256_METADATA_KEY = "sha256"

_HINTS = {
    "AuthorizationFailure": "the request reached the account's public endpoint or the network rules "
    "refused it; check that the account name resolves to the Private Endpoint's private IP "
    "(gighive-media doctor)",
    "AuthorizationPermissionMismatch": "the identity lacks the 'Storage Blob Data Contributor' role on the container",
    "AuthenticationFailed": "the token or key was refused (expired, wrong tenant, or wrong account key)",
    "ContainerNotFound": "create the container, or fix AZURE_STORAGE_CONTAINER_NAME",
    "KeyBasedAuthenticationNotPermitted": "the account does not allow Shared Key: use managed_identity or "
    "service_principal",
    "AccountRequiresHttps": "the account only accepts HTTPS: use an https:// endpoint",
    "InvalidHeaderValue": "the service refused one of the request's headers (see the header named); this is "
    "a request the agent built, not a credential problem: report it",
    "MissingRequiredHeader": "the request lacked a header the service requires; an agent bug: report it",
    "UnsupportedHeader": "the service does not support a header the agent sent; an agent bug: report it",
    "InvalidQueryParameterValue": "the service refused a query parameter the agent sent; an agent bug: report it",
    "Md5Mismatch": "the bytes arrived different from what was sent (corrupted on the way); the upload retries",
    "InvalidBlobOrBlock": "the blob has staged blocks with ids of another length (left by another uploader); "
    "delete the blob's uncommitted blocks (delete the blob) and retry",
    "InvalidBlockList": "the commit named a block the service does not hold; the upload restages and retries",
    "BlockCountExceedsLimit": "the blob has too many staged blocks (100,000 uncommitted or 50,000 committed); "
    "delete the blob to drop them",
    "LeaseIdMissing": "another tool holds a lease on the blob; break the lease or wait for it",
    "BlobImmutableDueToPolicy": "an immutability policy protects the blob; it cannot be overwritten",
    "ServerBusy": "the account is throttling requests; the upload retries later",
}

# AuthenticationFailed details that are not about the credential at all.
_AUTH_DETAIL_HINTS = (
    (
        "not supported in this version",
        "the request carried no x-ms-version, or one older than 2017-11-09, which bearer tokens "
        "need: an agent bug, not a credential problem; report it",
    ),
    ("Lifetime validation failed", "the token has expired or is not yet valid; check the host's clock"),
    ("Issuer validation failed", "the token comes from another tenant than the storage account's; fix AZURE_TENANT_ID"),
    ("Audience validation failed", "the token was issued for another resource than Azure Storage"),
    ("Signature did not match", "the account key does not match the account (wrong or rotated key)"),
    ("Request date header too old", "the host's clock is more than 15 minutes off; fix its time sync"),
)


def _details(text: str) -> dict[str, str]:
    """The SDK appends the service's error details as "name:value" lines (HeaderName, RequestId,
    AuthenticationErrorDetail, ...); keyed in lower case."""
    out: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep and name and " " not in name.strip():
            out.setdefault(name.strip().lower(), value.strip())
    return out


def _hint(code: str, detail_text: str, details: dict[str, str] | None = None) -> str | None:
    if code == "InvalidHeaderValue" and (details or {}).get("headername", "").lower() == "x-ms-version":
        return (
            "the service does not accept the REST version this agent's storage SDK speaks (a service "
            "older than the SDK, such as Azure Stack Hub or an old emulator); not a credential problem"
        )
    if code == "AuthenticationFailed":
        for needle, hint in _AUTH_DETAIL_HINTS:
            if needle.lower() in detail_text.lower():
                return hint
    return _HINTS.get(code)


def refusal_text(status: int | None, code: str, message: str, details: dict[str, str], request_id: str | None) -> str:
    """One line for a refused request: status, the service's code, what it said, the header or
    parameter it named, the request id (for Azure support), and a hint fitting the code."""
    parts = [f"HTTP {status} {code}: {message}".strip()]
    for key, label in (
        ("headername", "header"),
        ("queryparametername", "parameter"),
        ("authenticationerrordetail", "detail"),
    ):
        if details.get(key):
            value = details.get("headervalue" if key == "headername" else "queryparametervalue", "")
            shown = f"={value!r}" if value and key != "authenticationerrordetail" else ""
            parts.append(f"{label} {details[key]}{shown}")
    if request_id:
        parts.append(f"request id {request_id}")
    text = "; ".join(parts)
    hint = _hint(code, " ".join(details.values()) + " " + message, details)
    return f"{text} ({hint})" if hint else text


def _describe(e: Exception) -> str:
    """One line for the journal and `status`: what failed and, where known, what to do."""
    # ClientAuthenticationError is an HttpResponseError too, but it means no token was obtained.
    if isinstance(e, ClientAuthenticationError) and getattr(e, "status_code", None) is None:
        return f"cannot get a token: {str(e).splitlines()[0][:300]}"
    if isinstance(e, HttpResponseError):
        raw_code = getattr(e, "error_code", None) or ""
        code = str(getattr(raw_code, "value", raw_code))
        status = getattr(e, "status_code", None)
        full = str(e.message or e or "")
        first = full.splitlines()[0][:300] if full else ""
        details = _details(full)
        response = getattr(e, "response", None)
        headers = getattr(response, "headers", None) or {}
        request_id = headers.get("x-ms-request-id") or details.get("requestid")
        return refusal_text(status, code, first, details, request_id)
    if isinstance(e, (ServiceRequestError, ServiceResponseError)):
        return f"Azure Blob unreachable: {_network_reason(str(e))}"
    return f"{type(e).__name__}: {str(e)[:300]}"


def _is_outage(e: Exception) -> bool:
    """Whether a failure says "the service is unusable now" rather than "this request was wrong"."""
    status = getattr(e, "status_code", None)
    if status is None or status >= 500 or status in (401, 403, 408, 429):
        return True
    code = getattr(e, "error_code", None)
    return str(getattr(code, "value", code)) == "ContainerNotFound"


def _network_reason(text: str) -> str:
    """The useful part of urllib3's nested connection errors: host and errno text."""
    host = re.search(r"host='([^']+)', port=(\d+)", text)
    reason = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    for pattern, label in _NETWORK_PATTERNS:
        if pattern in text:
            reason_text = label
            break
    else:
        reason_text = reason.group(1).strip() if reason else text.splitlines()[0][:200]
    return f"{host.group(1)}:{host.group(2)}: {reason_text}" if host else reason_text


_NETWORK_PATTERNS = (
    ("NameResolutionError", "the name does not resolve (check DNS / the private DNS zone)"),
    ("CERTIFICATE_VERIFY_FAILED", "TLS certificate verification failed"),
    ("Read timed out", "read timed out"),
    ("ConnectTimeoutError", "connection timed out (firewall, VPN down, or wrong address)"),
)


class AzureBlobStore:
    def __init__(self, config: Config, pool_size: int | None = None, interactive: bool = False):
        self.config = config
        self.container_name = config.container or ""
        # requests keeps 10 connections per host by default; with several files and several
        # blocks in flight the rest would be opened and thrown away on every request.
        pool = pool_size or max(10, config.file_concurrency * config.block_concurrency + 4)
        session = requests.Session()
        # With trust_env, requests re-reads ~/.netrc and the proxy variables on every request,
        # about a tenth of the agent's CPU on small files. Proxies are resolved once instead.
        session.trust_env = False
        if config.endpoint:
            session.proxies.update(requests.utils.get_environ_proxies(config.endpoint))
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        transport_kwargs: dict[str, Any] = {
            "connection_timeout": config.network_timeout,
            "read_timeout": config.network_timeout,
        }
        if config.ca_bundle:
            transport_kwargs["connection_verify"] = str(config.ca_bundle)
        transport = RequestsTransport(session=session, session_owner=False, **transport_kwargs)
        # Short in-request retries: the upload queue owns the long backoff across runs, and a
        # stream request must not hang for the SDK's default 15 s + 18 s + 24 s: about 3 s here.
        self._retry_total = 2
        retry: ExponentialRetry | LinearRetry = ExponentialRetry(
            initial_backoff=0.5, increment_base=2, retry_total=self._retry_total, random_jitter_range=0.5
        )
        if interactive:
            # The stream server: a viewer is waiting, and a thread is held; the SDK's exponential
            # formula waits 2.5 s before even the first retry. One quick retry, then 502.
            retry = LinearRetry(backoff=0.3, random_jitter_range=0.2, retry_total=1)
        common: dict[str, Any] = {
            "transport": transport,
            "retry_policy": retry,
            "max_single_get_size": 4 * 1024 * 1024,
            # Files up to one block go up in one Put Blob; keep the SDK from splitting them itself.
            "max_single_put_size": max(config.block_size, 64 * 1024 * 1024),
            "max_chunk_get_size": 4 * 1024 * 1024,
            **transport_kwargs,
        }
        if config.auth_mode == "connection_string":
            assert config.connection_string is not None
            self.service = BlobServiceClient.from_connection_string(config.connection_string.reveal(), **common)
        else:
            self.credential = build_credential(config)
            self.service = BlobServiceClient(config.endpoint, credential=self.credential, **common)
        self.container = self.service.get_container_client(self.container_name)
        # Small files' Put Blob on urllib3 (see _fast_put); the stream server never uploads.
        self._put_blob = None if interactive else _fast_put(config, self, pool, session.proxies)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ResourceNotFoundError:
            raise
        except (HttpResponseError, ClientAuthenticationError, ServiceRequestError, ServiceResponseError) as e:
            raise StoreUnavailable(_describe(e), outage=_is_outage(e)) from e
        except requests.RequestException as e:
            raise StoreUnavailable(f"Azure Blob unreachable: {_network_reason(str(e))}") from e

    def blob(self, name: str):
        return self.container.get_blob_client(name)

    # ---- reading -------------------------------------------------------------------------

    def stat(self, name: str) -> ObjectInfo | None:
        try:
            props = self._call(lambda: self.blob(name).get_blob_properties())
        except ResourceNotFoundError as e:
            if getattr(e, "error_code", None) == "ContainerNotFound":
                raise StoreUnavailable(_describe(e)) from e
            return None
        return _object_info(name, props)

    def read_range(
        self, name: str, offset: int, length: int, etag: str | None = None, chunk_size: int = 4 * 1024 * 1024
    ) -> Iterator[bytes]:
        """Stream `length` bytes from `offset`, pinned to `etag` so versions never mix."""
        kwargs: dict[str, Any] = {"offset": offset, "length": length, "max_concurrency": 1}
        if etag:
            kwargs["etag"] = etag
            from azure.core import MatchConditions

            kwargs["match_condition"] = MatchConditions.IfNotModified
        try:
            downloader = self._call(lambda: self.blob(name).download_blob(**kwargs))
        except ResourceNotFoundError as e:
            raise ObjectNotFound(name) from e
        except StoreUnavailable as e:
            if isinstance(e.__cause__, ResourceModifiedError):
                raise ObjectChanged(name) from e
            raise
        try:
            yield from downloader.chunks()
        except ResourceModifiedError as e:
            raise ObjectChanged(name) from e
        except (HttpResponseError, ServiceRequestError, ServiceResponseError) as e:
            raise StoreUnavailable(_describe(e)) from e

    def list(self, prefix: str | None = None) -> Iterator[ObjectInfo]:
        try:
            for props in self.container.list_blobs(name_starts_with=prefix, include=["metadata"]):
                yield _object_info(props.name, props)
        except (HttpResponseError, ServiceRequestError, ServiceResponseError) as e:
            raise StoreUnavailable(_describe(e)) from e

    def list_entries(self, prefix: str = "", page_size: int = 5000) -> Iterator[tuple[str, Listed]]:
        """(name, Listed) for every blob under prefix, in name order.

        The SDK's list_blobs spends about 0.4 ms of CPU per blob turning the XML into model
        objects (40 s for a 100,000-file library); this sends the same List Blobs request through
        the client's own pipeline (auth, retries, timeouts; see azure_sdk_private.send) and reads
        only the fields the agent needs straight from the XML, as it arrives.
        """
        marker = ""
        last: str | None = None
        while True:
            query = {"restype": "container", "comp": "list", "include": "metadata", "maxresults": str(page_size)}
            if prefix:
                query["prefix"] = prefix
            if marker:
                query["marker"] = marker
            url = f"{self.container.url}?{urlencode(query)}"
            for attempt in range(1, _PAGE_READS + 1):
                page = _Page()
                try:
                    for name, entry in self._read_page(url, page):
                        # A page read again after its answer broke off resumes past what was
                        # already given (a listing is in name order).
                        if last is None or name > last:
                            last = name
                            yield name, entry
                    break
                except StoreUnavailable as e:
                    if not page.body_broke or attempt == _PAGE_READS:
                        raise
                    log.warning("a List Blobs answer broke off (%s); reading that page again", e)
            if not page.marker:
                return
            marker = page.marker

    def _read_page(self, url: str, page: _Page) -> Iterator[tuple[str, Listed]]:
        """One List Blobs page, parsed as its body streams in; its NextMarker lands in `page`.

        Not read whole first: azure-core would also parse a whole (non-streamed) XML answer into
        a tree of its own, ~45 MiB for a 5,000-entry page (4 MiB of XML), where this holds one
        <Blob> at a time.
        """
        response = self._call(lambda: azure_sdk_private.send(self.container, "GET", url, stream=True))
        try:
            if response.status_code != 200:
                body = self._call(response.read)
                raise _listing_error(response.status_code, body, response.headers)
            # The SDK parses its answers with this same expat parser; expat >= 2.4 caps entity
            # expansion, and the body comes from the storage endpoint over TLS.
            parser = ET.XMLPullParser(events=("end",))
            chunks = response.iter_bytes()
            while True:
                page.body_broke = True
                chunk = self._call(lambda: next(chunks, None))
                page.body_broke = False
                if chunk is None:
                    parser.close()
                else:
                    parser.feed(chunk)
                for _event, elem in parser.read_events():
                    if elem.tag == "Blob":
                        entry = _listed(elem)
                        elem.clear()
                        if entry is not None:
                            yield entry
                    elif elem.tag == "NextMarker":
                        page.marker = elem.text or ""
                if chunk is None:
                    return
        except ET.ParseError as e:
            raise StoreUnavailable(f"List Blobs answered malformed XML: {e}", outage=False) from e
        finally:
            response.close()

    # ---- writing -------------------------------------------------------------------------

    def staged_blocks(self, name: str) -> dict[str, int]:
        """Uncommitted blocks of a blob, id -> size; empty when none (or no blob yet)."""
        try:
            _committed, uncommitted = self._call(lambda: self.blob(name).get_block_list("uncommitted"))
        except ResourceNotFoundError:
            return {}
        return {b.id: b.size for b in uncommitted}

    def stage_block(self, name: str, block_id: str, data: bytes, md5: bytes) -> None:
        # Our MD5 goes out as the block's transactional Content-MD5: the service checks the
        # block's bytes against it on arrival (Md5Mismatch otherwise), without the SDK hashing
        # the block a second time. The block id carries the same MD5, so the committed block
        # list is the service's record of what each block held (see verify_committed).
        headers = self._call(lambda: azure_sdk_private.stage_block(self.blob(name), block_id, data, md5))
        echoed = (headers or {}).get("content_md5")
        if echoed is not None and bytes(echoed) != md5:
            raise StoreUnavailable(f"Put Block of {name}: the service computed another MD5 than was sent", outage=False)

    def committed_blocks(self, name: str) -> list[tuple[str, int]] | None:
        """The blob's committed block list as (id, size); None when the blob does not exist."""
        try:
            committed, _uncommitted = self._call(lambda: self.blob(name).get_block_list("committed"))
        except ResourceNotFoundError as e:
            if getattr(e, "error_code", None) == "ContainerNotFound":
                raise StoreUnavailable(_describe(e)) from e
            return None
        return [(b.id, b.size) for b in committed]

    def verify_committed(
        self,
        name: str,
        size: int,
        md5: bytes,
        sha256: str,
        etag: str | None,
        *,
        block_ids: list[str] | None = None,
    ) -> str | None:
        """None when the service's own record proves the blob holds these bytes; else why not.

        A block blob the agent committed: every block id is `index-md5hex` and the service
        checked each block's bytes against that MD5 when it arrived, so a committed list of
        consecutive indices whose sizes sum to `size` is the service's record of the content
        (and equal to `block_ids`, the ids of the local file's blocks, when the caller has them).
        A single Put Blob has no committed list: the service checked the whole body against
        the transactional MD5 and stored it as Content-MD5, so that property is the proof.
        `etag` (if given) pins the version that was uploaded. Raises StoreUnavailable when the
        service cannot be asked.
        """
        info = self.stat(name)
        if info is None:
            return "the blob does not exist"
        if etag and info.etag != etag:
            return f"the blob changed since it was uploaded (ETag {info.etag}, uploaded {etag})"
        if info.size != size:
            return f"the blob holds {info.size} bytes, the file {size}"
        if info.sha256 is not None and info.sha256 != sha256:
            return f"the blob's sha256 metadata {info.sha256} differs from the file's {sha256}"
        blocks = self.committed_blocks(name)
        after = self.stat(name)
        if blocks is None or after is None or after.etag != info.etag:
            return "the blob changed while it was being verified"
        if not blocks:
            if info.content_md5 is None:
                return "the blob has neither a committed block list nor a Content-MD5 to prove its content"
            if info.content_md5 != md5:
                return "the blob's Content-MD5 differs from the file's MD5"
            return None
        reason = check_block_list(blocks, size, block_ids)
        if reason:
            return reason
        if info.content_md5 is not None and info.content_md5 != md5:
            return "the blob's Content-MD5 differs from the file's MD5"
        return None

    def commit_blocks(self, name: str, block_ids: list[str], content_type: str, md5: bytes, sha256: str) -> str:
        result = self._call(
            lambda: self.blob(name).commit_block_list(
                [BlobBlock(block_id=i) for i in block_ids],
                content_settings=ContentSettings(content_type=content_type, content_md5=bytearray(md5)),
                metadata={SHA256_METADATA_KEY: sha256},
            )
        )
        return result["etag"]

    def put(
        self, name: str, data: bytes, content_type: str, md5: bytes, sha256: str, overwrite: bool
    ) -> ObjectInfo | None:
        """Single-request upload of a small file. None when it exists and overwrite is False.

        The request carries our MD5 as its transactional Content-MD5, which the service checks
        against the whole body before storing it; the returned ObjectInfo holds the MD5 the
        service computed, the ETag and the size, so the caller can verify without another request.
        """
        options: dict[str, Any] = {}
        if self._put_blob is not None:
            try:
                answer = self._put_blob.put(name, data, content_type, md5, sha256, overwrite)
            except ClientAuthenticationError as e:  # no token: what the SDK's policy would raise
                raise StoreUnavailable(_describe(e), outage=True) from e
            except azure_put.Refused as e:
                raise _listing_error(e.status, e.body, e.headers, "Put Blob refused") from e
            except azure_put.Fallback as e:
                # The SDK sends it again and reports any failure exactly as it always has; the
                # fast path's try counts as the first of the SDK's tries.
                log.debug("Put Blob of %s through the SDK: %s", name, e)
                options["retry_total"] = max(0, self._retry_total - 1)
            else:
                return None if answer.exists else answer.info
        try:
            result = self._call(
                lambda: self.blob(name).upload_blob(
                    data,
                    length=len(data),
                    overwrite=overwrite,
                    content_settings=ContentSettings(content_type=content_type, content_md5=bytearray(md5)),
                    metadata={SHA256_METADATA_KEY: sha256},
                    transactional_content_md5=bytearray(md5),
                    **options,
                )
            )
        except StoreUnavailable as e:
            if isinstance(e.__cause__, ResourceExistsError) and not overwrite:
                return None
            raise
        served_md5 = result.get("content_md5")
        return ObjectInfo(
            name=name,
            size=len(data),
            etag=result["etag"],
            last_modified=result.get("last_modified"),
            content_md5=bytes(served_md5) if served_md5 else None,
            sha256=sha256,
            content_type=content_type,
        )

    def delete(self, name: str, etag: str | None = None) -> None:
        kwargs: dict[str, Any] = {}
        if etag:
            from azure.core import MatchConditions

            kwargs = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
        try:
            self._call(lambda: self.blob(name).delete_blob(**kwargs))
        except ResourceNotFoundError:
            return


def _fast_put(config: Config, store: AzureBlobStore, pool_size: int, proxies: dict[str, str]) -> Any:
    """The urllib3 Put Blob for small files (agent/storage/azure_put.py), or None where it does
    not apply: a proxy in the way, or a credential it cannot sign with (a SAS connection string)."""
    if proxies:
        return None
    if config.auth_mode == "connection_string":
        assert config.connection_string is not None
        parts = _connection_string_parts(config.connection_string.reveal())
        key = parts.get("accountkey")
        if not key:
            return None
        try:
            auth: azure_put.SharedKey | azure_put.BearerToken = azure_put.SharedKey(store.service.account_name, key)
        except ValueError:  # not base64: the SDK reports the key when it signs
            return None
    else:
        auth = azure_put.BearerToken(store.credential)
    try:
        return azure_put.PutBlob(
            store.container.url,
            store.service.api_version,
            auth,
            timeout=config.network_timeout,
            pool_size=pool_size,
            ca_bundle=str(config.ca_bundle) if config.ca_bundle else None,
            user_agent=f"gighive-media-agent/{__version__} Python/{platform.python_version()}",
        )
    except ValueError as e:
        log.debug("small files go through the SDK: %s", e)
        return None


# Reads of one listing page whose answer broke off mid-body (the pipeline retries a request that
# fails before its answer; a streamed body is read after the pipeline has returned).
_PAGE_READS = 3


class _Page:
    """What reading one listing page leaves behind: its NextMarker, and whether it failed while
    its body was being read (worth reading again) rather than being refused or unparseable."""

    __slots__ = ("body_broke", "marker")

    def __init__(self) -> None:
        self.marker = ""
        self.body_broke = False


def _listed(blob: ET.Element) -> tuple[str, Listed] | None:
    """One <Blob> of a List Blobs answer; None for anything but a live, current block of bytes.

    Real Azure sends more than Azurite: snapshots, soft-deleted blobs and older versions only
    when asked (include=snapshots/deleted/versions, which the agent never asks), but a listing
    of a versioned account still carries VersionId/IsCurrentVersion, and names that XML cannot
    hold arrive percent-encoded as <Name Encoded="true">. Skipping what is not the current blob
    keeps an old version from standing in for it.
    """
    props = blob.find("Properties")
    if props is None:
        return None
    if blob.findtext("Snapshot") or (blob.findtext("Deleted") or "").lower() == "true":
        return None
    if (blob.findtext("IsCurrentVersion") or "true").lower() != "true":
        return None
    name_elem = blob.find("Name")
    name = (name_elem.text or "") if name_elem is not None else ""
    if name_elem is not None and name_elem.get("Encoded", "").lower() == "true":
        name = unquote(name)
    md5 = props.findtext("Content-MD5")
    etag = props.findtext("Etag") or ""
    sha256 = None
    metadata = blob.find("Metadata")
    if metadata is not None:
        # Metadata names are case-insensitive (Azure keeps the case they were written with).
        for item in metadata:
            if item.tag.lower() == SHA256_METADATA_KEY:
                sha256 = item.text
                break
    return (
        name,
        Listed(
            size=int(props.findtext("Content-Length") or 0),
            # HEAD answers the ETag quoted, a listing does not: keep one form.
            etag=etag if etag.startswith('"') else f'"{etag}"',
            content_md5=base64.b64decode(md5) if md5 else None,
            sha256=sha256,
            last_modified=_http_date(props.findtext("Last-Modified")),
        ),
    )


def _http_date(text: str | None) -> float | None:
    """An RFC 1123 date of a listing (Last-Modified) as seconds since the epoch; None if absent."""
    if not text:
        return None
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


def _listing_error(status: int, body: bytes, headers: Any = None, what: str = "List Blobs failed") -> StoreUnavailable:
    """A refusal answered to a hand-built request (a listing, a fast Put Blob) as the SDK's
    errors are reported: the same one line (refusal_text) and the same outage rule."""
    details: dict[str, str] = {}
    try:
        root = ET.fromstring(body)  # noqa: S314 - see list_entries
        code, message = root.findtext("Code") or "", (root.findtext("Message") or "").splitlines()[0:1]
        details = {c.tag.lower(): (c.text or "").strip() for c in root if c.tag not in ("Code", "Message")}
    except ET.ParseError:
        code, message = "", []
    # A HEAD-like answer without a body still names its error in this header (the SDK reads it too).
    code = code or (headers or {}).get("x-ms-error-code") or ""
    request_id = (headers or {}).get("x-ms-request-id")
    text = refusal_text(status, code, message[0] if message else what, details, request_id)
    outage = status >= 500 or status in (401, 403, 408, 429) or code == "ContainerNotFound"
    return StoreUnavailable(text, outage=outage)


def _object_info(name: str, props: Any) -> ObjectInfo:
    """BlobProperties (from a HEAD or a listing) as the storage seam's ObjectInfo."""
    md5 = props.content_settings.content_md5
    metadata = dict(props.metadata or {})
    return ObjectInfo(
        name=name,
        size=props.size,
        etag=props.etag,
        last_modified=props.last_modified,
        content_md5=bytes(md5) if md5 else None,
        sha256=metadata.get(SHA256_METADATA_KEY),
        content_type=props.content_settings.content_type,
        metadata=metadata,
    )


_BLOCK_ID = re.compile(r"^(\d{6})-([0-9a-f]{32})$")


def check_block_list(blocks: list[tuple[str, int]], size: int, block_ids: list[str] | None = None) -> str | None:
    """Why a committed block list is not one the agent's upload of `size` bytes made, or None."""
    if block_ids is not None and [b for b, _ in blocks] != block_ids:
        return f"the committed block list ({len(blocks)} blocks) is not the {len(block_ids)} blocks of the file"
    for position, (bid, _size) in enumerate(blocks):
        m = _BLOCK_ID.match(bid)
        if m is None or int(m.group(1)) != position:
            return f"committed block {position} has id {bid!r}, not one of the agent's (index-md5)"
    total = sum(s for _, s in blocks)
    if total != size:
        return f"the committed blocks hold {total} bytes, the file {size}"
    return None


def block_id(index: int, md5: bytes) -> str:
    """Deterministic, equal-length block id from the block's position and content.

    A block staged earlier with this id held exactly these bytes (the service checked its
    transactional MD5), so a restarted upload can skip sending it again.
    """
    return f"{index:06d}-{base64.b16encode(md5).decode().lower()}"


# ---- streaming reads (the stream server) ---------------------------------------------------


def _is_timeout(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, TimeoutError | socket.timeout | requests.Timeout):
            return True
        if "timed out" in str(cur).lower() or "timeout" in type(cur).__name__.lower():
            return True
        cur = getattr(cur, "inner_exception", None) or cur.__cause__ or cur.__context__
    return False


def _upstream_error(e: BaseException) -> UpstreamError:
    if isinstance(e, HttpResponseError | ClientAuthenticationError | ServiceRequestError | ServiceResponseError):
        text = _describe(e)  # type: ignore[arg-type]
    elif isinstance(e, requests.RequestException):
        text = f"Azure Blob unreachable: {_network_reason(str(e))}"
    else:
        text = f"Azure Blob read failed: {type(e).__name__}: {str(e)[:300]}"
    return UpstreamError(text, timeout=_is_timeout(e))


# Exceptions a read from an open Azure response can raise when the connection breaks.
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, requests.RequestException)
try:  # urllib3's own hierarchy does not derive from OSError
    import urllib3.exceptions

    _READ_ERRORS += (urllib3.exceptions.HTTPError,)
except ImportError:  # pragma: no cover
    pass
try:
    import http.client

    _READ_ERRORS += (http.client.HTTPException,)
except ImportError:  # pragma: no cover
    pass


class _StatCache:
    """Blob properties by name, for a short time, bounded in size (LRU)."""

    def __init__(self, ttl: float, entries: int):
        self.ttl, self.entries = ttl, entries
        self._items: OrderedDict[str, tuple[float, ObjectInfo]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> ObjectInfo | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            item = self._items.get(name)
            if item is None:
                return None
            if item[0] < time.monotonic():
                del self._items[name]
                return None
            self._items.move_to_end(name)
            return item[1]

    def put(self, info: ObjectInfo) -> None:
        if self.ttl <= 0 or self.entries <= 0:
            return
        with self._lock:
            self._items[info.name] = (time.monotonic() + self.ttl, info)
            self._items.move_to_end(info.name)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def forget(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)


class _BlobRange:
    """One range of one blob version, streamed from a single Azure GET.

    Reading a response as it arrives (instead of the SDK's downloader, which holds whole 4 MiB
    chunks in memory and opens a request per chunk) keeps memory per stream at one buffer and
    the throughput of one long GET. A broken connection is resumed where it stopped, pinned to
    the same ETag; a closed reader closes its connection, so Azure stops sending at once.
    """

    def __init__(self, source: BlobSource, name: str, offset: int, length: int, etag: str):
        self.source, self.name, self.etag = source, name, etag
        self.pos, self.end = offset, offset + length
        self.resumes_left = source.settings.upstream_retries
        self._response: Any = None
        self._body: Any = None
        self._open()

    def _open(self) -> None:
        self._response = self.source._download(self.name, self.pos, self.end - self.pos, self.etag)
        # http.client's response under urllib3's: its readinto() fills our buffer straight from
        # the socket. urllib3's own read() would allocate and copy every chunk twice, which at
        # 200 streams is most of the process's memory and a good part of its CPU.
        self._body = azure_sdk_private.body_reader(self._response)

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), self.end - self.pos)
        if n <= 0:
            return 0
        while True:
            try:
                if self._response is None:
                    self._open()
                if self._body is not None:
                    got = self._body.readinto(view[:n])
                else:  # pragma: no cover - only if urllib3 changes its internals
                    data = self._response.raw.read(n, decode_content=False)
                    got = len(data)
                    view[:got] = data
                if not got:
                    raise UpstreamError(f"Azure ended the response {self.end - self.pos} bytes early")
                self.pos += got
                if self.pos >= self.end:
                    self._finish()
                return got
            except (ObjectChanged, ObjectNotFound):
                raise
            except (UpstreamError, *_READ_ERRORS) as e:
                self._drop()
                if self.resumes_left <= 0:
                    if isinstance(e, UpstreamError):
                        raise
                    raise _upstream_error(e) from e
                self.resumes_left -= 1
                log.warning(
                    "Azure read broke off, resuming at byte %d: %s",
                    self.pos,
                    e,
                    extra={"fields": {"blob_name": self.name}},
                )

    def _finish(self) -> None:
        """The whole body was read: give the connection back to the pool for the next request."""
        response, self._response, self._body = self._response, None, None
        if response is not None:
            if azure_sdk_private.body_finished(response):
                response.raw.release_conn()
            else:
                response.close()

    def _drop(self) -> None:
        response, self._response, self._body = self._response, None, None
        if response is not None:
            # close() (not release) discards the connection: unread data must not be reused.
            # Closing a broken connection may fail; it is gone either way.
            with contextlib.suppress(Exception):
                response.close()

    def close(self) -> None:
        self._drop()


class BlobObject:
    origin = "blob"
    sendfile_fd: int | None = None
    local_path: str | None = None

    def __init__(self, source: BlobSource, info: ObjectInfo):
        self.source, self.info = source, info

    def reader(self, offset: int, length: int) -> RangeReader:
        return _BlobRange(self.source, self.info.name, offset, length, self.info.etag)

    def close(self) -> None:
        pass


class BlobSource:
    """The private container, read through the agent's AzureBlobStore (auth, endpoint, CA, pool)."""

    def __init__(self, config: Config, settings: StreamSettings, store: AzureBlobStore | None = None):
        self.config = config
        self.settings = settings
        # One pooled connection per concurrent stream, or connections would be opened and
        # thrown away on every request once more streams run than the pool holds.
        self.store = store or AzureBlobStore(config, pool_size=settings.max_connections + 8, interactive=True)
        self.cache = _StatCache(settings.stat_cache_seconds, settings.stat_cache_entries)
        # Per request: a stream must fail fast (and say so) rather than sit in the SDK's backoff.
        self._request_options = {
            "retry_total": settings.upstream_retries,
            "connection_timeout": settings.upstream_timeout,
            "read_timeout": settings.upstream_timeout,
        }

    def forget(self, name: str) -> None:
        self.cache.forget(name)

    def stat(self, name: str) -> ObjectInfo | None:
        cached = self.cache.get(name)
        if cached is not None:
            return cached
        try:
            props = self.store.blob(name).get_blob_properties(**self._request_options)
        except ResourceNotFoundError as e:
            if getattr(e, "error_code", None) == "ContainerNotFound":
                raise _upstream_error(e) from e
            return None
        except (HttpResponseError, ClientAuthenticationError, ServiceRequestError, ServiceResponseError) as e:
            raise _upstream_error(e) from e
        except requests.RequestException as e:
            raise _upstream_error(e) from e
        info = ObjectInfo(
            name=name,
            size=props.size,
            etag=props.etag,
            last_modified=props.last_modified,
            sha256=(props.metadata or {}).get(SHA256_METADATA_KEY),
            content_type=props.content_settings.content_type,
            metadata=dict(props.metadata or {}),
        )
        self.cache.put(info)
        return info

    def open(self, media: MediaFile) -> BlobObject | None:
        info = self.stat(media.blob_name)
        return BlobObject(self, info) if info is not None else None

    def _download(self, name: str, offset: int, length: int, etag: str) -> Any:
        """A streaming ranged GET pinned with If-Match; returns the requests.Response.

        The SDK's public downloader buffers whole chunks, so this calls the operation the
        downloader itself calls (same pipeline: auth, retries, timeouts) and keeps the response
        unread; see agent/storage/azure_sdk_private.py and its contract test.
        """
        try:
            response = azure_sdk_private.download(self.store.blob(name), offset, length, etag, **self._request_options)
        except ResourceNotFoundError as e:
            self.forget(name)
            raise ObjectNotFound(name) from e
        except HttpResponseError as e:
            if e.status_code == 412:
                self.forget(name)
                raise ObjectChanged(name) from e
            raise _upstream_error(e) from e
        except (ClientAuthenticationError, ServiceRequestError, ServiceResponseError, requests.RequestException) as e:
            raise _upstream_error(e) from e
        return response

    # -- the storage seam ----------------------------------------------------------------------
    def read_range(
        self, name: str, offset: int, length: int, etag: str | None = None, chunk_size: int = 1024 * 1024
    ) -> Iterator[bytes]:
        if etag is None:
            info = self.stat(name)
            if info is None:
                raise ObjectNotFound(name)
            etag = info.etag
        if length <= 0:
            return
        yield from iter_range(_BlobRange(self, name, offset, length, etag), chunk_size)
