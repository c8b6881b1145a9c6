"""`gighive-media doctor` against real Azurite, MariaDB and a loopback token endpoint.

The DNS check is tested with resolver answers the test controls: the CLI runs in its own mount
namespace (unshare -m) where a test-written file is bind-mounted over /etc/hosts, so glibc's real
resolver returns the test's address for <account>.blob.core.windows.net (needs root, as CI has).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from azure.storage.blob import BlobServiceClient, PublicAccess

from tests.integration.agent_harness import REPO, Harness, connection_string_settings

ACCOUNT = "gighivedoctest"


def statuses(report: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


@pytest.fixture
def harness(tmp_path, media_roots, azurite, blob_container) -> Harness:
    h = Harness(tmp_path, media_roots)
    h.settings = connection_string_settings(
        azurite.connection_string, blob_container.container_name, media_roots, h.state_dir
    )
    h.state_dir.mkdir()
    h.write_config()
    return h


def test_all_checks_pass_against_azurite(harness):
    proc = harness.cli("doctor", "--json")
    report = json.loads(proc.stdout)
    got = statuses(report)
    assert got["config"] == got["dns"] == got["tcp"] == got["container"] == got["probe"] == "PASS", report
    # The listing migrate, verify and reconcile depend on is exercised too.
    assert got["list"] == "PASS", report
    assert got["media_roots"] == got["state_dir"] == "PASS", report
    # http to a loopback emulator: no TLS; the dev key: no token; no MySQL; no units on this host
    assert got["tls"] == got["token"] == got["mysql"] == "SKIP"
    assert report["result"] == "PASS" and proc.returncode == 0, proc.stderr
    assert check(report, "probe")["details"]["blob"].startswith("gighive-media-doctor/")


def test_probe_blob_is_deleted(harness, blob_container):
    assert harness.cli("doctor").returncode == 0
    assert not list(blob_container.list_blobs(name_starts_with="gighive-media-doctor/"))


def test_human_output_has_a_line_per_check_and_a_fix_hint(harness):
    harness.write_config(AZURE_STORAGE_CONTAINER_NAME="doesnotexist")
    proc = harness.cli("doctor")
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert any(line.startswith("FAIL  container") for line in lines), proc.stdout
    assert any("fix: create the container" in line for line in lines), proc.stdout
    assert lines[-1].startswith("result: FAIL")


def test_missing_container_fails_and_skips_the_probe(harness):
    harness.write_config(AZURE_STORAGE_CONTAINER_NAME="doesnotexist")
    report = harness.cli_json("doctor")
    assert statuses(report)["container"] == "FAIL"
    assert "ContainerNotFound" in check(report, "container")["reason"]
    assert statuses(report)["probe"] == "SKIP"
    assert report["exit_code"] == 2


def test_public_container_fails(harness, azurite):
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    name = f"pub-{uuid.uuid4().hex[:12]}"
    service.create_container(name, public_access=PublicAccess.BLOB)
    try:
        harness.write_config(AZURE_STORAGE_CONTAINER_NAME=name)
        report = harness.cli_json("doctor")
        assert statuses(report)["container"] == "FAIL"
        assert "anonymous" in check(report, "container")["reason"]
    finally:
        service.delete_container(name)


def test_invalid_config_exits_78_naming_each_variable(harness):
    harness.write_config(MEDIA_STORAGE_BACKEND="s3", UPLOAD_BLOCK_SIZE="1KiB")
    proc = harness.cli("doctor")
    assert proc.returncode == 78
    assert "FAIL  config" in proc.stdout
    report = harness.cli_json("doctor")
    assert report["exit_code"] == 78 and statuses(report) == {"config": "FAIL"}
    assert "MEDIA_STORAGE_BACKEND" in proc.stdout and "UPLOAD_BLOCK_SIZE" in proc.stdout


def test_bad_private_range_is_a_config_failure(harness):
    harness.write_config(DOCTOR_PRIVATE_RANGES="10.0.0.0/8,not-a-net")
    report = harness.cli_json("doctor")
    assert statuses(report)["config"] == "FAIL"
    assert "not-a-net" in check(report, "config")["reason"]


def test_missing_media_root_fails(harness, tmp_path):
    harness.write_config(MEDIA_ROOTS=f"audio={tmp_path}/nope")
    report = harness.cli_json("doctor")
    assert statuses(report)["media_roots"] == "FAIL"
    assert "does not exist" in check(report, "media_roots")["reason"]


def test_backend_local_skips_azure_checks(harness):
    harness.write_config(MEDIA_STORAGE_BACKEND="local")
    proc = harness.cli("doctor", "--json")
    report = json.loads(proc.stdout)
    got = statuses(report)
    assert {got[n] for n in ("dns", "tcp", "tls", "token", "container", "probe")} == {"SKIP"}
    assert proc.returncode == 0


def test_mysql_table_missing_then_present(harness, media_db, tmp_path):
    harness.write_config(
        MYSQL_HOST=media_db.host,
        MYSQL_PORT=str(media_db.port),
        MYSQL_DATABASE=media_db.database,
        MYSQL_USER=media_db.user,
        MYSQL_PASSWORD_FILE=str(media_db.password_file(tmp_path / "mysql-password")),
    )
    report = harness.cli_json("doctor")
    assert statuses(report)["mysql"] == "FAIL"
    assert "db-migrate" in check(report, "mysql")["hint"]
    harness.cli("db-migrate", check=True)
    assert statuses(harness.cli_json("doctor"))["mysql"] == "PASS"


def test_mysql_unreachable_fails(harness, tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0o600)
    harness.write_config(
        MYSQL_HOST="127.0.0.1",
        MYSQL_PORT="1",
        MYSQL_USER="u",
        MYSQL_PASSWORD_FILE=str(secret),
        MYSQL_CONNECT_TIMEOUT="1",
    )
    assert statuses(harness.cli_json("doctor"))["mysql"] == "FAIL"


# ---- identity and TLS, against Azurite over HTTPS with --oauth basic ---------------------------------------


@pytest.fixture
def oauth_harness(tmp_path, media_roots, azurite_oauth, tls):
    name = f"doc-{uuid.uuid4().hex[:12]}"
    BlobServiceClient.from_connection_string(
        azurite_oauth.connection_string, connection_verify=str(tls.ca)
    ).create_container(name)
    h = Harness(tmp_path, media_roots)
    h.state_dir.mkdir()
    h.settings = {
        "MEDIA_STORAGE_BACKEND": "azure_blob",
        "AZURE_STORAGE_ACCOUNT_NAME": "devstoreaccount1",
        "AZURE_STORAGE_CONTAINER_NAME": name,
        "AZURE_BLOB_ENDPOINT": azurite_oauth.blob_endpoint,
        "AZURE_CA_BUNDLE": str(tls.ca),
        "AZURE_AUTH_MODE": "managed_identity",
        "AZURE_CLIENT_ID": str(uuid.uuid4()),
        "MEDIA_ROOTS": f"audio={media_roots['audio']},video={media_roots['video']}",
        "GIGHIVE_MEDIA_STATE_DIR": str(h.state_dir),
    }
    h.write_config()
    return h


def test_managed_identity_token_tls_and_probe_pass(oauth_harness, token_server):
    env = {"AZURE_POD_IDENTITY_AUTHORITY_HOST": token_server.url}
    proc = oauth_harness.cli("doctor", "--json", env=env)
    report = json.loads(proc.stdout)
    got = statuses(report)
    assert got["tls"] == got["token"] == got["container"] == got["probe"] == "PASS", report
    # The listing with a bearer token: the request Azure refuses without a recent x-ms-version.
    assert got["list"] == "PASS", report
    token = check(report, "token")
    assert token["details"]["expires_in_minutes"] > 30
    assert "expires" in token["reason"]
    assert proc.returncode == 0


def test_token_endpoint_failure_fails_the_token_check(oauth_harness, token_server):
    token_server.fail_next(100, status=500)
    oauth_harness.write_config(AZURE_CREDENTIAL_RETRY_TIMEOUT="3")
    env = {"AZURE_POD_IDENTITY_AUTHORITY_HOST": token_server.url}
    report = oauth_harness.cli_json("doctor", env=env)
    assert statuses(report)["token"] == "FAIL"
    assert statuses(report)["container"] == "SKIP"
    assert "IMDS" in check(report, "token")["reason"]


def test_tls_without_the_ca_fails_verification(oauth_harness, token_server):
    oauth_harness.write_config(AZURE_CA_BUNDLE="")
    env = {"AZURE_POD_IDENTITY_AUTHORITY_HOST": token_server.url}
    report = oauth_harness.cli_json("doctor", env=env)
    tls_check = check(report, "tls")
    assert tls_check["status"] == "FAIL"
    assert "does not verify" in tls_check["reason"]
    assert "AZURE_CA_BUNDLE" in tls_check["hint"]


# ---- DNS: resolver answers controlled by the test ------------------------------------------------------------


def doctor_with_hosts(h: Harness, hosts_line: str, azure_vm: bool = False) -> dict:
    """doctor with /etc/hosts and the DMI chassis asset tag (how doctor knows an Azure VM) of the test's
    choosing: lines "<address> <canonical name> <alias>..." give the resolver the CNAME chain a DNS
    server would (the first name is the end of the chain)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give the CLI its own /etc/hosts")
    hosts = h.tmp / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{hosts_line}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "UPLOAD_"))}
    tag = "7783-7084-3265-9085-8269-3286-77" if azure_vm else ""
    script = (
        'mount --bind "$1" /etc/hosts && mount -t tmpfs none /sys/class && mkdir -p /sys/class/dmi/id && '
        'if [ -n "$2" ]; then echo "$2" > /sys/class/dmi/id/chassis_asset_tag; fi && shift 2 && exec "$@"'
    )
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(hosts),
            tag,
            sys.executable,
            "-m",
            "agent",
            "--config",
            str(h.config_path),
            "doctor",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def dns_harness(harness):
    # The real account host name; connections go nowhere (the checks after DNS are not the point here).
    harness.write_config(
        AZURE_AUTH_MODE="managed_identity",
        AZURE_STORAGE_CONNECTION_STRING="",
        AZURE_STORAGE_ACCOUNT_NAME=ACCOUNT,
        AZURE_NETWORK_TIMEOUT="1",
        AZURE_CREDENTIAL_TIMEOUT="1",
        AZURE_CREDENTIAL_RETRY_TIMEOUT="2",
    )
    return harness


