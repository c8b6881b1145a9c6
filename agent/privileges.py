"""Running as root: become the service user before touching the state, never leave root-owned files.

The units run as `gighive-media`. An operator who types `sudo gighive-media migrate` before the
units ever ran would otherwise create state.sqlite3 and queue.lock owned by root, and every later
service run would fail with exit 73. So a command that writes the state, started as root on a host
where the service user exists, reads its configuration and secrets as root (they may be readable
by root only), makes sure the state directory exists and belongs to the service user (as
systemd's StateDirectory= would), and then drops to that user and its groups for the rest.

Media access after the drop is the service user's own (the Ansible role's ACLs), exactly as in the
units; the units' ambient CAP_DAC_READ_SEARCH for Docker volume paths is not kept.
"""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path

from .errors import StateError

log = logging.getLogger(__name__)

SERVICE_USER = "gighive-media"

# Commands that open the state or the queue lock for writing (or could create them).
STATE_WRITERS = frozenset({"upload", "retry", "requeue", "migrate", "reconcile", "verify", "fetch", "undelete"})


# `fetch` puts files back for GigHive's own readers, owned like GigHive's files (uid 33, the media
# directory's owner); it alone keeps root as its saved uid, used only for that fchown.
KEEPS_SAVED_ROOT = frozenset({"fetch"})


def become_service_user(command: str, state_dir: Path, user: str = SERVICE_USER) -> str | None:
    """Drop from root to the service user for state-writing commands; returns the user switched to."""
    if os.geteuid() != 0 or command not in STATE_WRITERS:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None  # no package installed here (a development host): nothing to keep consistent
    try:
        if not state_dir.exists():
            state_dir.mkdir(mode=0o750, parents=True)
            os.chown(state_dir, pw.pw_uid, pw.pw_gid)
        st = state_dir.stat()
        if st.st_uid != pw.pw_uid:
            raise StateError(
                f"{state_dir} belongs to uid {st.st_uid}, not to the service user {user}; fix it with "
                f"`chown -R {user}:{user} {state_dir}` (a run as root before this check may have made it)"
            )
        os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
        saved = 0 if command in KEEPS_SAVED_ROOT else None
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid if saved is None else 0)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid if saved is None else 0)
    except OSError as e:
        raise StateError(f"cannot switch from root to the service user {user}: {e.strerror or e}") from e
    log.info("started as root: running as the service user %s, so the state stays usable by the units", user)
    return user


def chown_like(fd: int, directory: Path) -> bool:
    """Give a file the owner and group of its media directory (GigHive's www-data), where this
    process may: as root, or as a `fetch` started as root (its saved uid). False otherwise."""
    st = os.stat(directory)
    if os.geteuid() == 0:
        os.fchown(fd, st.st_uid, st.st_gid)
        return True
    ruid, euid, suid = os.getresuid()
    if suid != 0:
        return False
    os.seteuid(0)
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    finally:
        os.seteuid(euid)
    return True
