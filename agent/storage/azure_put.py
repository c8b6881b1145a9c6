"""Put Blob for files of one block, sent straight on urllib3.

Through azure-storage-blob, azure-core and requests a 64 KiB Put Blob costs about 2.3 ms of CPU
(docs/benchmarks.md, "Upload"): requests' session machinery, the pipeline policies, the SDK's
upload helper and serializer, and a new BlobClient per file. A library of small files is mostly
that overhead, which put the agent at twice rclone's CPU. This sends the same REST request (the
headers the SDK sends, checked by tests/unit/test_azure_put.py against the SDK's own request) on
one urllib3 connection pool, signed with the same Shared Key or bearer token.

It is the fast path only: an answer that is not a plain success, and that the SDK would retry or
map in its own way (a 5xx, a broken connection, a timeout, a token challenge, a 404 or 409), makes
the caller send the file again through the SDK, whose retry policy, error mapping and messages
then apply unchanged. A refusal the SDK would not retry either (400 Md5Mismatch, 403) is reported
from this answer in the same words (`Refused`), without a second request.

Public REST only: the Put Blob and Shared Key signing rules are Azure's documented ones, and the
token comes from the credential's public get_token. No SDK internals are used.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
import uuid
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import urllib3

from . import ObjectInfo
from .azure_auth import STORAGE_SCOPE

# azure-core's bearer policy asks for a new token this long before the current one expires.
TOKEN_REFRESH_MARGIN = 300.0


class Fallback(Exception):
    """The fast path did not succeed: send the file through the SDK instead (why, for debugging)."""


class Refused(Exception):
    """The service refused the request in a way the SDK would not retry either (400 Md5Mismatch,
    403 AuthenticationFailed, ...): sending it again through the SDK would only repeat it."""

    def __init__(self, status: int, body: bytes, headers: Any):
        super().__init__(f"HTTP {status}")
        self.status, self.body, self.headers = status, body, headers


# Answers the SDK's own request would meet differently from a plain refusal: 401 (a bearer
# challenge it answers), 404 (ResourceNotFoundError, which callers tell apart), 408 (retried),
# 409/412 (existence and conditions, mapped by error code). Everything else from 400 to 499 the
# SDK's retry policy gives up on at once (tests/unit/test_azure_put.py checks the list).
SDK_HANDLES = frozenset((401, 404, 408, 409, 412))


@dataclass(frozen=True)
class PutAnswer:
    """What a successful Put Blob answered (201), or that the blob exists (409, no overwrite)."""

    exists: bool
    info: ObjectInfo | None = None


class SharedKey:
    """Shared Key authorization for one account (Azure's "Authorize with Shared Key" rules)."""

    def __init__(self, account: str, key_b64: str):
        self.account = account
        self._key = base64.b64decode(key_b64)

    def sign(self, method: str, path: str, headers: dict[str, str]) -> str:
        """The Authorization value for a request with no query string.

        Standard headers in the fixed order (Content-Length empty when 0, Date empty because
        x-ms-date is sent), then every x-ms- header lower-cased and sorted, then the resource.
        """
        lower = {k.lower(): v for k, v in headers.items() if v}
        length = lower.get("content-length", "")
        standard = [
            lower.get("content-encoding", ""),
            lower.get("content-language", ""),
            "" if length == "0" else length,
            lower.get("content-md5", ""),
            lower.get("content-type", ""),
            lower.get("date", ""),
            lower.get("if-modified-since", ""),
            lower.get("if-match", ""),
            lower.get("if-none-match", ""),
            lower.get("if-unmodified-since", ""),
            lower.get("range", ""),
        ]
        ms = "".join(f"{k}:{lower[k]}\n" for k in sorted(k for k in lower if k.startswith("x-ms-")))
        text = f"{method}\n" + "\n".join(standard) + "\n" + ms + f"/{self.account}{path}"
        digest = hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).digest()
        return f"SharedKey {self.account}:{base64.b64encode(digest).decode()}"


class BearerToken:
    """A token from the agent's credential, renewed before it expires (as azure-core does)."""

    def __init__(self, credential: Any):
        self.credential = credential
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_on = 0.0

    def header(self) -> str:
        if self._token is None or self._expires_on - TOKEN_REFRESH_MARGIN < time.time():
            with self._lock:
                if self._token is None or self._expires_on - TOKEN_REFRESH_MARGIN < time.time():
                    # Raises ClientAuthenticationError (TokenUnavailable) when there is none.
                    access = self.credential.get_token(STORAGE_SCOPE)
                    self._token, self._expires_on = access.token, float(access.expires_on)
        return f"Bearer {self._token}"


