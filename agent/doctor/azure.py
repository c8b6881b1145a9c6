"""Checks that talk to Azure: a token for the configured identity, the container, a probe blob."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
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


_CODE_RE = re.compile(r"HTTP (\d{3}) ([A-Za-z]+)")
_REQUEST_ID_RE = re.compile(r"(?:RequestId:|request id )([0-9a-fA-F-]{36})")


def refusal(e: BaseException) -> tuple[int | None, str, str | None]:
    """(HTTP status, Azure error code, x-ms-request-id) of a refused request, as far as known: from
    the SDK's exception, or from the store's one-line message (a StoreUnavailable)."""
    from azure.core.exceptions import HttpResponseError

    for err in (e, e.__cause__):
        if isinstance(err, HttpResponseError) and err.status_code is not None:
            code = getattr(err.error_code, "value", err.error_code) or ""
            response = err.response
            rid = response.headers.get("x-ms-request-id") if response is not None else None
            if not code and response is not None:
                code = response.headers.get("x-ms-error-code") or ""
            return err.status_code, str(code), rid
    text = str(e)
    m = _CODE_RE.search(text)
    rid_m = _REQUEST_ID_RE.search(text)
    return (int(m.group(1)) if m else None), (m.group(2) if m else ""), (rid_m.group(1) if rid_m else None)


def _path(ctx: Context) -> str | None:
    dns = ctx.results.get("dns")
    return dns.details.get("path") if dns is not None else None  # type: ignore[return-value]


def firewall_hint(ctx: Context) -> str:
    """What to change when the storage firewall (network rules) refused this host, by its route."""
    account = ctx.config.account_name or "<account>"
    path = _path(ctx)
    if path == "service_endpoint":
        return (
            f"the storage firewall does not admit this VM's subnet: az storage account network-rule add "
            f"--account-name {account} -g <rg> --subnet <subnet id>, and give that subnet the Microsoft.Storage "
            "service endpoint (az network vnet subnet update ... --service-endpoints Microsoft.Storage); rules "
            "apply within minutes"
        )
    if path == "public_internet":
        return (
            f"the storage firewall does not admit this host's public IP: az storage account network-rule add "
            f"--account-name {account} -g <rg> --ip-address <this host's public IP>, or reach the account through "
            "its Private Endpoint over the VPN"
        )
    if path == "private_endpoint_bypassed":
        return (
            "this host reached the account's public endpoint because its DNS skips the private zone (see the dns "
            "check): make the name resolve to the Private Endpoint"
        )
    if path in ("private_endpoint", "private_address"):
        return (
            "requests through a Private Endpoint pass the storage firewall, so this one did not arrive through it: "
            "check that the endpoint's connection is Approved (az network private-endpoint-connection list --id "
            "<account id>) and that the address is this account's endpoint"
        )
    return (
        "the storage firewall (network rules) refused this host: allow its subnet (service endpoint) or IP, or "
        "reach the account through its Private Endpoint (docs/azure-infrastructure.md)"
    )


def rbac_hint(ctx: Context, writing: bool = False) -> str:
    token = ctx.results.get("token")
    oid = token.details.get("object_id") if token is not None else None
    who = f"--assignee-object-id {oid}" if oid else "--assignee-object-id <the identity's principal id>"
    container = ctx.config.container or "<container>"
    extra = " (Storage Blob Data Reader is not enough: the agent writes and deletes)" if writing else ""
    return (
        f"the identity lacks a data role{extra}: az role assignment create {who} --assignee-principal-type "
        f"ServicePrincipal --role 'Storage Blob Data Contributor' --scope <account id>/blobServices/default/"
        f"containers/{container}; assignments take up to 10 minutes to apply"
    )


def _http_hint(ctx: Context, e: Exception, writing: bool = False) -> tuple[str, str]:
    """The line doctor shows for a failed request (error code, request id) and the fix for that code."""
    from azure.core.exceptions import AzureError

    from ..storage.azure_blob import _describe

    text = _describe(e) if isinstance(e, AzureError) else str(e)
    # The store's own one-size hint in parentheses gives way to doctor's, which knows the route.
    from ..storage import azure_blob

    for store_hint in getattr(azure_blob, "_HINTS", {}).values():
        text = text.replace(f" ({store_hint})", "")
    status, code, rid = refusal(e)
    if rid and rid not in text:
        text = f"{text} [request id {rid}]"
    if code == "AuthorizationFailure":
        hint = firewall_hint(ctx)
    elif code == "AuthorizationPermissionMismatch":
        hint = rbac_hint(ctx, writing)
    elif code == "ContainerNotFound":
        hint = (
            f"create the container (az storage container create --account-name {ctx.config.account_name} "
            f"--name {ctx.config.container} --auth-mode login; az storage container-rm create when public "
            "access is off), or fix AZURE_STORAGE_CONTAINER_NAME"
        )
    elif "not supported in this version" in text:
        hint = "the request carried no x-ms-version that allows bearer tokens: an agent bug, please report it"
    elif code in ("AuthenticationFailed", "InvalidAuthenticationInfo"):
        hint = "the token or key was refused: wrong tenant or account key, or a clock far off (check NTP)"
    elif status == 403:
        hint = f"{firewall_hint(ctx)}; or, if the network is right, {rbac_hint(ctx, writing)}"
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
        text, hint = _http_hint(ctx, e)
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


def check_list(ctx: Context) -> Check:
    """List Blobs, one entry (maxresults=1), through the store's own listing: the request migrate,
    verify and reconcile send, which needs its own permission and its own headers."""
    reason = _skip_reason(ctx, "container")
    if reason:
        return Check("list", SKIP, reason)
    name = ctx.config.container
    entries = _store(ctx).list_entries(page_size=1)
    try:
        first = next(entries, None)
    except Exception as e:
        text, hint = _http_hint(ctx, e)
        return Check("list", FAIL, f"listing container {name} failed: {text}", hint)
    finally:
        entries.close()
    seen = "one blob" if first is not None else "no blobs yet"
    return Check(
        "list",
        PASS,
        f"List Blobs on {name} answered ({seen}): migrate, verify and reconcile can list the container",
        details={"first_blob": first[0] if first is not None else None},
    )


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
        text, hint = _http_hint(ctx, e, writing=step != "read")
        left = f" (blob {name} may be left behind)" if step != "write" else ""
        return Check("probe", FAIL, f"probe {step} failed: {text}{left}", hint)
    return Check(
        "probe",
        PASS,
        f"wrote, read back and deleted a {len(data)}-byte blob under {PROBE_PREFIX}",
        details={"blob": name},
    )
