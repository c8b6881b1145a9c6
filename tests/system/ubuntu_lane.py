"""The Ubuntu 24.04 lane (opt-in): build the .deb on Ubuntu 24.04 (Python 3.12) and run the
package and system tests on a booted Ubuntu 24.04 container.

    GIGHIVE_UBUNTU_MIRROR=<Ubuntu archive URL> python -m tests.system.ubuntu_lane [pytest args]

GigHive's hosts run Ubuntu 24.04; CI runs on Debian 12, whose package sources have no Ubuntu
archive, so this lane runs only where one is named (the address is not kept in the repository).
It uses the host's debootstrap and systemd-nspawn (.ci/setup-system installs them):

1. a noble build tree with the build dependencies (dh-virtualenv is in universe), cached under
   $GIGHIVE_CACHE/build-noble; the package is built in it by dpkg-buildpackage, as on an Ubuntu
   maintainer's machine (pip reaches the package index the host reaches, with the host's CAs);
2. a noble root filesystem that boots under systemd-nspawn, with what the .deb depends on, cached
   as $GIGHIVE_CACHE/rootfs-noble/rootfs.tar.zst (the recipe of .ci/setup-system);
3. pytest tests/system with GIGHIVE_DEB and GIGHIVE_ROOTFS pointing at those two.

Debian's debootstrap has no Ubuntu keyring, so the archive's signatures are not checked
(--no-check-gpg): fine for a throwaway test tree, not for anything that ships.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.system.debbuild import PACKAGE, REPO, copy_tree

SUITE = "noble"
CACHE = Path(os.environ.get("GIGHIVE_CACHE", Path.home() / ".cache" / "gighive-media-agent"))
# As .ci/setup-system's ROOTFS_PACKAGES: what boots, and everything the .deb depends on.
ROOTFS_PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "python3",
    "python3-venv",
    "adduser",
    "libsystemd0",
    "ca-certificates",
    "procps",
    "iproute2",
]
BUILD_PACKAGES = [
    "build-essential",
    "debhelper",
    "dh-virtualenv",
    "dpkg-dev",
    "fakeroot",
    "python3-dev",
    "python3-venv",
    "libsystemd-dev",
    "pkg-config",
    "ca-certificates",
]
RECIPE_VERSION = "1"
# debootstrap on Debian 12 has no "noble" script; Ubuntu's releases all use the "gutsy" one.
SCRIPT = "/usr/share/debootstrap/scripts/gutsy"


def log(msg: str) -> None:
    print(f"[ubuntu-lane] {msg}", file=sys.stderr, flush=True)


def key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def debootstrap(target: Path, mirror: str, packages: list[str]) -> None:
    argv = [
        "debootstrap",
        "--variant=minbase",
        "--components=main,universe",
        "--no-check-gpg",
        f"--include={','.join(packages)}",
        SUITE,
        str(target),
        mirror,
        SCRIPT,
    ]
    logfile = target.parent / "debootstrap.log"
    with open(logfile, "wb") as out:
        r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"debootstrap {SUITE} failed ({r.returncode}):\n{tail}")


def build_tree(mirror: str) -> Path:
    """The cached noble build tree with the build dependencies."""
    root = CACHE / f"build-{SUITE}"
    want = key(SUITE, RECIPE_VERSION, *BUILD_PACKAGES)
    stamp = root / "tree.key"
    if stamp.is_file() and stamp.read_text().strip() == want:
        return root / "tree"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log(f"debootstrap {SUITE} build tree into {root / 'tree'}")
    debootstrap(root / "tree", mirror, BUILD_PACKAGES)
    stamp.write_text(want + "\n")
    return root / "tree"


def rootfs(mirror: str) -> Path:
    """The cached bootable noble root filesystem tarball."""
    cache = CACHE / f"rootfs-{SUITE}"
    tarball = cache / "rootfs.tar.zst"
    want = key(SUITE, RECIPE_VERSION, *ROOTFS_PACKAGES)
    if tarball.is_file() and (cache / "rootfs.key").read_text().strip() == want:
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build.", dir=cache))
    try:
        tree = work / "rootfs"
        log(f"debootstrap {SUITE} rootfs into {tree}")
        debootstrap(tree, mirror, ROOTFS_PACKAGES)
        # As .ci/setup-system: boots cleanly under systemd-nspawn --boot, no getty, no apt lists.
        (tree / "etc/hostname").write_text("gighive-test\n")
        (tree / "etc/machine-id").write_text("")
        (tree / "var/lib/dbus/machine-id").unlink(missing_ok=True)
        for unit in ("console-getty.service", "getty@.service"):
            link = tree / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        for leftover in (tree / "var/lib/apt/lists").glob("*"):
            if leftover.is_file():
                leftover.unlink()
        subprocess.run(
            [
                "tar",
                "--zstd",
                "-C",
                str(tree),
                "--numeric-owner",
                "--xattrs",
                "--acls",
                "-cf",
                str(work / "t.zst"),
                ".",
            ],
            check=True,
        )
        (work / "t.zst").replace(tarball)
        (cache / "rootfs.key").write_text(want + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tarball


def build_deb(tree: Path) -> Path:
    """dpkg-buildpackage -us -uc -b inside the build tree; returns the .deb (its .changes beside it)."""
    out = Path(tempfile.mkdtemp(prefix=f"debbuild-{SUITE}-", dir="/var/tmp"))
    copy_tree(REPO, out / PACKAGE)
    # pip inside the tree reaches the index through whatever this host uses, with the host's CAs.
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", out / "host-ca.crt")
    started = time.monotonic()
    argv = [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        # As tests/system/nspawn.py: no scope through the system bus (the host may have none).
        "--keep-unit",
        f"--machine=gighive-build-{os.getpid()}",
        f"--directory={tree}",
        f"--bind={out}:/build",
        "--setenv=PIP_CERT=/build/host-ca.crt",
        "--setenv=HOME=/build",
        f"--chdir=/build/{PACKAGE}",
        "dpkg-buildpackage",
        "-us",
        "-uc",
        "-b",
    ]
    with open(out / "build.log", "wb") as logfile:
        r = subprocess.run(argv, stdout=logfile, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = "\n".join((out / "build.log").read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"dpkg-buildpackage on {SUITE} failed ({r.returncode}); log {out / 'build.log'}:\n{tail}")
    debs = sorted(out.glob(f"{PACKAGE}_*.deb"))
    log(f"built {debs[0].name} on {SUITE} in {time.monotonic() - started:.0f} s")
    return debs[0]


def main(argv: list[str]) -> int:
    mirror = os.environ.get("GIGHIVE_UBUNTU_MIRROR", "")
    if not mirror:
        print("GIGHIVE_UBUNTU_MIRROR is not set: name an Ubuntu archive this host can reach", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("the Ubuntu lane needs root (debootstrap, systemd-nspawn)", file=sys.stderr)
        return 2
    subprocess.run(["bash", str(REPO / ".ci" / "setup-system")], check=True, stdout=subprocess.DEVNULL)
    tarball = rootfs(mirror)
    tree = build_tree(mirror)
    deb = build_deb(tree)
    python = subprocess.run(
        ["chroot", str(tree), "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = {**os.environ, "GIGHIVE_DEB": str(deb), "GIGHIVE_ROOTFS": str(tarball), "GIGHIVE_DEB_PYTHON": python}
    return subprocess.run([sys.executable, "-m", "pytest", "tests/system", *argv], cwd=REPO, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
