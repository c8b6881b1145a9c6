"""Building the Azure credential for the configured auth mode.

Only azure-identity's own credential classes are used. Token refresh is theirs too: the SDK's
bearer-token policy asks for a new token minutes before the current one expires, so a long upload
never sends an expired token. What the agent adds is bounded timeouts (IMDS is known to hang
under load) and no chained fallbacks, so an auth failure names the one mode that was configured.
"""

from __future__ import annotations

from typing import Any

from ..config import Config

STORAGE_SCOPE = "https://storage.azure.com/.default"


def transport_kwargs(config: Config) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "connection_timeout": config.credential_timeout,
        "read_timeout": config.credential_timeout,
        # The credential's own retries stay short; the upload queue retries for hours anyway.
        "retry_total": 3,
    }
    if config.ca_bundle:
        kwargs["connection_verify"] = str(config.ca_bundle)
    return kwargs


def build_credential(config: Config) -> Any:
    """A TokenCredential for managed_identity / service_principal; None for connection_string."""
    from azure.identity import CertificateCredential, ClientSecretCredential, ManagedIdentityCredential

    kwargs = transport_kwargs(config)
    if config.auth_mode == "managed_identity":
        # client_id selects a user-assigned identity; without it IMDS answers for the
        # system-assigned one.
        return ManagedIdentityCredential(client_id=config.client_id, **kwargs)
    if config.auth_mode == "service_principal":
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
