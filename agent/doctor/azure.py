"""Checks that talk to Azure: a token for the configured identity, the container, a probe blob."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import socket
import time
import uuid

from . import FAIL, PASS, SKIP, WARN, Check, Context

PROBE_PREFIX = "gighive-media-doctor/"


def _skip_reason(ctx: Context, *needs: str) -> str | None:
    if not ctx.config.is_azure:
        return "MEDIA_STORAGE_BACKEND=local: media stays on local disk"
    failed = ctx.failed(*needs)
    return f"skipped: the {failed} check did not pass" if failed else None


def _claims(token: str) -> dict:
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}


def check_token(ctx: Context) -> Check:
    reason = _skip_reason(ctx)
    if reason:
        return Check("token", SKIP, reason)
    c = ctx.config
    if c.auth_mode == "connection_string":
        return Check("token", SKIP, "AZURE_AUTH_MODE=connection_string signs requests with the account key, no token")
    from ..storage.azure_auth import STORAGE_SCOPE, build_credential

    who = f"{c.auth_mode}" + (f" (client id {c.client_id})" if c.client_id else " (system-assigned)")
    try:
        token = build_credential(c).get_token(STORAGE_SCOPE)
    except Exception as e:  # azure-identity raises several types; all mean "no token"
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        hint = (
            "on the Azure VM, check that the user-assigned identity is attached and AZURE_CLIENT_ID is its "
            "client id; IMDS (169.254.169.254) must be allowed in the units' IPAddressAllow= drop-in"
            if c.auth_mode == "managed_identity"
            else "check AZURE_TENANT_ID, AZURE_CLIENT_ID and that the secret or certificate has not expired; "
            "login.microsoftonline.com must be reachable"
        )
        return Check("token", FAIL, f"no token for {who}: {first}", hint)
    expires = dt.datetime.fromtimestamp(token.expires_on, dt.UTC)
    minutes = (token.expires_on - time.time()) / 60
    claims = _claims(token.token)
    details = {
        "expires_at": expires.isoformat(timespec="seconds"),
        "expires_in_minutes": round(minutes, 1),
        "object_id": claims.get("oid"),
        "app_id": claims.get("appid") or claims.get("azp"),
        "audience": claims.get("aud"),
    }
    if minutes < 5:
        return Check(
            "token", WARN, f"token for {who} expires in {minutes:.1f} min", "check the host's clock (NTP)", details
        )
    return Check(
        "token", PASS, f"token for {who}, expires {details['expires_at']} (in {minutes:.0f} min)", details=details
    )


def _store(ctx: Context):
    if ctx.store is None:
        from ..storage.azure_blob import AzureBlobStore

        ctx.store = AzureBlobStore(ctx.config, pool_size=2)
    return ctx.store


def _http_hint(e: Exception) -> tuple[str, str]:
    from ..storage.azure_blob import _describe

    text = _describe(e)
    if "AuthorizationPermissionMismatch" in text or "AuthorizationFailure" in text:
        hint = (
            "assign 'Storage Blob Data Contributor' on the account or container to the identity "
            "(docs/azure-infrastructure.md), and check that the name resolves to the Private Endpoint"
        )
    elif "ContainerNotFound" in text:
        hint = (
            "create the container (az storage container create --auth-mode login ...), or fix "
            "AZURE_STORAGE_CONTAINER_NAME"
        )
    elif "AuthenticationFailed" in text:
        hint = "the token or key was refused: wrong tenant or account key, or a clock far off"
    else:
        hint = "see docs/operations.md (troubleshooting)"
    return text, hint


def check_container(ctx: Context) -> Check:
    reason = _skip_reason(ctx, "tcp", "tls", "token")
    if reason:
        return Check("container", SKIP, reason)
    name = ctx.config.container
    try:
        props = _store(ctx).container.get_container_properties()
    except Exception as e:
        text, hint = _http_hint(e)
        return Check("container", FAIL, f"container {name}: {text}", hint)
    access = props.public_access
    details = {"public_access": access, "last_modified": str(props.last_modified)}
    if access:
        return Check(
            "container",
            FAIL,
            f"container {name} allows anonymous read access ({access})",
            f"az storage container set-permission --name {name} --public-access off --auth-mode login; "
            "the stream server is the only way media leaves the container",
            details,
        )
    return Check("container", PASS, f"container {name} exists and is private", details=details)


def check_probe(ctx: Context) -> Check:
    reason = _skip_reason(ctx, "container")
    if reason:
        return Check("probe", SKIP, reason)
    name = f"{PROBE_PREFIX}{socket.gethostname()}-{uuid.uuid4().hex[:12]}.probe"
    data = os.urandom(1024)
    blob = _store(ctx).blob(name)
    step = "write"
    try:
        blob.upload_blob(data, overwrite=False)
        step = "read"
        back = blob.download_blob().readall()
        if back != data:
            return Check(
                "probe",
                FAIL,
                f"probe blob {name} read back different bytes",
                "something between the agent and Azure rewrites content (a proxy?)",
            )
        step = "delete"
        blob.delete_blob()
    except Exception as e:
        text, hint = _http_hint(e)
        left = f" (blob {name} may be left behind)" if step != "write" else ""
        return Check("probe", FAIL, f"probe {step} failed: {text}{left}", hint)
    return Check(
        "probe",
        PASS,
        f"wrote, read back and deleted a {len(data)}-byte blob under {PROBE_PREFIX}",
        details={"blob": name},
    )
