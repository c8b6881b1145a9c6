"""A long soak of the stream server: 200 concurrent range readers (local and Blob videos, every
byte verified) for several minutes, with the server's RSS sampled throughout.

The same code as tests/faults/test_stream_abuse.py's one-minute soak (tests/faults/soak.py), run
longer to see whether memory creeps up or errors appear only after a while:

    .venv/bin/python bench/stream_soak.py --seconds 300            # figures on stdout
    .venv/bin/python bench/stream_soak.py --seconds 300 --json out.json

It starts its own Azurite and server (the real `gighive-media serve`) in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults.soak import run_soak  # noqa: E402
from tests.faults.test_stream_abuse import soak_library  # noqa: E402
from tests.stream.conftest import _library  # noqa: E402
from tests.stream.support import ServerProcess, write_config  # noqa: E402
from tests.support.azurite import Azurite  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--size-mib", type=int, default=24, help="size of each of the four videos")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stream-soak-") as tmp:
        work = Path(tmp)
        azurite = Azurite(work / "azurite").start()
        server = None
        try:
            lib = _library(work / "library", azurite)
            items = soak_library(lib, size=args.size_mib * 1024 * 1024)
            config = write_config(work / "agent.env", lib.config_values(LOG_LEVEL="info"))
            server = ServerProcess(config, work / "server.log", ["127.0.0.1:0"])
            result = run_soak(server.proc.pid, server.tcp, items, clients=args.clients, seconds=args.seconds)
            figures = result.summary()
            figures["server_alive"] = server.proc.poll() is None
            figures["server_log_errors"] = server.log_text().count(" ERROR ")
            print(json.dumps(figures, indent=2))
            if args.json:
                args.json.write_text(json.dumps(figures, indent=2) + "\n")
            return 0 if not result.errors and figures["server_alive"] else 1
        finally:
            if server is not None:
                server.stop()
            azurite.stop()


if __name__ == "__main__":
    sys.exit(main())
