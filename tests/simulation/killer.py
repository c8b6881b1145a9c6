"""Run `gighive-media` and die like a SIGKILLed process at one chosen point.

    python -m tests.simulation.killer '{"target": "os.unlink", "nth": 2, "when": "after"}' ARGS...

The nth call of the target (see world.HOOK_TARGETS) is let through ("after") or not ("before"),
and then the process ends with os._exit(137): no finally blocks, no atexit, no flushed buffers,
as after kill -9. Only this wrapper changes; the agent's code runs as shipped.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    from tests.simulation.world import resolve

    owner, attr = resolve(spec["target"])
    original = getattr(owner, attr, None)
    if original is not None:
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
    from agent.cli import main as agent_main

    sys.exit(agent_main(argv))


if __name__ == "__main__":
    main()
