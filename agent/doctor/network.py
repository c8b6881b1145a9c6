"""Checks of the configuration and of the path to the blob endpoint: DNS, TCP, TLS."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time

from . import FAIL, PASS, PRIVATE_RANGES_VARIABLE, SKIP, WARN, Check, Context, private_networks

PUBLIC_SUFFIX = ".blob.core.windows.net"


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
    try:
        canonical, aliases, _ = socket.gethostbyname_ex(host)
        details["canonical_name"] = canonical
        details["aliases"] = aliases
    except OSError:
        pass
    public = [a for a in addrs if not (_private(a, nets) or ipaddress.ip_address(a.split("%")[0]).is_loopback)]
    if public:
        return Check(
            "dns",
            FAIL,
            f"{host} resolves to {', '.join(public)}, a public address: traffic would bypass the "
            "Private Endpoint (and a storage account without public access answers 403 AuthorizationFailure)",
            "create the private DNS zone privatelink.blob.core.windows.net with the Private Endpoint's "
            "A record and link it to the VNet; a host outside the VNet (P2S VPN) must use the DNS "
            f"Private Resolver's inbound endpoint as its DNS server; extra private ranges go in "
            f"{PRIVATE_RANGES_VARIABLE}",
            details,
        )
    return Check("dns", PASS, f"{host} resolves to {', '.join(addrs)} (private)", details=details)


def check_tcp(ctx: Context) -> Check:
    skip = _not_azure("tcp", ctx)
    if skip:
        return skip
    if ctx.failed("dns"):
        return Check("tcp", SKIP, "skipped: the DNS check did not pass")
    host, port = ctx.host or "", ctx.port
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=ctx.timeout) as s:
            peer = s.getpeername()[0]
    except TimeoutError:
        return Check(
            "tcp",
            FAIL,
            f"connecting to {host}:{port} timed out after {ctx.timeout:g} s",
            "the VPN or the Private Endpoint's network security group may be down, or the units' "
            "IPAddressAllow= drop-in lacks this address (the role writes it)",
        )
    except OSError as e:
        return Check(
            "tcp",
            FAIL,
            f"cannot connect to {host}:{port}: {e.strerror or e}",
            "check the VPN connection and the Private Endpoint",
        )
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
