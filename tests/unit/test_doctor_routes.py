"""doctor's reading of the route to the account (pure logic: names, addresses, the VM's asset tag) and
the firewall fix it gives for each route. The resolver side is in tests/integration/test_doctor.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Config
from agent.doctor import PASS, WARN, Check, Context, network, private_networks
from agent.doctor.azure import firewall_hint

HOST = "acct.blob.core.windows.net"
PL = "acct.privatelink.blob.core.windows.net"
STAMP = "blob.ams23prdstr02a.store.core.windows.net"


@pytest.fixture
def azure_vm(tmp_path, monkeypatch):
    tag = tmp_path / "chassis_asset_tag"
    monkeypatch.setattr(network, "ASSET_TAG_FILE", tag)

    def set_(on: bool) -> None:
        tag.write_text(network.AZURE_ASSET_TAG + "\n" if on else "Default string\n")

    return set_


def config() -> Config:
    return Config(
        backend="azure_blob",
        roots=(),
        state_dir=Path("/var/lib/gighive-media-agent"),
        account_name="acct",
        container="media",
    )


def route(addrs, chain):
    nets, _ = private_networks(config())
    return network.classify(HOST, addrs, chain, nets)


@pytest.mark.parametrize(
    ("addrs", "chain", "vm", "path", "status"),
    [
        (["10.20.1.4"], [PL, HOST], False, "private_endpoint", PASS),
        (["10.20.1.4"], [HOST], False, "private_address", PASS),
        (["20.60.1.2"], [STAMP, PL, HOST], True, "private_endpoint_bypassed", WARN),
        (["20.60.1.2"], [STAMP, HOST], True, "service_endpoint", PASS),
        (["20.60.1.2"], [STAMP, HOST], False, "public_internet", WARN),
        # One public answer among private ones is still a public route.
        (["10.20.1.4", "20.60.1.2"], [PL, HOST], True, "private_endpoint_bypassed", WARN),
    ],
)
def test_routes(azure_vm, addrs, chain, vm, path, status):
    azure_vm(vm)
    r = route(addrs, chain)
    assert (r.path, r.status) == (path, status), r.reason
    assert r.details["path"] == path


def test_no_dmi_at_all_is_not_an_azure_vm(tmp_path, monkeypatch):
    monkeypatch.setattr(network, "ASSET_TAG_FILE", tmp_path / "absent")
    assert network.on_azure_vm() is False


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("service_endpoint", "--subnet"),
        ("public_internet", "--ip-address"),
        ("private_endpoint_bypassed", "DNS skips the private zone"),
        ("private_endpoint", "Approved"),
        (None, "Private Endpoint"),
    ],
)
def test_firewall_fix_fits_the_route(path, words):
    ctx = Context(config())
    if path is not None:
        ctx.results["dns"] = Check("dns", PASS, "", details={"path": path})
    assert words in firewall_hint(ctx)
