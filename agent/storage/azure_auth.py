"""Building the Azure credential for the configured auth mode.

Only azure-identity's own credential classes get tokens, and token refresh and retries are theirs:

* azure-core's bearer-token policy asks for a new token 5 minutes (less up to 60 s of jitter)
  before the current one expires, on the request that finds it due, so a long upload, migration or
  stream never sends an expired token. For IMDS tokens (24 h) msal also refreshes at half-life and,
  if IMDS fails then, keeps serving the cached token until 5 minutes before its end.
* IMDS requests go through azure-identity's ImdsRetryPolicy: it retries 404, 410, 429 and 5xx (what
  Microsoft's IMDS guidance asks for) with exponential backoff, 410 long enough to outlast IMDS's
  70-second update window, and honours Retry-After.

What the agent adds is bounds (azure-identity waits up to requests' 300 s for an IMDS answer on
each of six tries), a direct route to IMDS (Microsoft: never through a proxy), no chained
fallbacks (a failure names the one mode that was configured), and a one-line message that says
what failed and what to check, which `status` shows as the outage.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from azure.core.exceptions import ClientAuthenticationError

from ..config import Config

STORAGE_SCOPE = "https://storage.azure.com/.default"
IMDS_DEFAULT = "http://169.254.169.254"
# azure-identity (and msal) send IMDS requests here instead when it is set: AKS pod identity, tests.
IMDS_OVERRIDE_VARIABLE = "AZURE_POD_IDENTITY_AUTHORITY_HOST"
# The statuses Microsoft says to retry, and ImdsRetryPolicy retries.
IMDS_RETRIED = frozenset((404, 410, 429, *range(500, 600)))


class TokenUnavailable(ClientAuthenticationError):
    """No token: the message is one line naming the identity endpoint and what to check.

    A ClientAuthenticationError without a response, so the store reports it as "cannot get a
    token: ..." and as an outage (every request would fail the same way)."""


def imds_address() -> str:
    return (os.environ.get(IMDS_OVERRIDE_VARIABLE) or IMDS_DEFAULT).strip().rstrip("/")


