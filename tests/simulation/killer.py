"""Run `gighive-media` and die like a SIGKILLed process at one chosen point.

    python -m tests.simulation.killer '{"target": "os.unlink", "nth": 2, "when": "after"}' ARGS...

The nth call of the target (see world.HOOK_TARGETS) is let through ("after") or not ("before"),
and then the process ends with os._exit(137): no finally blocks, no atexit, no flushed buffers,
as after kill -9. Only this wrapper changes; the agent's code runs as shipped.

    python -m tests.simulation.killer --serve

The same, as a fork server (world.Killer drives it): one process imports the agent and the Azure
SDK once, then forks a fresh child for every killed run. Each child is a real process of its own
that runs the agent's entry point from the same clean, just-imported state a new interpreter
would have, and dies at the hook or leaves as the interpreter would (threads joined, atexit,
garbage finalized, output flushed). A new interpreter's start and imports, and the teardown of
every module at its exit, took most of a killed run's time; only those are gone.
Protocol, one JSON line each way: {"spec", "argv", "env", "out", "err"} in; {"pid"} when the child
runs, then {"code"} (its exit status; 137: killed) out.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import sys
import threading
import traceback

# Imported once by the fork server, so no child pays for them. A module this build lacks is
# imported (or not) by the child as usual.
PRELOAD = (
    "agent.cli",
    "agent.actions.upload",
    "agent.actions.retry",
    "agent.actions.migrate",
    "agent.actions.migrate_back",
    "agent.actions.verify",
    "agent.actions.reconcile",
    "agent.deletes",
    "agent.context",
    "agent.pointer",
    "agent.state",
    "agent.storage.azure_blob",
)


def no_backoff_sleep() -> None:
    """The Azure SDK's in-request retries keep their number, not their waits: nothing changes
    while the simulation's agent waits (an outage lasts until the model ends it, a lost response
    was applied or not before the reset), so the seconds of backoff per call are dead time."""
    from azure.core.pipeline.transport._base import HttpTransport

    HttpTransport.sleep = lambda self, duration: None


def install_hook(spec: dict) -> None:
    from tests.simulation.world import resolve

    owner, attr = resolve(spec["target"])
    original = getattr(owner, attr, None)
    if original is None:
        return
    calls = {"n": 0}
    nth, after = int(spec["nth"]), spec.get("when") == "after"
    is_method = owner is not os

    def hit(call):
        calls["n"] += 1
        if calls["n"] != nth:
            return call()
        if not after:
            os._exit(137)
        try:
            call()
        finally:
            os._exit(137)

    if is_method:

        def wrapper(self, *args, **kwargs):
            return hit(lambda: original(self, *args, **kwargs))

    else:

        def wrapper(*args, **kwargs):
            return hit(lambda: original(*args, **kwargs))

    setattr(owner, attr, wrapper)


def keep_durable_points(snapshot: str) -> None:
    """A power cut loses the commits since the last fsync, not the ones before it. After each
    commit through StateStore.durable() (synchronous=FULL: the WAL fsynced, and every earlier
    commit with it) the state directory as it stands is copied to `snapshot`: what the
    simulation's power cut leaves behind (world.revert_state)."""
    import shutil

    from agent.state import StateStore

    original = StateStore.durable

    @contextlib.contextmanager
    def durable(self):
        with self._lock:  # noqa: SLF001 - no other write of this process lands mid-copy
            with original(self) as db:
                yield db
            shutil.rmtree(snapshot, ignore_errors=True)
            shutil.copytree(os.path.dirname(self.path), snapshot)

    StateStore.durable = durable


def install(spec: dict) -> None:
    install_hook(spec)
    if spec.get("durable_snapshot"):
        keep_durable_points(spec["durable_snapshot"])


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    spec = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    no_backoff_sleep()
    install(spec)
    from agent.cli import main as agent_main

    sys.exit(agent_main(argv))


def serve() -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    from tests.simulation import world  # noqa: F401 - resolve() and its imports, once

    no_backoff_sleep()
    # Everything imported so far stays put: a child's garbage collector does not write to (and
    # so copy) the pages of the objects it shares with the server.
    gc.freeze()
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    while True:
        line = requests.readline()
        if not line:
            return  # the simulation closed the pipe: it is done (or gone)
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)  # never returns: the child leaves through os._exit
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")


def _child(req: dict) -> None:
    # Not the server's pipes: the child's own output goes to its files, its stdin is empty.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, path in ((1, req["out"]), (2, req["err"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = ["gighive-media", *req["argv"]]
    install(req["spec"])
    from agent.cli import main as agent_main

    try:
        code = agent_main(req["argv"])
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    # The interpreter's exit, up to what can change the world: wait for the non-daemon threads,
    # run the atexit functions, finalize the garbage (a file or connection left unclosed),
    # flush. Tearing down every module (most of a fork's exit time, and a copy of every page it
    # touches) changes nothing outside this process.
    threading._shutdown()  # noqa: SLF001 - what Py_FinalizeEx calls first
    atexit._run_exitfuncs()  # noqa: SLF001
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