HOST = f"{ACCOUNT}.blob.core.windows.net"
PRIVATELINK = f"{ACCOUNT}.privatelink.blob.core.windows.net"
STAMP = "blob.ams23prdstr02a.store.core.windows.net"


def test_dns_private_address_passes(dns_harness):
    report = doctor_with_hosts(dns_harness, f"10.20.1.4 {HOST}")
    dns = check(report, "dns")
    assert dns["status"] == "PASS", dns
    assert dns["details"]["addresses"] == ["10.20.1.4"]
    assert dns["details"]["path"] == "private_address"


def test_private_endpoint_is_recognised_by_its_privatelink_name_and_private_address(dns_harness):
    report = doctor_with_hosts(dns_harness, f"10.20.1.4 {PRIVATELINK} {HOST}")
    dns = check(report, "dns")
    assert dns["status"] == "PASS", dns
    assert dns["details"]["path"] == "private_endpoint"
    assert dns["details"]["privatelink_name"] == PRIVATELINK
    assert dns["reason"].startswith("Private Endpoint:") and "10.20.1.4" in dns["reason"]


def test_service_endpoint_on_an_azure_vm_passes_and_says_so(dns_harness):
    """GigHive's own Terraform: no Private Endpoint, a Microsoft.Storage service endpoint on the VM's
    subnet; the name resolves straight to the storage stamp's public address. Not a failure."""
    report = doctor_with_hosts(dns_harness, f"20.60.1.2 {STAMP} {HOST}", azure_vm=True)
    dns = check(report, "dns")
    assert dns["status"] == "PASS", dns
    assert dns["details"]["path"] == "service_endpoint"
    assert dns["details"]["storage_stamp"] == STAMP and dns["details"]["azure_vm"] is True
    assert "service endpoint" in dns["reason"] and "20.60.1.2" in dns["reason"]
    # The route is public and legitimate: the network checks go on (and decide) instead of being skipped.
    assert check(report, "tcp")["status"] != "SKIP"
    assert "skipped" not in check(report, "tcp")["reason"]


