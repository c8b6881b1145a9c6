"""The state database: transitions, backoff within policy, crash repair, clock jumps."""

from __future__ import annotations

import os
import random
import time

import pytest

from agent.config import RetryPolicy
from agent.state import StateStore, backoff_delay

POLICY = RetryPolicy(max_attempts=4, base_delay=10.0, max_delay=60.0)


@pytest.fixture
def state(tmp_path):
    s = StateStore.open(tmp_path / "state")
    yield s
    s.close()


def _stat(tmp_path, name="f", data=b"x"):
    p = tmp_path / name
    p.write_bytes(data)
    return p, os.stat(p)


def test_database_is_wal(state):
    mode = state._query("PRAGMA journal_mode")[0][0]
    assert mode == "wal"


def test_new_file_is_pending_and_a_second_observation_is_known(state, tmp_path):
    p, st = _stat(tmp_path)
    assert state.observe("audio/f", "audio", str(p), st, 0) == "new"
    assert state.observe("audio/f", "audio", str(p), st, 0) == "known"
    assert state.get("audio/f").state == "pending"


def test_changed_file_is_reconsidered_from_scratch(state, tmp_path):
    p, st = _stat(tmp_path)
    state.observe("audio/f", "audio", str(p), st, 0)
    state.mark_quarantined("audio/f", "bad", sha256="b" * 64)
    p.write_bytes(b"different")
    assert state.observe("audio/f", "audio", str(p), os.stat(p), 0) == "changed"
    rec = state.get("audio/f")
    assert rec.state == "pending"
    assert rec.sha256 is None
    assert rec.attempts == 0


def test_failures_back_off_then_go_dead(state, tmp_path):
    p, st = _stat(tmp_path)
    state.observe("audio/f", "audio", str(p), st, 0)
    rng = random.Random(7)
    seen = []
    for attempt in range(1, POLICY.max_attempts + 1):
        before = time.time()
        new_state = state.mark_failed("audio/f", f"boom {attempt}", POLICY, rng)
        after = time.time()
        rec = state.get("audio/f")
        assert rec.attempts == attempt
        seen.append(new_state)
        if new_state == "failed":
            # next_attempt_at = (a clock reading between before and after) + the delay: bounds that
            # hold however long the write took on a loaded machine (a slow fsync is not a bug).
            nominal = min(POLICY.max_delay, POLICY.base_delay * 2 ** (attempt - 1))
            assert rec.next_attempt_at - before >= nominal * 0.5 - 1e-6
            assert rec.next_attempt_at - after <= nominal + 1e-6
    assert seen == ["failed", "failed", "failed", "dead"]
    assert state.get("audio/f").last_error == "boom 4"


def test_backoff_is_capped_and_never_below_half():
    rng = random.Random(1)
    for attempts in range(1, 30):
        d = backoff_delay(attempts, POLICY, rng)
        nominal = min(POLICY.max_delay, POLICY.base_delay * 2 ** (attempts - 1))
        assert nominal / 2 <= d <= nominal


def test_interrupted_upload_is_requeued(state, tmp_path):
    p, st = _stat(tmp_path)
    state.observe("audio/f", "audio", str(p), st, 0)
    state.mark_uploading("audio/f")
    assert state.recover_interrupted() == 1
    assert state.get("audio/f").state == "pending"
    assert state.recover_interrupted() == 0


def test_due_includes_items_from_a_clock_that_jumped_back(state, tmp_path):
    p, st = _stat(tmp_path)
    state.observe("audio/f", "audio", str(p), st, 0)
    state.mark_failed("audio/f", "x", POLICY)
    now = time.time()
    assert state.due(now, POLICY.max_delay) == []
    # A next attempt a year ahead can only come from a wall clock that went backwards.
    state._db.execute("UPDATE files SET next_attempt_at = ?", (now + 365 * 86400,))
    assert [r.blob_name for r in state.due(now, POLICY.max_delay)] == ["audio/f"]


def test_requeue_dead_only_by_default(state, tmp_path):
    for name in ("a", "b"):
        p, st = _stat(tmp_path, name)
        state.observe(f"audio/{name}", "audio", str(p), st, 0)
    for _ in range(POLICY.max_attempts):
        state.mark_failed("audio/a", "x", POLICY)
    state.mark_quarantined("audio/b", "corrupt")
    assert state.requeue(["dead"]) == 1
    assert state.get("audio/a").state == "pending"
    assert state.get("audio/a").attempts == 0
    assert state.get("audio/b").state == "quarantined"
