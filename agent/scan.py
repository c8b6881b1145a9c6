"""Walking the media roots: what is media, what is skipped and why.

Symlinks are never followed (a link could point anywhere on the host), and FIFOs, sockets and
devices are never opened. Both are reported, so an operator sees why a file was not uploaded.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .config import Config, MediaRoot
from .media import MediaFile, name_problem

log = logging.getLogger(__name__)


@dataclass
class ScanReport:
    files: int = 0
    new: int = 0
    changed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    root_errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "files": self.files,
            "new": self.new,
            "changed": self.changed,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "root_errors": self.root_errors,
        }


def classify(mode: int) -> str | None:
    """Why a file of this type is not media, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "symbolic link (not followed)"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device node"
    return "not a regular file"


def walk_root(
    root: MediaRoot, report: ScanReport, start: Path | None = None
) -> Iterator[tuple[MediaFile, os.stat_result]]:
    """Yield (MediaFile, lstat) for every uploadable file under root (or under start, inside it)."""
    stack = [start or root.path]
    prefix = len(str(root.path).rstrip("/")) + 1
    while stack:
        directory = stack.pop()
        try:
            # Iterated, not listed: a 100,000-file directory would otherwise hold every DirEntry
            # (tens of MiB) at once.
            entries = os.scandir(directory)
        except FileNotFoundError:
            if directory == root.path:
                report.root_errors[root.name] = f"{root.path} does not exist"
            continue
        except PermissionError:
            where = root.name if directory == root.path else f"{root.name}:{directory}"
            report.root_errors[where] = f"{directory} is not readable by this user (permission denied)"
            continue
        except NotADirectoryError:
            report.root_errors[root.name] = f"{directory} is not a directory"
            continue
        with entries:
            yield from _entries(root, entries, prefix, stack, report)


def _entries(
    root: MediaRoot, entries: Iterator[os.DirEntry[str]], prefix: int, stack: list[Path], report: ScanReport
) -> Iterator[tuple[MediaFile, os.stat_result]]:
    for entry in entries:
        rel = PurePosixPath(entry.path[prefix:])
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if not entry.name.startswith("."):
                stack.append(Path(entry.path))
            continue
        problem = name_problem(rel)
        if problem:
            # Hidden and temporary files are normal traffic, not worth a report line.
            log.debug("skipping %s: %s", entry.path, problem)
            continue
        kind = classify(st.st_mode)
        if kind:
            report.skipped.append((entry.path, kind))
            log.warning("skipping %s: %s", entry.path, kind, extra={"fields": {"path": entry.path}})
            continue
        report.files += 1
        yield MediaFile(root=root, relpath=rel), st


def walk(config: Config, report: ScanReport) -> Iterator[tuple[MediaFile, os.stat_result]]:
    for root in config.roots:
        yield from walk_root(root, report)
