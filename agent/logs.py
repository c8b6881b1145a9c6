"""Logging: journald with structured fields under systemd, plain stderr otherwise.

Call sites pass fields with `extra={"fields": {...}}`; the journal gets them as their own
fields (BLOB_NAME=, SHA256=, BYTES=, ...) so `journalctl BLOB_NAME=video/<sha>.mp4` finds one
file's history, and a terminal shows them as key=value after the message.
"""

from __future__ import annotations

import logging
import os
import sys

IDENTIFIER = "gighive-media"


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return text


class _JournalHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        from systemd import journal

        self._send = journal.send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            fields = {k.upper(): str(v) for k, v in (getattr(record, "fields", None) or {}).items() if v is not None}
            self._send(
                message,
                PRIORITY=str(_priority(record.levelno)),
                SYSLOG_IDENTIFIER=IDENTIFIER,
                LOGGER=record.name,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,  # journal.send formats it with {:d}
                CODE_FUNC=record.funcName,
                **fields,
            )
        except Exception:
            self.handleError(record)


def _priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def setup(level: str = "info", force_stderr: bool = False) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if under_journald() and not force_stderr:
        try:
            handler = _JournalHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_KeyValueFormatter("%(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_KeyValueFormatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The SDK logs every request at INFO with headers; that is noise and, for some headers,
    # more than an operator's journal should hold.
    for noisy in ("azure", "urllib3", "msal"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # azure-identity warns once per failed token attempt; the agent reports the outcome itself.
    logging.getLogger("azure.identity").setLevel(logging.ERROR)