class PutBlob:
    """Single-request uploads to one container over one urllib3 connection pool."""

    def __init__(
        self,
        container_url: str,
        api_version: str,
        auth: SharedKey | BearerToken,
        *,
        timeout: float,
        pool_size: int,
        ca_bundle: str | None,
        user_agent: str,
    ):
        parts = urlsplit(container_url)
        if parts.query:
            raise ValueError("a container URL with a query string (SAS) is not supported here")
        self.base_path = parts.path.rstrip("/")
        self.api_version = api_version
        self.auth = auth
        self.user_agent = user_agent
        if isinstance(auth, BearerToken) and parts.scheme != "https":
            raise ValueError("a bearer token is only sent over HTTPS")
        kwargs: dict[str, Any] = {
            "maxsize": pool_size,
            "block": False,
            "timeout": urllib3.Timeout(connect=timeout, read=timeout),
            "retries": False,
        }
        if parts.scheme == "https":
            # The CA set requests verifies against (certifi), unless a bundle is configured.
            import certifi

            kwargs["ca_certs"] = ca_bundle or certifi.where()
            kwargs["cert_reqs"] = "CERT_REQUIRED"
        self.pool = urllib3.connection_from_url(f"{parts.scheme}://{parts.netloc}", **kwargs)

    def close(self) -> None:
        self.pool.close()

    def headers(
        self, path: str, length: int, content_type: str, md5: bytes, sha256: str, overwrite: bool
    ) -> dict[str, str]:
        """The Put Blob request's headers, Authorization included; what the SDK's upload_blob sends."""
        md5_b64 = base64.b64encode(md5).decode()
        headers = {
            "User-Agent": self.user_agent,
            "Accept": "application/xml",
            "Content-Length": str(length),
            "Content-Type": "application/octet-stream",
            # Transactional: the service checks the body against it and refuses it (Md5Mismatch).
            "Content-MD5": md5_b64,
            "x-ms-blob-type": "BlockBlob",
            "x-ms-blob-content-type": content_type,
            # Stored: the blob's Content-MD5 property, for other tools and for verification.
            "x-ms-blob-content-md5": md5_b64,
            "x-ms-meta-sha256": sha256,
            "x-ms-version": self.api_version,
            "x-ms-date": formatdate(usegmt=True),
            "x-ms-client-request-id": str(uuid.uuid4()),
        }
        if not overwrite:
            headers["If-None-Match"] = "*"
        if isinstance(self.auth, SharedKey):
            headers["Authorization"] = self.auth.sign("PUT", path, headers)
        else:
            headers["Authorization"] = self.auth.header()
        return headers

    def path(self, name: str) -> str:
        return f"{self.base_path}/{quote(name, safe='~/')}"

    def put(self, name: str, data: bytes, content_type: str, md5: bytes, sha256: str, overwrite: bool) -> PutAnswer:
        path = self.path(name)
        headers = self.headers(path, len(data), content_type, md5, sha256, overwrite)
        try:
            response = self.pool.urlopen(
                "PUT", path, body=data, headers=headers, retries=False, redirect=False, preload_content=True
            )
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise Fallback(f"{type(e).__name__}: {e}") from e
        status = response.status
        if status == 201 and response.headers.get("ETag"):
            stored = response.headers.get("Content-MD5")
            modified = response.headers.get("Last-Modified")
            return PutAnswer(
                exists=False,
                info=ObjectInfo(
                    name=name,
                    size=len(data),
                    etag=response.headers["ETag"],
                    last_modified=parsedate_to_datetime(modified) if modified else None,
                    content_md5=base64.b64decode(stored) if stored else None,
                    sha256=sha256,
                    content_type=content_type,
                ),
            )
        if status == 409 and not overwrite and response.headers.get("x-ms-error-code") == "BlobAlreadyExists":
            return PutAnswer(exists=True)
        if 400 <= status < 500 and status not in SDK_HANDLES:
            raise Refused(status, response.data, response.headers)
        raise Fallback(f"HTTP {status} {response.headers.get('x-ms-error-code', '')}")