def test_public_address_off_azure_warns_in_plain_words(dns_harness):
    report = doctor_with_hosts(dns_harness, f"203.0.113.7 {STAMP} {HOST}", azure_vm=False)
    dns = check(report, "dns")
    assert dns["status"] == "WARN", dns
    assert dns["details"]["path"] == "public_internet"
    assert "not an Azure VM" in dns["reason"] and "internet" in dns["reason"]
    assert "Private Endpoint" in dns["hint"]
    assert check(report, "tcp")["status"] != "SKIP"


def test_private_endpoint_that_this_hosts_dns_bypasses_warns(dns_harness):
    """The account has a Private Endpoint (the CNAME to privatelink is there) but this host's DNS has no
    private zone, so it gets the public address: requests would go to the public endpoint."""
    report = doctor_with_hosts(dns_harness, f"20.60.1.2 {STAMP} {PRIVATELINK} {HOST}", azure_vm=True)
    dns = check(report, "dns")
    assert dns["status"] == "WARN", dns
    assert dns["details"]["path"] == "private_endpoint_bypassed"
    assert "AuthorizationFailure" in dns["reason"]
    assert "privatelink.blob.core.windows.net" in dns["hint"]


def test_dns_configured_extra_range_passes(dns_harness):
    dns_harness.write_config(DOCTOR_PRIVATE_RANGES="100.64.0.0/10")
    report = doctor_with_hosts(dns_harness, f"100.64.3.4 {HOST}")
    assert check(report, "dns")["status"] == "PASS"


