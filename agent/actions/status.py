"""`gighive-media status`: counts per state, what needs attention, and the config (no secrets)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .. import safety
from ..config import Config
from ..errors import LockBusy, StateError
from ..lock import QueueLock
from ..state import StateStore

# Below this the next state transition (a WAL frame of a few pages) may not fit.
_MIN_FREE = 64 * 1024


def run(config: Config, limit: int = 50) -> dict[str, object]:
    result: dict[str, object] = {"config": config.summary()}
    result["state_dir_problem"] = state_dir_problem(config.state_dir)
    state = StateStore.open_readonly(config.state_dir)
    if state is None:
        result.update(counts={}, attention=[], failing=[], pointer={}, note="no upload has run yet")
        # A lost state directory does not lose the hold: its markers live in the media roots.
        result["local_hold"] = safety.held(None, config)
        return result
    try:
        result["counts"] = state.counts()
        result["root_errors"] = json.loads(state.get_meta("root_errors") or "{}")
        result["pointer"] = state.pointer_counts()
        result["attention"] = [_item(r) for r in state.in_state("dead", "quarantined", limit=limit)]
        result["failing"] = [_item(r) for r in state.in_state("failed", limit=limit)]
        result["pointer_pending"] = [
            {"blob_name": r.blob_name, "error": r.pointer_error} for r in state.pointer_pending()[:limit]
        ]
        result["outage"] = _outage(state)
        result["local_hold"] = safety.held(state, config)
        deletions = state.deletions()
        result["soft_deleted"] = [
            {
                "blob_name": r["blob_name"],
                "purge_in_s": round(max(0.0, r["purge_after"] - time.time())),
            }
            for r in deletions[:limit]
        ]
        result["soft_deleted_count"] = len(deletions)
        result["assets_problem"] = state.get_meta("assets_problem")
        lost = state.assets_lost()
        result["assets_lost_count"] = len(lost)
        result["assets_lost_why"] = sorted(set(lost.values()))[:5]
    finally:
        state.close()
    result["queue_lock_holder"] = _lock_holder(config)
    return result


def _outage(state: StateStore) -> dict[str, object] | None:
    """An outage as an outage: since when, the last error, and when the next try is."""
    o = safety.outage_since(state)
    if o is None:
        return None
    return {
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(o["since"]))),
        "for_s": round(time.time() - float(o["since"])),
        "last_error": o.get("last_error"),
        "runs": o.get("runs"),
        "next_try_in_s": round(max(0.0, float(o.get("next_try", 0)) - time.time())),
    }


def _item(r) -> dict[str, object]:
    return {
        "blob_name": r.blob_name,
        "path": r.path,
        "state": r.state,
        "attempts": r.attempts,
        "last_error": r.last_error,
        "next_attempt_in_s": round(max(0.0, r.next_attempt_at - time.time())) if r.state == "failed" else None,
    }


def state_dir_problem(state_dir: Path) -> str | None:
    """Why upload/retry runs would exit 73 now, or None. Checked without writing anything."""
    if not state_dir.is_dir():
        return None
    # access(2) reports EROFS for a read-only mount even to root, unlike the mode bits.
    if not os.access(state_dir, os.W_OK | os.X_OK):
        return f"{state_dir} is not writable (read-only file system or permissions); runs exit 73 until it is"
    st = os.statvfs(state_dir)
    free = st.f_bavail * st.f_frsize
    if free < _MIN_FREE:
        return f"{state_dir} is full ({free} bytes free); runs exit 73 until space is freed"
    return None


def _lock_holder(config: Config) -> int | None:
    lock = QueueLock(config.state_dir)
    if not lock.path.exists():
        return None  # no run has made it yet; creating it here (as root, say) would leave it to root
    try:
        lock.acquire(wait=False)
    except StateError:
        return None  # cannot even open the lock file: state_dir_problem says why
    except LockBusy:
        try:
            return int(lock.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None
    lock.release()
    return None


def render(result: dict[str, object]) -> str:
    lines = []
    cfg = result["config"]
    assert isinstance(cfg, dict)
    lines.append(f"backend: {cfg['backend']}   container: {cfg.get('container')}   endpoint: {cfg.get('endpoint')}")
    lines.append(
        f"auth: {cfg.get('auth_mode')}   database: {cfg.get('database') or 'none (agent state is the pointer)'}"
    )
    lines.append("roots: " + ", ".join(f"{k}={v}" for k, v in (cfg.get("media_roots") or {}).items()))
    lines.append(f"delete local after upload: {cfg.get('delete_local_after_upload')}")
    if result.get("state_dir_problem"):
        lines.append(f"state directory: {result['state_dir_problem']}")
    if result.get("note"):
        lines.append(str(result["note"]))
        return "\n".join(lines)
    counts = result.get("counts") or {}
    assert isinstance(counts, dict)
    lines.append("files: " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    outage = result.get("outage")
    if isinstance(outage, dict):
        lines.append(
            f"OUTAGE: Azure Blob unusable since {outage['since']} ({outage['runs']} run(s)); next try in "
            f"{outage['next_try_in_s']}s; no file's attempts are used up meanwhile. Last error: {outage['last_error']}"
        )
    if result.get("local_hold"):
        lines.append(
            f"eviction on hold since {result['local_hold']} (`migrate --to-local` ran): nothing is deleted locally "
            "and the DB keeps pointing at local files until `gighive-media migrate` is run again"
        )
    if result.get("assets_problem"):
        lines.append(f"GigHive's assets table is not trusted now, so no delete is inferred: {result['assets_problem']}")
    if result.get("assets_lost_count"):
        lines.append(
            f"{result['assets_lost_count']} asset(s) vanished from GigHive's assets table when it was rebuilt "
            f"({'; '.join(result['assets_lost_why'])}): not taken for deletes, their blobs are kept and the way "
            "back restores them; `gighive-media reconcile --accept-assets-shrink` confirms them as deleted"  # type: ignore[arg-type]
        )
    if result.get("soft_deleted_count"):
        first = result["soft_deleted"][0]  # type: ignore[index]
        lines.append(
            f"{result['soft_deleted_count']} blob(s) of assets deleted in GigHive are soft-deleted (first purge in "
            f"{first['purge_in_s']}s); `gighive-media undelete NAME` keeps one"
        )
    for where, problem in (result.get("root_errors") or {}).items():  # type: ignore[union-attr]
        lines.append(f"media root {where} not scanned: {problem}")
    pointer = result.get("pointer") or {}
    if pointer:
        lines.append("db pointer: " + "  ".join(f"{k}={v}" for k, v in pointer.items()))
    if result.get("queue_lock_holder"):
        lines.append(f"a run is active (pid {result['queue_lock_holder']})")
    for title, key in (("needs attention", "attention"), ("failing, will retry", "failing")):
        items = result.get(key) or []
        if items:
            lines.append(f"{title}:")
            for it in items:  # type: ignore[union-attr]
                when = f", next try in {it['next_attempt_in_s']}s" if it.get("next_attempt_in_s") is not None else ""
                lines.append(
                    f"  [{it['state']}] {it['blob_name']} (attempts {it['attempts']}{when}): {it['last_error']}"
                )
    pending = result.get("pointer_pending") or []
    if pending:
        lines.append("db pointer not yet updated:")
        for it in pending:  # type: ignore[union-attr]
            lines.append(f"  {it['blob_name']}: {it['error']}")
    return "\n".join(lines)
