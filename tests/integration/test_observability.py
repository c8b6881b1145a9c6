"""What an operator sees: sd_notify progress on a real notify socket, journal fields, no secrets."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from tests.support.media import make_content_addressed


def test_upload_sends_ready_status_and_stopping_to_systemd(harness, media_roots, tmp_path):
    for i in range(3):
        make_content_addressed(media_roots["audio"], 5000, "mp3", seed=300 + i)
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    try:
        proc = harness.cli("upload", "--no-watch", env={"NOTIFY_SOCKET": path})
        assert proc.returncode == 0, proc.stderr
        messages = []
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        sock.close()
    assert messages[0].startswith("READY=1")
    statuses = [m for m in messages if m.startswith("STATUS=uploaded")]
    assert statuses[-1].startswith("STATUS=uploaded 3,")
    assert messages[-1] == "STOPPING=1"


def test_journal_handler_sends_structured_fields(monkeypatch):
    from agent import logs

    sent = []
    handler = logs._JournalHandler()
    handler._send = lambda message, **fields: sent.append((message, fields))
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.journal")
    logger.addHandler(handler)
    try:
        logger.warning(
            "uploaded %s", "video/x.mp4", extra={"fields": {"blob_name": "video/x.mp4", "bytes": 12, "sha256": None}}
        )
    finally:
        logger.removeHandler(handler)
    message, fields = sent[0]
    assert message == "uploaded video/x.mp4"
    assert fields["BLOB_NAME"] == "video/x.mp4"
    assert fields["BYTES"] == "12"
    assert "SHA256" not in fields
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "gighive-media"


def test_secrets_stay_out_of_logs_status_and_argv(harness, media_roots, tmp_path, azurite):
    """The account key (in the connection string) and a MySQL password file's content never show up."""
    pw = tmp_path / "mysql-password"
    pw.write_text("Sup3r-Secret-Pw")
    pw.chmod(0o600)
    # MySQL is configured but unreachable: its error path is exercised too.
    harness.write_config(MYSQL_HOST="127.0.0.1", MYSQL_PORT="1", MYSQL_USER="gighive", MYSQL_PASSWORD_FILE=str(pw))
    make_content_addressed(media_roots["audio"], 5000, "mp3", seed=310)
    key = azurite.account_key
    outputs = []
    for args in (("upload", "--no-watch"), ("status",), ("status", "--json"), ("retry",), ("db-migrate",)):
        proc = harness.cli(*args)
        outputs.append(proc.stdout + proc.stderr)
    text = "\n".join(outputs)
    assert key not in text
    assert "Sup3r-Secret-Pw" not in text
    assert "AccountKey" not in text
    # The process is started with the config path only: no secret in argv.
    proc = harness.spawn("upload", "--idle-exit", "2")
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
    finally:
        proc.communicate(timeout=300)
    assert key not in cmdline and "Sup3r" not in cmdline
    # The state database is not world-readable territory for secrets either.
    for root, _dirs, files in os.walk(harness.state_dir):
        for f in files:
            data = Path(root, f).read_bytes()
            assert key.encode() not in data and b"Sup3r" not in data
