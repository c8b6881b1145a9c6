"""`gighive-media doctor`: the Phase 0 verification steps, automated.

Each check is a function `check(ctx) -> Check` in one of the modules here, grouped by what it
looks at: `network` (DNS and the route it implies, TCP, TLS), `azure` (token, container, a
listing, probe blob), `host` (media roots, state directory, MySQL, units). A check says PASS,
WARN, FAIL or SKIP, why, and what to do.

Exit code: the worst result, in the Nagios plugin convention so a monitoring system can run it
as is: 0 every check passed (or was skipped), 1 a WARN and no FAIL, 2 at least one FAIL.
78 (EX_CONFIG) means the configuration itself is invalid, and nothing else was checked.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..config import Config

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
_RANK = {SKIP: 0, PASS: 0, WARN: 1, FAIL: 2}
EXIT_CODES = {PASS: 0, SKIP: 0, WARN: 1, FAIL: 2}

# RFC 1918, plus the IPv6 unique local range Azure Private Endpoints can also use.
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
PRIVATE_RANGES_VARIABLE = "DOCTOR_PRIVATE_RANGES"


@dataclass
class Check:
    name: str
    status: str
    reason: str
    hint: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "hint": self.hint,
            "details": self.details,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Context:
    """What the checks share: the config, the endpoint's parts, and earlier results."""

    config: Config
    results: dict[str, Check] = field(default_factory=dict)
    store: Any = None  # AzureBlobStore, built by the first check that needs it

    @property
    def endpoint(self) -> str | None:
        return self.config.endpoint

    @property
    def host(self) -> str | None:
        if not self.endpoint:
            return None
        return (urlsplit(self.endpoint).hostname or "").lower() or None

    @property
    def port(self) -> int:
        parts = urlsplit(self.endpoint or "")
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def scheme(self) -> str:
        return urlsplit(self.endpoint or "").scheme

    @property
    def timeout(self) -> float:
        # Preflight must not hang for the upload's long timeouts.
        return min(self.config.network_timeout, 10.0)

    def failed(self, *names: str) -> str | None:
        """The first of `names` that failed, or was skipped because something before it failed
        (a check skipped as not applicable, e.g. no token with an account key, does not count)."""
        for name in names:
            r = self.results.get(name)
            if r is not None and (r.status == FAIL or (r.status == SKIP and r.reason.startswith("skipped:"))):
                return name
        return None


def private_networks(config: Config) -> tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], list[str]]:
    """RFC 1918 + fc00::/7 + DOCTOR_PRIVATE_RANGES (comma-separated CIDRs); also the bad entries."""
    nets: list[Any] = list(PRIVATE_NETWORKS)
    bad: list[str] = []
    for item in (config.values.get(PRIVATE_RANGES_VARIABLE) or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            bad.append(item)
    return nets, bad


def _checks() -> list[Callable[[Context], Check]]:
    from . import azure, host, network

    return [
        network.check_config,
        network.check_dns,
        network.check_tcp,
        network.check_tls,
        azure.check_token,
        azure.check_container,
        azure.check_list,
        azure.check_probe,
        host.check_media_roots,
        host.check_state_dir,
        host.check_mysql,
        host.check_units,
    ]


def run_checks(config: Config) -> list[Check]:
    ctx = Context(config)
    for fn in _checks():
        started = time.monotonic()
        try:
            result = fn(ctx)
        except Exception as e:  # a check that crashes is a FAIL, never a traceback for the operator
            name = fn.__name__.removeprefix("check_")
            result = Check(
                name,
                FAIL,
                f"the check itself failed: {type(e).__name__}: {str(e)[:300]}",
                "report this as a bug, with the output of --log-level debug",
            )
        result.seconds = time.monotonic() - started
        ctx.results[result.name] = result
    return list(ctx.results.values())


def worst(checks: list[Check]) -> str:
    status = PASS
    for c in checks:
        if _RANK[c.status] > _RANK[status]:
            status = c.status
    return status


def render(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=8)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.reason}")
        if c.hint and c.status in (WARN, FAIL):
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.hint}")
    w = worst(checks)
    counts = {s: sum(1 for c in checks if c.status == s) for s in (PASS, WARN, FAIL, SKIP)}
    lines.append(f"result: {w} ({counts[PASS]} pass, {counts[WARN]} warn, {counts[FAIL]} fail, {counts[SKIP]} skipped)")
    return "\n".join(lines)