def test_dns_name_that_does_not_resolve_fails(dns_harness):
    report = doctor_with_hosts(dns_harness, "10.0.0.1 someoneelse.example")
    dns = check(report, "dns")
    assert dns["status"] == "FAIL" and "does not resolve" in dns["reason"]


def test_privatelink_endpoint_is_refused(dns_harness):
    dns_harness.write_config(AZURE_BLOB_ENDPOINT=f"https://{ACCOUNT}.privatelink.blob.core.windows.net")
    proc = dns_harness.cli("doctor")
    assert proc.returncode == 78
    assert "privatelink" in proc.stdout and "AZURE_BLOB_ENDPOINT" in proc.stdout


# ---- refusals as Azure sends them (a loopback endpoint answering Azure's exact errors) ----------------------


@pytest.fixture
def refusing(tmp_path, media_roots):
    from tests.support.azure_refusals import RefusingBlobEndpoint

    stub = RefusingBlobEndpoint().start()
    h = Harness(tmp_path, media_roots)
    h.state_dir.mkdir()
    h.settings = connection_string_settings(stub.connection_string, "media", media_roots, h.state_dir)
    h.write_config()
    yield h, stub
    stub.stop()


def test_firewall_refusal_is_reported_with_its_code_request_id_and_fix(refusing):
    h, stub = refusing
    stub.answers["container_properties"] = "AuthorizationFailure"
    report = h.cli_json("doctor")
    container = check(report, "container")
    assert container["status"] == "FAIL", container
    rid = next(s.request_id for s in stub.seen if s.op == "container_properties")
    assert "403" in container["reason"] and "AuthorizationFailure" in container["reason"]
    assert rid in container["reason"]
    assert "firewall" in container["hint"]
    assert "role assignment" not in container["hint"], "a firewall refusal is not an RBAC problem"
    assert statuses(report)["list"] == statuses(report)["probe"] == "SKIP"
    assert report["exit_code"] == 2


def test_rbac_gap_is_reported_with_the_role_to_assign(refusing):
    h, stub = refusing
    stub.answers["container_properties"] = "AuthorizationPermissionMismatch"
    report = h.cli_json("doctor")
    container = check(report, "container")
    assert container["status"] == "FAIL"
    assert "AuthorizationPermissionMismatch" in container["reason"]
    assert "Storage Blob Data Contributor" in container["hint"] and "az role assignment create" in container["hint"]
    assert "firewall" not in container["hint"]


def test_missing_container_as_azure_says_it(refusing):
    h, stub = refusing
    stub.answers["container_properties"] = "ContainerNotFound"
    report = h.cli_json("doctor")
    container = check(report, "container")
    assert container["status"] == "FAIL" and "404" in container["reason"] and "ContainerNotFound" in container["reason"]
    assert container["hint"].startswith("create the container") and "AZURE_STORAGE_CONTAINER_NAME" in container["hint"]


def test_a_refused_listing_fails_doctor_although_the_container_answers(refusing):
    """Listing is what migrate, verify and reconcile need; doctor must send it (List Blobs with
    maxresults=1), not only Get Container Properties, or a listing problem passes."""
    h, stub = refusing
    stub.answers["list"] = "AuthorizationPermissionMismatch"
    report = h.cli_json("doctor")
    got = statuses(report)
    assert got["container"] == "PASS", report
    listing = check(report, "list")
    assert listing["status"] == "FAIL", listing
    assert "AuthorizationPermissionMismatch" in listing["reason"]
    assert "Storage Blob Data Contributor" in listing["hint"]
    lists = [s for s in stub.seen if s.op == "list"]
    assert lists and lists[0].query.get("maxresults") == "1" and lists[0].method == "GET"
    assert report["exit_code"] == 2


def test_a_listing_that_answers_passes_and_a_read_only_role_fails_the_probe(refusing):
    h, stub = refusing
    report = h.cli_json("doctor")
    got = statuses(report)
    assert got["container"] == got["list"] == "PASS", report
    probe = check(report, "probe")
    assert probe["status"] == "FAIL" and "AuthorizationPermissionMismatch" in probe["reason"]
    assert "Reader is not enough" in probe["hint"]
