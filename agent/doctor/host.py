"""Checks on this host: media roots, state directory, MySQL, systemd units."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from . import FAIL, PASS, SKIP, WARN, Check, Context

SERVICE_USER = "gighive-media"
TRIGGERS = ("gighive-media-upload.path", "gighive-media-retry.timer", "gighive-media-stream.socket")
SERVICES = ("gighive-media-upload.service", "gighive-media-retry.service", "gighive-media-stream.service")


def _as_service_user() -> dict | None:
    """subprocess kwargs to run as the service user when doctor runs as root; None otherwise
    (then doctor already runs as that user, e.g. through systemd-run, or as an operator)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(SERVICE_USER, pw.pw_gid)}


def _who() -> str:
    if _as_service_user() is not None:
        return SERVICE_USER
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _run(argv: list[str], as_user: dict | None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **(as_user or {}))


def check_media_roots(ctx: Context) -> Check:
    cfg = ctx.config
    user = _as_service_user()
    who = _who()
    problems: list[str] = []
    details: dict[str, object] = {"user": who}
    for root in cfg.roots:
        path = str(root.path)
        if not root.path.is_dir():
            problems.append(f"{root.name}: {path} does not exist or is not a directory")
            continue
        if _run(["test", "-r", path, "-a", "-x", path], user).returncode != 0:
            problems.append(f"{root.name}: {who} cannot list {path} (or a parent directory)")
            continue
        # A few levels deep is enough to catch files written with a private mode.
        r = _run(["find", path, "-maxdepth", "2", "-type", "f", "!", "-readable", "-print", "-quit"], user)
        if r.stdout.strip():
            problems.append(f"{root.name}: {who} cannot read {r.stdout.strip()}")
        if cfg.delete_local and _run(["test", "-w", path], user).returncode != 0:
            problems.append(f"{root.name}: DELETE_LOCAL_AFTER_UPLOAD=true but {who} cannot write {path}")
        details[root.name] = path
    if problems:
        return Check(
            "media_roots",
            FAIL,
            "; ".join(problems),
            f"grant {SERVICE_USER} read (and, for local deletion, write) access with ACLs, e.g. "
            f"setfacl -R -m u:{SERVICE_USER}:rX -m d:u:{SERVICE_USER}:rX <root> (the Ansible role does "
            "this); a Docker volume's parent /var/lib/docker/volumes needs u:gighive-media:x too",
            details,
        )
    names = ", ".join(r.name for r in cfg.roots)
    return Check("media_roots", PASS, f"{who} can read every media root ({names})", details=details)


def check_state_dir(ctx: Context) -> Check:
    path = ctx.config.state_dir
    if not path.exists():
        return Check(
            "state_dir",
            WARN,
            f"{path} does not exist yet",
            "systemd creates it (StateDirectory=) when a unit first starts; outside systemd set "
            "GIGHIVE_MEDIA_STATE_DIR to a writable directory",
        )
    user = _as_service_user()
    if _run(["test", "-d", str(path), "-a", "-w", str(path), "-a", "-x", str(path)], user).returncode != 0:
        return Check(
            "state_dir",
            FAIL,
            f"{_who()} cannot write {path}",
            f"chown -R {SERVICE_USER}:{SERVICE_USER} {path} (systemd does this for StateDirectory=)",
        )
    return Check("state_dir", PASS, f"{path} is writable by {_who()}")


def check_mysql(ctx: Context) -> Check:
    m = ctx.config.mysql
    if m is None:
        return Check("mysql", SKIP, "MYSQL_HOST not set: no DB pointer (the agent's own state is the pointer)")
    from ..pointer import TABLE, PointerDB, PointerUnavailable

    db = PointerDB(m)
    where = f"{m.user}@{m.host}:{m.port}/{m.database}"
    try:
        exists = db.table_exists()
    except PointerUnavailable as e:
        return Check(
            "mysql",
            FAIL,
            f"{where}: {e}",
            "GigHive's MySQL publishes 3306 on 127.0.0.1; check MYSQL_USER and the mysql-password "
            "credential (/etc/credstore/gighive-media-agent.mysql-password)",
        )
    finally:
        db.close()
    if not exists:
        return Check(
            "mysql",
            FAIL,
            f"{where} is reachable but table {TABLE} does not exist",
            "run gighive-media db-migrate (the Ansible role does)",
        )
    return Check("mysql", PASS, f"{where} is reachable and table {TABLE} exists")


def _systemctl(*args: str) -> str:
    r = subprocess.run(["systemctl", "--no-pager", *args], capture_output=True, text=True, timeout=30, check=False)
    return r.stdout.strip()


def check_units(ctx: Context) -> Check:
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return Check("units", SKIP, "this host is not running systemd")
    if all(_systemctl("show", "--property=LoadState", "--value", u) == "not-found" for u in TRIGGERS):
        return Check("units", SKIP, "the package's units are not installed here (running from a source tree?)")
    enabled = {u: _systemctl("is-enabled", u) for u in TRIGGERS}
    active = {u: _systemctl("is-active", u) for u in TRIGGERS}
    failed = [u for u in SERVICES if _systemctl("is-active", u) == "failed"]
    details = {"enabled": enabled, "active": active, "failed": failed}
    if failed:
        return Check(
            "units",
            FAIL,
            f"failed: {', '.join(failed)}",
            f"journalctl -u {failed[0]} -n 50; then systemctl reset-failed {failed[0]}",
            details,
        )
    if ctx.config.is_azure:
        off = [u for u in TRIGGERS if enabled[u] != "enabled" or active[u] != "active"]
        if off:
            return Check(
                "units",
                WARN,
                "not enabled and running: " + ", ".join(f"{u} ({enabled[u] or '?'}, {active[u] or '?'})" for u in off),
                f"systemctl enable --now {' '.join(off)} (the Ansible role does this after its preflight)",
                details,
            )
        return Check("units", PASS, "path unit, retry timer and stream socket are enabled and active", details=details)
    on = [u for u in TRIGGERS if enabled[u] == "enabled" or active[u] == "active"]
    if on:
        return Check(
            "units",
            WARN,
            f"MEDIA_STORAGE_BACKEND=local but {', '.join(on)} enabled or active",
            f"systemctl disable --now {' '.join(on)}",
            details,
        )
    return Check("units", PASS, "MEDIA_STORAGE_BACKEND=local and no agent unit is enabled", details=details)
