"""Every use of the Azure SDK below its public API, in one place.

The agent goes below the public API where the public one costs too much:
- List Blobs: the SDK turns every listed blob into a model object, about 0.4 ms of CPU per blob
  (40 s for a 100,000-file library). `send` sends the same request through the container
  client's own pipeline (auth, retries, timeouts, x-ms-date, x-ms-client-request-id) and hands
  back the raw answer, which the caller parses itself.
- Ranged reads for the stream server: the public downloader holds whole 4 MiB chunks in memory
  and opens a request per chunk. `download` calls the operation the downloader itself calls,
  keeping the response unread, and `body_reader` reaches the socket-level reader that fills a
  caller's buffer without copies.
- Per-block MD5: the public `stage_block` only computes an MD5 itself (hashing every block a
  second time); `stage_block` here hands the MD5 the agent already computed to the operation's
  own `transactional_content_md5` parameter, which becomes the Content-MD5 header the service
  checks the block against.

tests/unit/test_sdk_contract.py checks every name used here and what reaches the wire, so an
SDK upgrade that changes any of it fails loudly instead of silently dropping a header.
"""

from __future__ import annotations

import base64
from typing import Any

from azure.core.rest import HttpRequest
from azure.storage.blob import BlobClient, ContainerClient

# Azure refuses a request without x-ms-version ("required for all authorized requests"), and a
# bearer-token request with a version older than this (docs/azure-conformance.md).
MIN_BEARER_VERSION = "2017-11-09"


def api_version(client: ContainerClient | BlobClient) -> str:
    """The REST version the client speaks (public: `api_version`), for hand-built requests."""
    return client.api_version


def send(
    container: ContainerClient, method: str, url: str, headers: dict[str, str] | None = None, stream: bool = False
) -> Any:
    """Send a hand-built request through the container client's pipeline; the raw HttpResponse
    (with `stream`, its body unread: read it with iter_bytes() or read(), then close() it).

    The pipeline adds the authorization, x-ms-date and x-ms-client-request-id; x-ms-version is
    set by each generated operation, not by a policy, so it is added here from the client.
    """
    pipeline = container._client._client  # noqa: SLF001 - azure.core PipelineClient of this container
    request = HttpRequest(method, url, headers={"x-ms-version": api_version(container), **(headers or {})})
    return pipeline.send_request(request, stream=stream)


def download(blob: BlobClient, offset: int, length: int, etag: str, **options: Any) -> Any:
    """A streaming ranged GET pinned with If-Match; the unread requests.Response."""
    http_response = blob._client.blob.download(  # noqa: SLF001 - the operation the downloader calls
        range=f"bytes={offset}-{offset + length - 1}",
        headers={"If-Match": etag},
        cls=lambda pipeline_response, _deserialized, _headers: pipeline_response.http_response,
        **options,
    )
    return http_response.internal_response


def body_reader(response: Any) -> Any | None:
    """http.client's response under urllib3's, whose readinto() fills a buffer straight from the
    socket; None if urllib3 no longer has one (the caller then reads through urllib3)."""
    fp = getattr(response.raw, "_fp", None)
    return fp if fp is not None and hasattr(fp, "readinto") else None


def body_finished(response: Any) -> bool:
    """Whether the socket-level body was read to its end (the connection may go back to the pool)."""
    fp = getattr(response.raw, "_fp", None)
    return fp is None or fp.isclosed()


def stage_block(blob: BlobClient, block_id: str, data: bytes, md5: bytes, **options: Any) -> dict[str, Any]:
    """Put Block with our MD5 as its transactional Content-MD5; the response headers.

    The public stage_block passes unknown keywords on to the generated operation, whose
    `transactional_content_md5` parameter is the Content-MD5 header. Passed by name here, and
    the contract test asserts the header reaches the wire.
    """
    if len(md5) != 16:
        raise ValueError(f"a Content-MD5 is 16 bytes, got {len(md5)}")
    return blob.stage_block(block_id, data, length=len(data), transactional_content_md5=bytearray(md5), **options)


def content_md5_header(md5: bytes) -> str:
    """How Content-MD5 looks on the wire: base64 of the 16 digest bytes."""
    return base64.b64encode(md5).decode()
