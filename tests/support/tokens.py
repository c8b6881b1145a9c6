"""A loopback stand-in for the two token services azure-identity talks to:

* the managed-identity endpoint (IMDS), reached by ManagedIdentityCredential when
  AZURE_POD_IDENTITY_AUTHORITY_HOST=<server.url>;
* Microsoft Entra ID for service principals, reached by ClientSecretCredential /
  CertificateCredential with authority=<server.url>, disable_instance_discovery=True and
  connection_verify=<CA that signed the server certificate> (msal insists on HTTPS).

Tokens are JWTs that Azurite's ``--oauth basic`` mode accepts (it checks iss/aud/nbf/exp, not the
signature). Every request is recorded so tests can count token fetches, and failures can be injected.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

STORAGE_RESOURCE = "https://storage.azure.com"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# IMDS answers for the VM's system-assigned identity when the request names no identity.
SYSTEM_ASSIGNED = "system-assigned"
# The versions IMDS publishes (instance-metadata-service, "Supported API versions"); the identity
# endpoint needs 2018-02-01 or later ("Use API version 2018-02-01 or greater", how-to-use-vm-token).
IMDS_API_VERSIONS = frozenset(
    [
        "2018-02-01",
        "2018-04-02",
        "2018-10-01",
        "2019-02-01",
        "2019-03-11",
        "2019-04-30",
        "2019-06-01",
        "2019-06-04",
        "2019-08-01",
        "2019-08-15",
        "2019-11-01",
        "2020-06-01",
        "2020-07-15",
        "2020-09-01",
        "2020-10-01",
        "2020-12-01",
        "2021-01-01",
        "2021-02-01",
        "2021-03-01",
        "2021-05-01",
        "2021-10-01",
        "2021-11-01",
        "2021-11-15",
        "2021-12-13",
        "2023-07-01",
        "2023-11-15",
        "2024-03-15",
        "2025-04-07",
    ]
)
# Resources (App ID URIs) a token may be asked for; anything else is Entra's AADSTS500011.
IMDS_RESOURCES = frozenset(
    (
        "https://storage.azure.com",
        "https://management.azure.com",
        "https://vault.azure.net",
        "https://database.windows.net",
    )
)
_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
# What IMDS sends with the statuses Microsoft says to retry (how-to-use-vm-token, "Error handling").
_IMDS_RETRYABLE_BODIES = {
    404: ("not_found", "IMDS endpoint is updating."),
    410: ("gone", "IMDS is going through updates; it will be available within 70 seconds."),
    429: ("too_many_requests", "IMDS throttle limit reached."),
    500: ("unknown", "Failed to retrieve token from the Active directory."),
    503: ("unknown", "The managed identities subsystem is temporarily unavailable."),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt(token: str) -> tuple[dict, dict]:
    """(header, claims) without verification: for assertions in tests."""
    header, claims, _sig = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims))


@dataclass
class TokenRequest:
    """One request seen by the server."""

    method: str
    path: str
    kind: str  # "imds", "discovery", "token", "unknown"
    status: int = 0
    client_id: str | None = None
    grant_type: str | None = None
    auth: str | None = None  # "secret", "assertion", "managed-identity" or None
    resource: str | None = None  # IMDS resource= or token scope= (as sent)
    tenant: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


@dataclass
class _Client:
    client_id: str
    secret: str | None = None
    certificate: x509.Certificate | None = None


class _Failure(Exception):
    def __init__(self, status: int, body: dict, record: bool = True) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.record = record


def _aad_error(status: int, error: str, code: int, text: str) -> _Failure:
    trace = str(uuid.uuid4())
    now = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    return _Failure(
        status,
        {
            "error": error,
            "error_description": f"AADSTS{code}: {text} Trace ID: {trace} Timestamp: {now}",
            "error_codes": [code],
            "timestamp": now,
            "trace_id": trace,
            "correlation_id": str(uuid.uuid4()),
            "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        },
    )


def _imds_unavailable(status: int) -> _Failure:
    error, text = _IMDS_RETRYABLE_BODIES.get(status, ("unknown", "Injected failure."))
    return _Failure(status, {"error": error, "error_description": text})


class TokenServer:
    """Threaded HTTP(S) token endpoint on 127.0.0.1.

    Thread safety: configuration calls (add_client, fail_next, set_lifetime, reset) may be made from
    the test while SDK clients talk to the server.
    """

    def __init__(
        self,
        *,
        certfile: os.PathLike[str] | str | None = None,
        keyfile: os.PathLike[str] | str | None = None,
        tenant_id: str | None = None,
        expires_in: int = 3600,
        alg: str = "RS256",
        require_known_identity: bool = False,
    ) -> None:
        if alg not in ("RS256", "none"):
            raise ValueError("alg must be RS256 or none")
        self.certfile = Path(certfile) if certfile else None
        self.keyfile = Path(keyfile) if keyfile else None
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.alg = alg
        self._default_lifetime = expires_in
        self._lifetime = expires_in
        # With require_known_identity, IMDS answers 400 for client ids not added via add_identity(),
        # as a VM does for identities not assigned to it.
        self.require_known_identity = require_known_identity
        self._identities: set[str] = set()
        # client id -> statuses still to answer for it (IMDS answers 404/410 while an identity is
        # being assigned to the VM, until the assignment has reached it).
        self._settling: dict[str, list[int]] = {}
        self._hangs: list[float] = []
        self._release = threading.Event()
        self._clients: dict[str, _Client] = {}
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._failures: list[int] = []
        self._issued: list[dict] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def https(self) -> bool:
        return self.certfile is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("token server not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL: the value for AZURE_POD_IDENTITY_AUTHORITY_HOST, and the authority= for
        service-principal credentials."""
        return f"{'https' if self.https else 'http'}://127.0.0.1:{self.port}"

    authority = url

    @property
    def issuer(self) -> str:
        return f"https://sts.windows.net/{self.tenant_id}/"

    # -- configuration -----------------------------------------------------------------------
    def add_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        certificate: os.PathLike[str] | str | x509.Certificate | None = None,
    ) -> None:
        """Register a service principal. certificate: its public certificate (PEM path or object);
        a client assertion must be signed by the matching key."""
        if isinstance(certificate, (str, os.PathLike)):
            certificate = x509.load_pem_x509_certificate(Path(certificate).read_bytes())
        with self._lock:
            self._clients[client_id] = _Client(client_id, secret, certificate)

    def add_identity(self, client_id: str, *, settling: int = 0, status: int = 404) -> None:
        """Assign a user-assigned managed identity (only matters with require_known_identity).
        settling: the first n token requests for it answer `status` (404 or 410), as IMDS does
        while a new assignment reaches the VM."""
        with self._lock:
            self._identities.add(client_id)
            self._settling[client_id] = [status] * settling

    def hang_next(self, n: int = 1, seconds: float = 3600.0) -> None:
        """The next n IMDS token requests get no answer for `seconds` (a slow or hung IMDS); reset()
        or stop() lets them go."""
        with self._lock:
            self._hangs.extend([seconds] * n)

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        """The next n token requests (IMDS or Entra token endpoint, not discovery) fail with status.
        status 0 drops the connection without an answer, like an endpoint that resets.

        azure-identity's IMDS client retries 404/410/429/5xx up to 5 times with growing sleeps (and
        410 for over 70 s); 400 fails at once, so prefer it unless the retry itself is under test."""
        with self._lock:
            self._failures.extend([status] * n)

    def set_lifetime(self, seconds: int) -> None:
        """Lifetime (expires_in) of tokens issued from now on; negative issues already expired tokens."""
        with self._lock:
            self._lifetime = seconds

    def reset(self) -> None:
        """Forget requests and injected failures, restore the default lifetime. Keeps clients."""
        with self._lock:
            self._requests.clear()
            self._failures.clear()
            self._issued.clear()
            self._hangs.clear()
            self._settling.clear()
            self._lifetime = self._default_lifetime
        self._release.set()
        self._release = threading.Event()

    # -- observation -------------------------------------------------------------------------
    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def token_requests(self, client_id: str | None = None, *, kind: str | None = None) -> list[TokenRequest]:
        """Token fetches (IMDS + Entra token endpoint), optionally for one client id or kind."""
        kinds = (kind,) if kind else ("imds", "token")
        return [r for r in self.requests if r.kind in kinds and (client_id is None or r.client_id == client_id)]

    @property
    def issued(self) -> list[dict]:
        """Claims of every token handed out, in order."""
        with self._lock:
            return list(self._issued)

    # -- tokens ------------------------------------------------------------------------------
    def mint(
        self,
        *,
        lifetime: int | None = None,
        audience: str = STORAGE_RESOURCE,
        client_id: str | None = None,
        issuer: str | None = None,
        extra_claims: dict | None = None,
    ) -> str:
        """A storage bearer token, as issued by the endpoints; usable directly in tests
        (e.g. lifetime=-600 for an expired token)."""
        with self._lock:
            life = self._lifetime if lifetime is None else lifetime
        now = int(time.time())
        oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.tenant_id}/{client_id or SYSTEM_ASSIGNED}"))
        # iat/nbf lie in the past so a token is never "not yet valid" to Azurite; expired tokens
        # keep iat < nbf <= exp consistent.
        start = min(now, now + life) - 60
        claims = {
            "aud": audience,
            "iss": issuer or self.issuer,
            "iat": start,
            "nbf": start,
            "exp": now + life,
            "oid": oid,
            "sub": oid,
            "tid": self.tenant_id,
            "appid": client_id or oid,
            "idtyp": "app",
            "ver": "1.0",
            "uti": secrets.token_urlsafe(16),
        }
        claims.update(extra_claims or {})
        header = {"typ": "JWT", "alg": self.alg}
        if self.alg == "RS256":
            header["kid"] = self._kid
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        sig = b""
        if self.alg == "RS256":
            sig = self._signing_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        with self._lock:
            self._issued.append(claims)
        return f"{signing_input}.{b64url(sig)}"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> TokenServer:
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        if self.https:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.certfile), str(self.keyfile))
            # Handshake in the handler thread, so one stuck client cannot block accept().
            server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="token-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(10)
        self._server = None
        self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling (called from handler threads) --------------------------------------
    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self._requests.append(req)

    def _take_failure(self) -> int | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    def _imds(self, req: TokenRequest, query: dict[str, str], headers: dict[str, str]) -> dict:
        """The managed-identity endpoint, checking what real IMDS checks, in its order."""
        req.auth = "managed-identity"
        req.resource = query.get("resource")
        ids = {k: query[k] for k in ("client_id", "object_id", "msi_res_id", "mi_res_id") if query.get(k)}
        req.client_id = ids.get("client_id") or ids.get("object_id") or ids.get("msi_res_id") or ids.get("mi_res_id")
        with self._lock:
            hang = self._hangs.pop(0) if self._hangs else None
            release = self._release
        if hang is not None and release.wait(hang):
            # Let go by reset() or stop(): that test is over, so this request must not count in the next.
            raise _Failure(0, {}, record=False)
        # IMDS is reached directly, never through a proxy: it refuses forwarded requests.
        if "x-forwarded-for" in headers:
            raise _Failure(400, {"error": "invalid_request", "error_description": "Request is forwarded"})
        # "This value must be set to true, in all lower case."
        if headers.get("metadata") != "true":
            raise _Failure(
                400, {"error": "bad_request_102", "error_description": "Required metadata header not specified"}
            )
        version = query.get("api-version")
        if version not in IMDS_API_VERSIONS:
            said = "was not specified in the request" if not version else f"'{version}' is not supported"
            raise _Failure(
                400,
                {
                    "error": f"Bad request. api-version {said}. For more information refer to aka.ms/azureimds",
                    "newest-versions": sorted(IMDS_API_VERSIONS, reverse=True)[:3],
                },
            )
        if not req.resource:
            raise _Failure(
                400, {"error": "invalid_request", "error_description": "Required audience parameter not specified"}
            )
        if req.resource.rstrip("/") not in IMDS_RESOURCES:
            raise _aad_error(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {req.resource} was not found in the tenant named {self.tenant_id}.",
            )
        if len(ids) > 1:
            raise _Failure(
                400, {"error": "invalid_request", "error_description": "Only one identity parameter may be specified"}
            )
        if "client_id" in ids and not _GUID.match(ids["client_id"]):
            raise _Failure(400, {"error": "invalid_request", "error_description": "Identity not found"})
        with self._lock:
            settling = self._settling.get(req.client_id or "")
            pending = settling.pop(0) if settling else None
        if pending is not None:
            raise _imds_unavailable(pending)
        if self.require_known_identity and req.client_id and req.client_id not in self._identities:
            raise _Failure(400, {"error": "invalid_request", "error_description": "Identity not found"})
        failure = self._take_failure()
        if failure is not None:
            raise _imds_unavailable(failure)
        with self._lock:
            life = self._lifetime
        now = int(time.time())
        token = self.mint(lifetime=life, audience=req.resource.rstrip("/"), client_id=req.client_id)
        # IMDS sends the numbers as strings.
        return {
            "access_token": token,
            "refresh_token": "",
            "expires_in": str(life),
            "expires_on": str(now + life),
            "ext_expires_in": str(life),
            "not_before": str(now - 60),
            "resource": req.resource,
            "token_type": "Bearer",
            "client_id": req.client_id or str(uuid.uuid5(uuid.NAMESPACE_URL, SYSTEM_ASSIGNED)),
        }

    def _discovery(self, tenant: str) -> dict:
        self._check_tenant(tenant)
        base = f"{self.url}/{tenant}"
        return {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/v2.0",
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
        }

    def _check_tenant(self, tenant: str) -> None:
        if tenant not in (self.tenant_id, "organizations"):
            raise _aad_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")

    def _token(self, req: TokenRequest, tenant: str, form: dict[str, str]) -> dict:
        self._check_tenant(tenant)
        req.client_id = form.get("client_id")
        req.grant_type = form.get("grant_type")
        req.resource = form.get("scope")
        if req.grant_type != "client_credentials":
            raise _aad_error(
                400, "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{req.grant_type}'."
            )
        with self._lock:
            client = self._clients.get(req.client_id or "")
        if client is None:
            raise _aad_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{req.client_id}' was not found in the directory '{self.tenant_id}'.",
            )
        if "client_secret" in form:
            req.auth = "secret"
            if client.secret is None or not secrets.compare_digest(form["client_secret"], client.secret):
                raise _aad_error(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the "
                    "request is the client secret value, not the client secret ID, for a "
                    f"secret added to app '{client.client_id}'.",
                )
        elif "client_assertion" in form:
            req.auth = "assertion"
            if form.get("client_assertion_type") != ASSERTION_TYPE:
                raise _aad_error(
                    400,
                    "invalid_request",
                    90014,
                    "The request body must contain the following parameter: 'client_assertion_type'.",
                )
            self._check_assertion(client, form["client_assertion"], f"{self.url}/{tenant}/oauth2/v2.0/token")
        else:
            raise _aad_error(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            )
        failure = self._take_failure()
        if failure is not None:
            raise _aad_error(failure, "temporarily_unavailable", 50196, "Injected failure.")
        scope = (req.resource or "").split()
        resource = next((s for s in scope if s.endswith("/.default")), STORAGE_RESOURCE + "/.default")
        with self._lock:
            life = self._lifetime
        token = self.mint(lifetime=life, audience=resource[: -len("/.default")], client_id=client.client_id)
        return {"token_type": "Bearer", "expires_in": life, "ext_expires_in": life, "access_token": token}

    def _check_assertion(self, client: _Client, assertion: str, token_endpoint: str) -> None:
        def bad(text: str) -> _Failure:
            return _aad_error(401, "invalid_client", 700027, f"Client assertion failed signature validation. {text}")

        if client.certificate is None:
            raise _aad_error(
                401,
                "invalid_client",
                700027,
                f"Client assertion contains an invalid signature. No certificate registered for '{client.client_id}'.",
            )
        try:
            h64, c64, s64 = assertion.split(".")
            header = json.loads(b64url_decode(h64))
            claims = json.loads(b64url_decode(c64))
            sig = b64url_decode(s64)
        except ValueError as exc:
            raise bad("Malformed assertion.") from exc
        cert = client.certificate

        def thumb(name: str) -> str:
            # msal keeps the base64 padding; RFC 7515 says to drop it. Accept both.
            return str(header.get(name) or "").rstrip("=")

        thumb_ok = (
            thumb("x5t#S256") == b64url(cert.fingerprint(hashes.SHA256()))
            or thumb("x5t") == b64url(cert.fingerprint(hashes.SHA1()))  # noqa: S303 - Entra's x5t is SHA-1
        )
        if not thumb_ok:
            raise bad("Key not found (thumbprint does not match the registered certificate).")
        alg = header.get("alg")
        if alg == "PS256":
            pad: padding.AsymmetricPadding = padding.PSS(
                mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH
            )
        elif alg == "RS256":
            pad = padding.PKCS1v15()
        else:
            raise bad(f"Unsupported alg {alg!r}.")
        public_key = cert.public_key()
        assert isinstance(public_key, rsa.RSAPublicKey)
        try:
            public_key.verify(sig, f"{h64}.{c64}".encode(), pad, hashes.SHA256())
        except InvalidSignature as exc:
            raise bad("Signature is invalid.") from exc
        now = time.time()
        if claims.get("aud") != token_endpoint:
            raise _aad_error(
                401,
                "invalid_client",
                700212,
                f"No matching federated identity record found for presented assertion audience '{claims.get('aud')}'.",
            )
        if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
            raise bad("Issuer/subject must be the client id.")
        if not isinstance(claims.get("exp"), (int, float)) or claims["exp"] < now:
            raise _aad_error(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")


def _make_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "gighive-test-token-server"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            pass

        # Idle keep-alive connections must not pin handler threads forever.
        timeout = 30

        def setup(self) -> None:
            self._handshake_failed = False
            if isinstance(self.request, ssl.SSLSocket):
                self.request.settimeout(self.timeout)
                try:
                    self.request.do_handshake()
                except (OSError, ssl.SSLError):
                    # A client that rejects our certificate is a test outcome, not a server error.
                    self._handshake_failed = True
            super().setup()

        def handle(self) -> None:
            if self._handshake_failed:
                return
            with contextlib.suppress(OSError, ssl.SSLError):
                super().handle()

        def _send_json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self, method: str) -> None:
            parts = urlsplit(self.path)
            path = parts.path
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            headers = {k.lower(): v for k, v in self.headers.items()}
            body = b""
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                body = self.rfile.read(length)
            req = TokenRequest(method=method, path=self.path, kind="unknown", headers=headers)
            segments = [s for s in path.split("/") if s]
            try:
                if method == "GET" and path == "/metadata/identity/oauth2/token":
                    req.kind = "imds"
                    answer = server._imds(req, query, headers)
                elif (
                    method == "GET"
                    and len(segments) == 4
                    and segments[1:] == ["v2.0", ".well-known", "openid-configuration"]
                ):
                    req.kind = "discovery"
                    req.tenant = segments[0]
                    answer = server._discovery(segments[0])
                elif method == "POST" and len(segments) == 4 and segments[1:] == ["oauth2", "v2.0", "token"]:
                    req.kind = "token"
                    req.tenant = segments[0]
                    form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
                    answer = server._token(req, segments[0], form)
                else:
                    raise _Failure(404, {"error": "not_found", "error_description": f"no route {method} {path}"})
                req.status = 200
                server._record(req)
                self._send_json(200, answer)
            except _Failure as f:
                req.status = f.status
                if f.record:
                    server._record(req)
                if f.status == 0:
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(2)
                    return
                self._send_json(f.status, f.body)

        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802 - stdlib naming
            self._dispatch("POST")

    return Handler
