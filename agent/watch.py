"""Watching the media roots with inotify while the upload run is alive.

systemd's path unit only starts the service; events that arrive while it runs are merged into
that run, so the run itself must keep watching until things go quiet.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

from inotify_simple import INotify
from inotify_simple import flags as F

from .config import Config

log = logging.getLogger(__name__)

_DIR_MASK = F.CLOSE_WRITE | F.MOVED_TO | F.CREATE | F.DELETE_SELF | F.MOVE_SELF | F.ATTRIB


class Events(NamedTuple):
    files: set[Path]  # written (closed after writing), moved in, or their mode/owner changed
    new_dirs: set[Path]
    renamed_in: set[Path]  # of files: moved into place and not written since (agent/arrival.py)


class RootWatcher:
    def __init__(self, config: Config):
        self.inotify = INotify()
        self._dirs: dict[int, Path] = {}
        self.overflowed = False
        for root in config.roots:
            self._add_tree(root.path)

    def close(self) -> None:
        self.inotify.close()

    def _add_tree(self, top: Path) -> list[Path]:
        """Watch a directory and its subdirectories; returns the directories added."""
        added = []
        stack = [top]
        while stack:
            d = stack.pop()
            try:
                wd = self.inotify.add_watch(str(d), _DIR_MASK)
            except OSError as e:
                log.warning("cannot watch %s: %s", d, e.strerror)
                continue
            self._dirs[wd] = d
            added.append(d)
            try:
                stack.extend(
                    Path(e.path)
                    for e in os.scandir(d)
                    if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
                )
            except OSError:
                continue
        return added

    def read(self, timeout_s: float) -> Events:
        """Wait up to timeout_s for events; returns what they named."""
        files: set[Path] = set()
        new_dirs: set[Path] = set()
        renamed_in: set[Path] = set()
        for event in self.inotify.read(timeout=max(0, int(timeout_s * 1000))):
            if event.mask & F.Q_OVERFLOW:
                self.overflowed = True
                continue
            base = self._dirs.get(event.wd)
            if base is None:
                continue
            if event.mask & (F.DELETE_SELF | F.MOVE_SELF | F.IGNORED):
                self._dirs.pop(event.wd, None)
                continue
            path = base / event.name if event.name else base
            if event.mask & F.ISDIR:
                if event.mask & (F.CREATE | F.MOVED_TO) and not event.name.startswith("."):
                    new_dirs.update(self._add_tree(path))
                continue
            if event.mask & (F.CLOSE_WRITE | F.MOVED_TO | F.ATTRIB):
                files.add(path)
            # Events come in order: a file written again after its rename is not complete.
            if event.mask & F.MOVED_TO:
                renamed_in.add(path)
            elif event.mask & F.CLOSE_WRITE:
                renamed_in.discard(path)
        return Events(files, new_dirs, renamed_in)
