"""`python -m agent.stream ARGS` is `gighive-media serve ARGS` (development, tests, benchmarks)."""

from __future__ import annotations

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
