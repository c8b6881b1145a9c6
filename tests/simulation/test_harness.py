"""The simulation's own machinery, which its speed rests on: a killed run is a real child process
that dies at its hook (forked from the killer's server), a run whose hook is never reached ends
as the agent ends it, and a lost response reaches the agent as a reset, at once, also on a
kept-alive connection (not as silence until its network timeout)."""

from __future__ import annotations

import hashlib
import http.client
import os

import pytest

from tests.simulation.world import ACCOUNT_NAME, CONTAINER


@pytest.fixture
def fresh(world):
    world.reset()
    return world


def _add_file(world, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    world.local_path(f"audio/{sha}.mp3").write_bytes(data)
    world.insert_asset("audio", sha, "mp3", len(data))
    return f"audio/{sha}.mp3"


def test_a_killed_run_dies_at_its_hook_in_a_process_of_its_own(fresh) -> None:
    name = _add_file(fresh, b"killed before the put")
    run = fresh.agent_killed(["upload", "--no-watch"], "store.put", 1, "before")
    assert run.killed and run.code is None
    assert fresh.blob_bytes(name) is None  # it died before the call
    # The server's child runs the agent from a clean state each time: the next one (its hook
    # never reached) uploads the file and reports it as the agent does.
    run = fresh.agent_killed(["upload", "--no-watch"], "store.put", 99, "before")
    assert not run.killed and run.code == 0, run.stderr
    assert run.result is not None
    assert fresh.blob_bytes(name) == b"killed before the put"
    assert fresh.killer is not None and fresh.killer.proc.pid != os.getpid()


def test_a_killed_run_after_the_call_keeps_what_the_call_did(fresh) -> None:
    name = _add_file(fresh, b"killed after the put")
    run = fresh.agent_killed(["upload", "--no-watch"], "store.put", 1, "after")
    assert run.killed
    assert fresh.blob_bytes(name) == b"killed after the put"


def test_a_lost_response_on_a_kept_alive_connection_is_a_reset(world) -> None:
    # Well above any machine's pause: the assertion is on what the client saw, not on time.
    conn = http.client.HTTPConnection("127.0.0.1", world.azure_proxy.port, timeout=600)
    path = f"/{ACCOUNT_NAME}/{CONTAINER}?restype=container"
    conn.request("GET", path)
    first = conn.getresponse()
    first.read()
    assert first.status in (200, 403)  # answered (unsigned: 403); the connection stays open
    world.azure_proxy.lose_responses(1, method="GET")
    try:
        with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
            conn.request("GET", path)
            conn.getresponse().read()
    finally:
        world.azure_proxy.lose_responses(0)
        conn.close()
