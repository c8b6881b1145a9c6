"""The stream server's fixtures for the fault suite, shared with tests/stream instead of copied.

tests/faults has no conftest of its own for these (and fixtures in tests/stream/conftest.py are
not visible from here), so test modules take them with a star import (pytest finds fixtures by name in the module, and
a named import would be shadowed by the test's own parameter of the same name):
    from .stream_fixtures import *  # noqa: F403
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.stream.conftest import (  # noqa: F401 - re-exported
    MediaItem,
    MediaLibrary,
    _library,
    fresh_library,
    library,
    nginx_in_front,
    populate,
    server,
    start_server,
)

# What a star import brings in: the fixtures only.
__all__ = ["fresh_library", "library", "server", "start_server"]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of a live process, from /proc/<pid>/status."""
    text = Path(f"/proc/{pid}/status").read_text()
    out = {}
    for key in ("VmRSS", "VmHWM", "Threads"):
        m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
        out[key] = int(m.group(1)) if m else 0
    return out


def rss_mib(pid: int) -> float:
    return proc_status(pid)["VmRSS"] / 1024


def hwm_mib(pid: int) -> float:
    """The process's peak RSS since it started (the kernel's high-water mark, no sampling gaps)."""
    return proc_status(pid)["VmHWM"] / 1024


REPO_UNITS = Path(__file__).resolve().parents[2] / "units"
