"""`python -m agent.stream`: the same as `gighive-media serve`, for development and tests."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .. import logs
from ..config import load
from ..errors import EXIT_SOFTWARE, AgentError, ConfigErrors
from .server import run

log = logging.getLogger("gighive-media")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS",
        help="listen on HOST:PORT or unix:/path instead of the sockets systemd passes (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.stream", description=__doc__)
    parser.add_argument("--config", type=Path, metavar="PATH")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    add_arguments(parser)
    args = parser.parse_args(argv)
    logs.setup("info")
    try:
        config = load(args.config)
        logs.setup(args.log_level or config.log_level)
        return run(config, listen=args.listen)
    except ConfigErrors as e:
        for err in e.errors:
            log.error("configuration error: %s", err, extra={"fields": {"config_variable": err.variable}})
        return e.exit_code
    except AgentError as e:
        log.error("%s", e)
        return e.exit_code
    except Exception:
        log.exception("internal error (a bug; please report it with this traceback)")
        return EXIT_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