class _Attempts(threading.local):
    """The HTTP tries of the current token fetch in this thread, seen through azure-core's
    documented per-try hooks, so a failure can say what IMDS actually answered."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sent = 0
        self.statuses: list[int] = []
        self.started = time.monotonic()

    def on_request(self, request: Any) -> None:
        self.sent += 1

    def on_response(self, response: Any) -> None:
        self.statuses.append(response.http_response.status_code)


def transport_kwargs(config: Config) -> dict[str, Any]:
    """Pipeline settings for the service-principal credentials (Entra ID over HTTPS)."""
    kwargs: dict[str, Any] = {
        "connection_timeout": config.credential_timeout,
        "read_timeout": config.credential_timeout,
        # The credential's own retries stay short; the upload queue retries for hours anyway.
        "retry_total": 3,
        # azure-core's RetryPolicy: the whole fetch, backoff included, ends after this.
        "timeout": config.credential_retry_timeout,
    }
    if config.ca_bundle:
        kwargs["connection_verify"] = str(config.ca_bundle)
    return kwargs


def imds_kwargs(config: Config, attempts: _Attempts | None = None) -> dict[str, Any]:
    """Pipeline settings for ManagedIdentityCredential on a VM (IMDS).

    azure-identity's IMDS defaults stay: 2 s to connect (IMDS is on the host's own link, so no
    connection in 2 s means no IMDS), ImdsRetryPolicy with 5 retries and its status list. Only what
    it leaves unbounded is bounded."""
    kwargs: dict[str, Any] = {
        # Per try: azure-identity sets no read timeout, so a hung IMDS would hold each try 300 s.
        "read_timeout": config.credential_timeout,
        # All tries and their backoff; must stay above IMDS's 70 s of 410s to ride them out.
        "timeout": config.credential_retry_timeout,
        # Microsoft: "bypass web proxies within the VM when querying IMDS". A proxy from the
        # environment would forward 169.254.169.254 to its own host, or be refused by IMDS.
        "use_env_settings": False,
    }
    if attempts is not None:
        kwargs["raw_request_hook"] = attempts.on_request
        kwargs["raw_response_hook"] = attempts.on_response
    return kwargs


class ManagedIdentity:
    """azure-identity's ManagedIdentityCredential, its failures reworded for the operator."""

    def __init__(self, config: Config) -> None:
        from azure.identity import ManagedIdentityCredential

        self.client_id = config.client_id
        self.credential_timeout = config.credential_timeout
        self._attempts = _Attempts()
        # client_id selects a user-assigned identity (GigHive's Terraform makes one); without it
        # IMDS answers for the system-assigned one.
        self._inner = ManagedIdentityCredential(client_id=config.client_id, **imds_kwargs(config, self._attempts))

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        self._attempts.reset()
        try:
            return self._inner.get_token(*scopes, **kwargs)
        except ClientAuthenticationError as e:
            raise TokenUnavailable(self.explain(e)) from e

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        self._attempts.reset()
        try:
            return self._inner.get_token_info(*scopes, options=options)
        except ClientAuthenticationError as e:
            raise TokenUnavailable(self.explain(e)) from e

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> ManagedIdentity:
        self._inner.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        self._inner.__exit__(*args)

    def explain(self, e: Exception) -> str:
        """One line (the journal and `status` show the first line only): what IMDS did, what to check."""
        a = self._attempts
        where = f"IMDS ({urlsplit(imds_address()).netloc or imds_address()})"
        who = f"managed identity {self.client_id}" if self.client_id else "the VM's system-assigned identity"
        tries = f"{a.sent} tr{'y' if a.sent == 1 else 'ies'} over {time.monotonic() - a.started:.0f} s"
        last = a.statuses[-1] if a.statuses else None
        said = _imds_error(e)
        if last is not None and 400 <= last < 500 and last not in IMDS_RETRIED:
            if self.client_id:
                return (
                    f"{where} has no {who} (HTTP {last}{': ' + said if said else ''}): assign that user-assigned "
                    "identity to this VM, and set AZURE_CLIENT_ID to its client id, not its principal (object) id"
                )
            return (
                f"{where} has no system-assigned identity for this VM (HTTP {last}{': ' + said if said else ''}): "
                "set AZURE_CLIENT_ID to the user-assigned identity's client id, or enable the system-assigned one"
            )
        if last is not None and last in IMDS_RETRIED:
            return (
                f"{where} is unavailable: HTTP {last} for {who} after {tries} (404/410: updating or an identity "
                "being assigned; 429: throttled; 5xx: failing). Nothing is lost: the agent tries again later"
            )
        if a.sent and not a.statuses:
            return (
                f"{where} cannot be reached or did not answer ({tries}, up to {self.credential_timeout:g} s each): "
                "on an Azure VM, let 169.254.169.254 through the units' IPAddressAllow= and the host firewall; "
                "off Azure, use AZURE_AUTH_MODE=service_principal"
            )
        if not a.sent:
            # msal holds back a request that failed a moment ago (5 s, or the Retry-After).
            return f"{where} failed for {who} moments ago and is not asked again yet: {said or _first_line(e)}"
        return f"{where} gave no token for {who} (HTTP {last}): {said or _first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e)
    return text.splitlines()[0][:200] if text else type(e).__name__


def _imds_error(e: BaseException) -> str:
    """IMDS's own error text as azure-identity passes it on ("Token request error: (code) text")."""
    m = re.search(r"Token request error: \(([^)]*)\)\s*(.*)", str(getattr(e, "message", None) or e))
    if not m:
        return ""
    code, text = m.group(1), m.group(2).strip().splitlines()[0][:120] if m.group(2).strip() else ""
    return f"{code}: {text}" if text else code


def build_credential(config: Config) -> Any:
    """A TokenCredential for managed_identity / service_principal; None for connection_string."""
    if config.auth_mode == "managed_identity":
        return ManagedIdentity(config)
    if config.auth_mode == "service_principal":
        from azure.identity import CertificateCredential, ClientSecretCredential

        kwargs = transport_kwargs(config)
        if config.authority_host:
            kwargs["authority"] = config.authority_host
            # A custom authority (sovereign cloud, or a test endpoint) has no public instance
            # metadata to discover.
            kwargs["disable_instance_discovery"] = True
        if config.client_certificate_path is not None:
            return CertificateCredential(
                config.tenant_id, config.client_id, certificate_path=str(config.client_certificate_path), **kwargs
            )
        assert config.client_secret is not None
        return ClientSecretCredential(config.tenant_id, config.client_id, config.client_secret.reveal(), **kwargs)
    return None
