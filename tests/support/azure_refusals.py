"""A loopback Blob endpoint that refuses requests exactly as Azure does, for the refusals Azurite
cannot produce: a storage firewall (403 AuthorizationFailure) and a missing data role
(403 AuthorizationPermissionMismatch), besides a missing container (404 ContainerNotFound).

Each answer is what the Blob service sends (REST reference, "Blob Storage error codes" and "Common
REST API error codes"): the status line with the error message as its reason phrase,
x-ms-error-code, x-ms-request-id, x-ms-version, and the XML <Error> body whose Message ends with the
RequestId and Time lines. Requests the test has not told it to refuse get Azure's success answers
for the few operations doctor sends (Get Container Properties, List Blobs); writes are refused as a
Storage Blob Data Reader would see them, unless told otherwise.
"""

from __future__ import annotations

import email.utils
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key: the stub does not check signatures, the SDK needs a key.
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

ERRORS = {
    "AuthorizationFailure": (403, "This request is not authorized to perform this operation."),
    "AuthorizationPermissionMismatch": (
        403,
        "This request is not authorized to perform this operation using this permission.",
    ),
    "ContainerNotFound": (404, "The specified container does not exist."),
}


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    op: str
    status: int = 0
    request_id: str = ""


@dataclass
class RefusingBlobEndpoint:
    """answers: operation ("container_properties", "list", "write") -> an error code of ERRORS, or
    None for success."""

    answers: dict[str, str | None] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={DEV_KEY};BlobEndpoint={self.url};"

    def start(self) -> RefusingBlobEndpoint:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _op(method: str, path: str, query: dict[str, str]) -> str:
    parts = [p for p in path.split("/") if p]
    if len(parts) == 2 and query.get("restype") == "container":
        if query.get("comp") == "list":
            return "list"
        if "comp" not in query and method in ("GET", "HEAD"):
            return "container_properties"
    if method in ("PUT", "DELETE"):
        return "write"
    return "read"


def _handler(stub: RefusingBlobEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            pass

        def _answer(self, method: str) -> None:
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            headers = {k.lower(): v for k, v in self.headers.items()}
            length = int(headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            op = _op(method, parts.path, query)
            request_id = str(uuid.uuid4())
            seen = Seen(method, parts.path, query, headers, op, request_id=request_id)
            stub.seen.append(seen)
            code = stub.answers.get(op, "AuthorizationPermissionMismatch" if op in ("write", "read") else None)
            common = {
                "Server": "Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0",
                "x-ms-request-id": request_id,
                "x-ms-version": headers.get("x-ms-version", "2025-01-05"),
                "Date": email.utils.formatdate(usegmt=True),
            }
            if "x-ms-client-request-id" in headers:
                common["x-ms-client-request-id"] = headers["x-ms-client-request-id"]
            if code is not None:
                status, message = ERRORS[code]
                now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
                body = (
                    '\ufeff<?xml version="1.0" encoding="utf-8"?><Error>'
                    f"<Code>{code}</Code><Message>{message}\nRequestId:{request_id}\nTime:{now}</Message></Error>"
                ).encode()
                seen.status = status
                self.send_response(status, message)
                for k, v in common.items():
                    self.send_header(k, v)
                self.send_header("x-ms-error-code", code)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body) if method != "HEAD" else 0))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(body)
                return
            seen.status = 200
            if op == "list":
                body = (
                    '\ufeff<?xml version="1.0" encoding="utf-8"?>'
                    f'<EnumerationResults ServiceEndpoint="{stub.url}/" ContainerName="{parts.path.split("/")[2]}">'
                    f"<MaxResults>{query.get('maxresults', '5000')}</MaxResults><Blobs /><NextMarker /></EnumerationResults>"
                ).encode()
                self.send_response(200)
                for k, v in common.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            # Get Container Properties of a private container.
            self.send_response(200)
            for k, v in common.items():
                self.send_header(k, v)
            self.send_header("ETag", '"0x8DCB1A2B3C4D5E6"')
            self.send_header("Last-Modified", "Mon, 02 Nov 2026 10:00:00 GMT")
            self.send_header("x-ms-lease-status", "unlocked")
            self.send_header("x-ms-lease-state", "available")
            self.send_header("x-ms-has-immutability-policy", "false")
            self.send_header("x-ms-has-legal-hold", "false")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            self._answer("GET")

        def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
            self._answer("HEAD")

        def do_PUT(self) -> None:  # noqa: N802 - stdlib naming
            self._answer("PUT")

        def do_DELETE(self) -> None:  # noqa: N802 - stdlib naming
            self._answer("DELETE")

    return Handler
