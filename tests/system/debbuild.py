"""Building the .deb the way a maintainer does: dpkg-buildpackage -us -uc -b, in a copy of the tree.

The copy holds what git would commit (tracked files plus untracked, not ignored ones), so a
local build never writes build/, *.egg-info or debian/<package>/ into the working tree, and
tests see uncommitted changes. Without git, the tree is copied minus the usual junk.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "gighive-media-agent"
_JUNK = shutil.ignore_patterns(
    ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".cache"
)


@dataclass(frozen=True)
class Build:
    deb: Path
    changes: Path
    log: Path
    seconds: float


def _source_files(repo: Path) -> list[str] | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return [f for f in r.stdout.decode().split("\0") if f]


def copy_tree(repo: Path, dest: Path) -> None:
    files = _source_files(repo)
    if files is None:
        shutil.copytree(repo, dest, ignore=_JUNK, symlinks=True)
        return
    dest.mkdir(parents=True)
    for rel in files:
        src = repo / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree but still in the index
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)


def build_deb(workdir: Path, repo: Path = REPO) -> Build:
    """Build the package under workdir; return the .deb and .changes. Raises with the log's tail."""
    src = workdir / PACKAGE
    copy_tree(repo, src)
    log = workdir / "build.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        r = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    if r.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise RuntimeError(f"dpkg-buildpackage failed ({r.returncode}); full log {log}\n{tail}")
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    changes = sorted(workdir.glob(f"{PACKAGE}_*.changes"))
    if len(debs) != 1 or len(changes) != 1:
        raise RuntimeError(f"expected one .deb and one .changes in {workdir}, found {debs} {changes}")
    return Build(deb=debs[0], changes=changes[0], log=log, seconds=seconds)
