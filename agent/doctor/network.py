"""Checks of the configuration and of the path to the blob endpoint: DNS, TCP, TLS."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import FAIL, PASS, PRIVATE_RANGES_VARIABLE, SKIP, WARN, Check, Context, private_networks

PUBLIC_SUFFIX = ".blob.core.windows.net"
PRIVATELINK_SUFFIX = ".privatelink.blob.core.windows.net"
# Public DNS ends an account's CNAME chain at its storage stamp, blob.<stamp>.store.core.windows.net.
STAMP_SUFFIX = ".store.core.windows.net"
ASSET_TAG_FILE = Path("/sys/class/dmi/id/chassis_asset_tag")
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"


def check_config(ctx: Context) -> Check:
    c = ctx.config
    _nets, bad = private_networks(c)
    if bad:
        return Check(
            "config",
            FAIL,
            f"{PRIVATE_RANGES_VARIABLE}: {', '.join(bad)} is not a CIDR range",
            f"write networks such as 100.64.0.0/10, comma-separated, in {PRIVATE_RANGES_VARIABLE}",
        )
    where = str(c.source) if c.source else "the environment (no config file)"
    what = f"backend {c.backend}"
    if c.is_azure:
        what += f", account {c.account_name}, container {c.container}, auth {c.auth_mode}, endpoint {c.endpoint}"
    return Check("config", PASS, f"{where} is valid ({what})", details=c.summary())


def _not_azure(name: str, ctx: Context) -> Check | None:
    if not ctx.config.is_azure:
        return Check(name, SKIP, "MEDIA_STORAGE_BACKEND=local: media stays on local disk")
    return None


def _private(addr: str, nets) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    return any(ip in n for n in nets if n.version == ip.version)


def check_dns(ctx: Context) -> Check:
    skip = _not_azure("dns", ctx)
    if skip:
        return skip
    host = ctx.host or ""
    nets, _bad = private_networks(ctx.config)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        if literal.is_loopback:
            return Check("dns", PASS, f"endpoint is the loopback address {host} (an emulator or a local tunnel)")
        if _private(host, nets):
            return Check(
                "dns",
                WARN,
                f"endpoint is the bare address {host}: TLS cannot verify the account name",
                f"use https://{ctx.config.account_name}{PUBLIC_SUFFIX}",
            )
        return Check(
            "dns",
            FAIL,
            f"endpoint is the public address {host}",
            f"use https://{ctx.config.account_name}{PUBLIC_SUFFIX}, resolved through the private DNS zone",
        )
    if ".privatelink." in f".{host}":  # config.py refuses it too; kept for a hand-edited endpoint
        public = host.replace(".privatelink.", ".", 1)
        return Check(
            "dns",
            FAIL,
            f"{host} is the private DNS zone's record name, not the account's host name",
            f"use https://{public}: TLS certificates are issued for {public}, and the private "
            "DNS zone makes that name resolve to the Private Endpoint",
        )
    try:
        infos = socket.getaddrinfo(host, ctx.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return Check(
            "dns",
            FAIL,
            f"{host} does not resolve: {e.strerror}",
            "check /etc/resolv.conf: on a P2S VPN client it must use the DNS Private Resolver's "
            "inbound endpoint; on the Azure VM, Azure DNS (168.63.129.16) with the private DNS zone "
            "privatelink.blob.core.windows.net linked to the VNet",
        )
    addrs = sorted({str(i[4][0]) for i in infos})
    details: dict[str, object] = {"host": host, "addresses": addrs}
    chain: list[str] = []
    try:
        # The CNAME chain as the system resolver followed it: the final name, then the names on the way.
        canonical, aliases, _ = socket.gethostbyname_ex(host)
        details["canonical_name"] = canonical
        details["aliases"] = aliases
        chain = [n.lower().rstrip(".") for n in (canonical, *aliases)]
    except OSError:
        pass
    route = classify(host, addrs, chain, nets)
    details.update(route.details)
    return Check("dns", route.status, route.reason, route.hint, details)


@dataclass
class Route:
    """How this host reaches the account, read from DNS: the answer the dns check gives."""

    path: str
    status: str
    reason: str
    hint: str | None = None
    details: dict[str, object] = field(default_factory=dict)


def on_azure_vm() -> bool:
    """Whether this host is an Azure VM: Azure sets this chassis asset tag (cloud-init reads it too)."""
    try:
        return ASSET_TAG_FILE.read_text().strip() == AZURE_ASSET_TAG
    except OSError:
        return False


def classify(host: str, addrs: list[str], chain: list[str], nets) -> Route:
    """Private Endpoint, service endpoint (or other public route), from the names and addresses.

    Public DNS answers <account>.blob.core.windows.net with a CNAME to
    <account>.privatelink.blob.core.windows.net as soon as the account has a Private Endpoint; a DNS
    that holds the private zone answers that name with the endpoint's private address, public DNS
    goes on to the storage stamp blob.<stamp>.store.core.windows.net and its public address. Without
    a Private Endpoint the chain goes straight to the stamp. A service endpoint is a property of the
    VM's subnet and invisible in DNS: it uses the public name and address, and only the route (Azure's
    backbone) and the source the firewall sees (the subnet) differ."""
    privatelink = next((n for n in chain if n.endswith(PRIVATELINK_SUFFIX)), None)
    stamp = next((n for n in chain if n.endswith(STAMP_SUFFIX)), None)
    public = [a for a in addrs if not (_private(a, nets) or ipaddress.ip_address(a.split("%")[0]).is_loopback)]
    azure_vm = on_azure_vm()
    details: dict[str, object] = {"privatelink_name": privatelink, "storage_stamp": stamp, "azure_vm": azure_vm}
    shown = ", ".join(addrs)
    if not public:
        if privatelink:
            return Route(
                "private_endpoint",
                PASS,
                f"Private Endpoint: {host} -> {privatelink} -> {shown} (private). Media travels inside the VNet "
                "(or the VPN) and the account can stay closed to the internet",
                details={**details, "path": "private_endpoint"},
            )
        return Route(
            "private_address",
            PASS,
            f"{host} resolves to {shown} (private) without the privatelink name on the way (a hosts entry or "
            "a custom DNS record?): fine while that address is the account's Private Endpoint",
            details={**details, "path": "private_address"},
        )
    if privatelink:
        return Route(
            "private_endpoint_bypassed",
            WARN,
            f"the account has a Private Endpoint ({privatelink}), but this host's DNS answers its public address "
            f"{', '.join(public)}: requests go to the public endpoint instead (through a service endpoint if this "
            "VM's subnet has one, else over the internet), and a firewall open only to the Private Endpoint "
            "refuses them (403 AuthorizationFailure)",
            "to use the Private Endpoint, link the private DNS zone privatelink.blob.core.windows.net to this "
            "host's VNet (Azure VM), or make a P2S client use the DNS Private Resolver's inbound endpoint "
            "(docs/azure-infrastructure.md); other private ranges go in " + PRIVATE_RANGES_VARIABLE,
            {**details, "path": "private_endpoint_bypassed"},
        )
    via = f" (storage stamp {stamp})" if stamp else ""
    if azure_vm:
        return Route(
            "service_endpoint",
            PASS,
            f"no Private Endpoint: {host} resolves to the public address {', '.join(public)}{via}, and this is an "
            "Azure VM, so this is the service-endpoint set-up GigHive's Terraform builds: with a Microsoft.Storage "
            "service endpoint on this VM's subnet, traffic stays on Azure's backbone and the storage firewall "
            "admits the subnet. The container and list checks show whether it admits this host",
            details={**details, "path": "service_endpoint"},
        )
    return Route(
        "public_internet",
        WARN,
        f"no Private Endpoint: {host} resolves to the public address {', '.join(public)}{via}, and this host is "
        "not an Azure VM: media crosses the internet (TLS-encrypted) to the account's public endpoint, whose "
        "firewall must allow this host's public IP",
        "to keep media off the internet, reach the account through a Private Endpoint over the VPN "
        f"(docs/azure-infrastructure.md); if the account has one, addresses outside RFC 1918 go in "
        f"{PRIVATE_RANGES_VARIABLE}",
        {**details, "path": "public_internet"},
    )


def check_tcp(ctx: Context) -> Check:
    skip = _not_azure("tcp", ctx)
    if skip:
        return skip
    if ctx.failed("dns"):
        return Check("tcp", SKIP, "skipped: the DNS check did not pass")
    host, port = ctx.host or "", ctx.port
    dns = ctx.results.get("dns")
    public = dns is not None and dns.details.get("path") in ("service_endpoint", "public_internet")
    where = (
        "outbound HTTPS from this host (an NSG or firewall rule) or the units' IPAddressAllow= drop-in "
        "(the role writes it; a public address must be in it too)"
        if public
        else "the VPN, the Private Endpoint's network security group, or the units' IPAddressAllow= drop-in "
        "(the role writes it)"
    )
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=ctx.timeout) as s:
            peer = s.getpeername()[0]
    except TimeoutError:
        return Check("tcp", FAIL, f"connecting to {host}:{port} timed out after {ctx.timeout:g} s", f"check {where}")
    except OSError as e:
        return Check("tcp", FAIL, f"cannot connect to {host}:{port}: {e.strerror or e}", f"check {where}")
    ms = (time.monotonic() - started) * 1000
    return Check(
        "tcp",
        PASS,
        f"connected to {host}:{port} ({peer}) in {ms:.0f} ms",
        details={"address": peer, "port": port, "connect_ms": round(ms, 1)},
    )


def check_tls(ctx: Context) -> Check:
    skip = _not_azure("tls", ctx)
    if skip:
        return skip
    if ctx.scheme != "https":
        return Check("tls", SKIP, "plain http to a loopback emulator: no TLS to verify")
    if ctx.failed("tcp"):
        return Check("tls", SKIP, "skipped: the TCP check did not pass")
    host, port = ctx.host or "", ctx.port
    ca = ctx.config.ca_bundle
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    try:
        with (
            socket.create_connection((host, port), timeout=ctx.timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as s,
        ):
            cert = s.getpeercert() or {}
            version = s.version()
    except ssl.SSLCertVerificationError as e:
        return Check(
            "tls",
            FAIL,
            f"the certificate of {host} does not verify: {e.verify_message}",
            "a name mismatch means the endpoint uses another name than the certificate's "
            "(never the privatelink. name); an unknown issuer means a TLS-inspecting proxy or a "
            "test CA: name its CA file in AZURE_CA_BUNDLE",
        )
    except (OSError, ssl.SSLError) as e:
        return Check(
            "tls",
            FAIL,
            f"TLS handshake with {host}:{port} failed: {e}",
            "check that the address is the storage account's Private Endpoint",
        )
    not_after = cert.get("notAfter")
    details = {
        "version": version,
        "subject": _name(cert.get("subject")),
        "issuer": _name(cert.get("issuer")),
        "not_after": not_after,
    }
    if not_after:
        days = (ssl.cert_time_to_seconds(not_after) - time.time()) / 86400
        details["days_left"] = round(days, 1)
        if days < 5:
            return Check(
                "tls",
                WARN,
                f"the certificate of {host} verifies but expires in {days:.0f} days",
                "Azure renews its certificates itself; for a proxy or emulator, renew it",
                details,
            )
    return Check(
        "tls", PASS, f"{version}, certificate verifies for {host} (issuer {details['issuer']})", details=details
    )


def _name(rdns) -> str | None:
    if not rdns:
        return None
    parts = [f"{k}={v}" for rdn in rdns for k, v in rdn]
    return ", ".join(parts)
