"""The `gighive-media` command: argument parsing and dispatch to agent.actions.<command>.

Exit codes:
  0   done (upload/retry: also when failures were recorded for the retry timer)
  1   status: items need attention (dead or quarantined); other commands: the work failed
  2   bad command-line usage
  69  a dependency (Azure, MySQL) is unavailable and the command cannot record it for later
  73  the state directory cannot be used
  75  another run holds the queue lock (commands that need it exclusively)
  78  bad configuration (systemd's RestartPreventExitStatus= covers it)
  130 stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM (`systemctl stop`): the next run continues
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__, interrupts, logs
from .config import DEFAULT_CONFIG_PATH, load, parse_size
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_SOFTWARE, AgentError, ConfigError, ConfigErrors
from .privileges import become_service_user

log = logging.getLogger("gighive-media")

COMMANDS = {
    "upload": "upload new media files, then watch the roots until idle (started by the path unit)",
    "retry": "rescan the roots and retry due failures with backoff (started by the timer)",
    "status": "show counts per state, items needing attention, and the configuration",
    "requeue": "put dead (or quarantined / failed) items back in the queue",
    "db-migrate": "create or update the DB pointer table in GigHive's MySQL (idempotent)",
    "migrate": "move the existing local library to Blob (or back with --to-local), verified and resumable",
    "verify": "check uploaded files against their blobs (size, MD5, sha256; --readback downloads)",
    "reconcile": "compare local roots, the container and the DB pointers; repair the safe differences",
    "undelete": "keep the blob of an asset deleted in GigHive (cancel its soft delete before the purge)",
    "fetch": "bring evicted files back to disk, verified, for a GigHive reader that needs them local",
    "doctor": "preflight: check config, DNS, TLS, token, container, roots, MySQL and units (PASS/WARN/FAIL)",
    "serve": "stream /audio/ and /video/ to the web front from local disk or Blob (started by the socket unit)",
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"env-style configuration file (default: $GIGHIVE_MEDIA_CONFIG or {DEFAULT_CONFIG_PATH})",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output on stdout"
    )
    common.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=argparse.SUPPRESS,
        help="override LOG_LEVEL",
    )

    parser = argparse.ArgumentParser(
        prog="gighive-media",
        description="GigHive media agent: mirrors local media to Azure Blob Storage, verified, "
        "and keeps GigHive's DB pointing at where each file lives.",
        epilog="Configuration is read from the env file and the environment; see gighive-media(1). "
        "Exit codes: 0 ok, 1 failed/needs attention, 2 usage, 69 unavailable, 73 state dir unusable, "
        "75 queue busy, 78 bad configuration, 130/143 stopped by SIGINT/SIGTERM.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("upload", help=COMMANDS["upload"], description=COMMANDS["upload"], parents=[common])
    p.add_argument("--no-watch", action="store_true", help="drain pending work and exit instead of watching")
    p.add_argument("--idle-exit", type=float, metavar="SECONDS", help="override UPLOAD_IDLE_EXIT_SECONDS for this run")
    sub.add_parser("retry", help=COMMANDS["retry"], description=COMMANDS["retry"], parents=[common])
    p = sub.add_parser("status", help=COMMANDS["status"], description=COMMANDS["status"], parents=[common])
    p.add_argument("--limit", type=int, default=50, help="list at most this many items per section (default 50)")
    p = sub.add_parser("requeue", help=COMMANDS["requeue"], description=COMMANDS["requeue"], parents=[common])
    p.add_argument("--quarantined", action="store_true", help="also requeue quarantined items (after fixing them)")
    p.add_argument("--failed", action="store_true", help="also retry failed items now instead of at their backoff time")
    p.add_argument("items", nargs="*", metavar="BLOB_OR_PATH", help="only these (blob names or local paths)")
    sub.add_parser("db-migrate", help=COMMANDS["db-migrate"], description=COMMANDS["db-migrate"], parents=[common])
    p = sub.add_parser(
        "migrate",
        help=COMMANDS["migrate"],
        description=COMMANDS["migrate"] + ". Exit code: 0 done, 1 some files failed or were quarantined, "
        "69 Azure or MySQL unavailable, 130 or 143 stopped by SIGINT or SIGTERM (run it again to continue).",
        parents=[common],
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (counts, bytes, what is in Blob) and change nothing"
    )
    p.add_argument(
        "--to-local",
        action="store_true",
        help="the way back: download every evicted file, verify it, and flip the DB pointers to local",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="with --to-local: say whether switching the backend to local is safe now, from every witness "
        "(state, container listing, DB pointers, assets); changes nothing; exit 0 safe, 1 not safe, 69 unavailable",
    )
    p.add_argument(
        "--include-unlisted",
        action="store_true",
        help="with --to-local: also restore files that GigHive's assets table has no row for although the agent "
        "never saw them deleted (after a lost state, or a cleared table refilled in part)",
    )
    p.add_argument("--root", action="append", default=[], metavar="NAME", help="only this media root (repeatable)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="process at most N files in this run")
    p.add_argument(
        "--concurrency", type=_concurrency, metavar="N", help="files in flight (default UPLOAD_FILE_CONCURRENCY)"
    )
    p.add_argument(
        "--bwlimit", type=_rate, metavar="RATE", help="bytes per second, e.g. 20M (default UPLOAD_BANDWIDTH_LIMIT)"
    )
    p.add_argument(
        "--evict-local",
        action="store_true",
        help="delete each local copy once its blob is verified and the DB points at it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    p = sub.add_parser(
        "verify",
        help=COMMANDS["verify"],
        description=COMMANDS["verify"] + ". Exit code: 0 all match, 1 a blob is missing or differs or a local "
        "file is corrupt, 69 Azure unavailable.",
        parents=[common],
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every uploaded file")
    which.add_argument("--sample", type=_positive_int, metavar="N", help="N files picked at random")
    p.add_argument("--root", action="append", default=[], metavar="NAME", help="only this media root (repeatable)")
    p.add_argument("--readback", action="store_true", help="also download each blob and hash it")
    p.add_argument("--seed", type=int, help="random seed for --sample (to repeat a sample)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    p = sub.add_parser(
        "reconcile",
        help=COMMANDS["reconcile"],
        description=COMMANDS["reconcile"] + ". Exit code: 0 the views agree (after safe repairs), 1 unsafe "
        "differences remain (listed), 69 Azure or MySQL unavailable.",
        parents=[common],
    )
    p.add_argument("--root", action="append", default=[], metavar="NAME", help="only this media root (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list the differences and repair nothing")
    p.add_argument(
        "--prune-orphans", action="store_true", help="delete orphan blobs (no local file, no assets row); needs --yes"
    )
    p.add_argument("--yes", action="store_true", help="confirm --prune-orphans")
    p.add_argument(
        "--accept-assets-shrink",
        action="store_true",
        help="the rows GigHive's assets table lost (many at once, or in a rebuild the agent saw) were deleted "
        "on purpose: trust it, and soft-delete their blobs",
    )
    p.add_argument(
        "--accept-state-lost",
        action="store_true",
        help="with --prune-orphans: orphan blobs written before the agent's state began (a lost or replaced "
        "state) are unwanted too, and may be deleted",
    )
    p = sub.add_parser("undelete", help=COMMANDS["undelete"], description=COMMANDS["undelete"], parents=[common])
    p.add_argument("items", nargs="+", metavar="BLOB_NAME", help="blob name, e.g. video/<sha256>.mp4")
    p = sub.add_parser(
        "fetch",
        help=COMMANDS["fetch"],
        description=COMMANDS["fetch"] + ". Exit code: 0 every file is on disk, 1 a file could not be fetched "
        "(not in Blob, or its blob does not match its name: nothing written), 69 Azure unavailable.",
        parents=[common],
    )
    p.add_argument("items", nargs="+", metavar="NAME", help="blob name (video/<sha>.mp4), URL path or local path")
    p.add_argument(
        "--keep-days",
        type=float,
        default=7.0,
        metavar="DAYS",
        help="keep the fetched files local this long before the eviction policy may take them again (default 7)",
    )
    sub.add_parser(
        "doctor",
        help=COMMANDS["doctor"],
        description=COMMANDS["doctor"] + ". Exit code: 0 all pass, 1 warnings, 2 a check failed, 78 bad config.",
        parents=[common],
    )
    p = sub.add_parser("serve", help=COMMANDS["serve"], description=COMMANDS["serve"], parents=[common])
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS",
        help="listen on HOST:PORT or unix:/path instead of the sockets systemd passes (repeatable; development)",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _concurrency(text: str) -> int:
    value = _positive_int(text)
    if value > 64:
        raise argparse.ArgumentTypeError(f"{value} is above the maximum of 64 files in flight")
    return value


def _rate(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 16 * 1024:
        raise argparse.ArgumentTypeError("below 16KiB/s uploads cannot finish a block before Azure times out")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "reconcile" and args.prune_orphans and not args.yes:
        parser.error("reconcile --prune-orphans deletes blobs: add --yes to confirm (try --dry-run first)")
    if args.command == "migrate" and args.to_local and args.evict_local:
        parser.error("migrate: --to-local and --evict-local contradict each other")
    if args.command == "migrate" and args.include_unlisted and not args.to_local:
        parser.error("migrate: --include-unlisted goes with --to-local")
    if args.command == "migrate" and args.check and not args.to_local:
        parser.error("migrate: --check goes with --to-local (is switching the backend to local safe?)")
    as_json = getattr(args, "json", False)
    config_path = getattr(args, "config", None)
    # Until the config is read, log to stderr at info so config errors are visible.
    logs.setup("info")
    try:
        config = load(config_path)
    except ConfigErrors as e:
        for err in e.errors:
            log.error("configuration error: %s", err, extra={"fields": {"config_variable": err.variable}})
        if args.command == "doctor":
            from .actions import doctor

            return doctor.config_failed(e, as_json)
        if as_json:
            print(json.dumps({"error": "configuration", "problems": [str(x) for x in e.errors]}, indent=2))
        return EXIT_CONFIG
    logs.setup(getattr(args, "log_level", None) or config.log_level)
    if args.command in INTERRUPTIBLE:
        interrupts.install(on_exit=_interrupted_json if as_json else None)

    try:
        become_service_user(args.command, config.state_dir)
        result, code = interrupts.guarded(dispatch, args, config)
    except AgentError as e:
        log.error("%s", e)
        if as_json:
            print(json.dumps({"error": type(e).__name__, "message": str(e)}, indent=2))
        return e.exit_code
    except KeyboardInterrupt:
        log.warning("interrupted; the next run continues where this one stopped")
        return 130
    except Exception:
        log.exception("internal error (a bug; please report it with this traceback)")
        return EXIT_SOFTWARE
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    elif args.command == "status":
        from .actions.status import render

        print(render(result))
    elif args.command == "doctor":
        from .actions.doctor import render_result

        print(render_result(result))
    elif args.command in ("migrate", "verify", "reconcile"):
        print(_render(args, result))
    elif args.command == "undelete":
        print(
            f"kept {len(result['undeleted'])} blob(s)"
            + "".join(f"\n  not soft-deleted: {n}" for n in result["not_soft_deleted"])
        )  # type: ignore[union-attr]
    elif args.command == "fetch":
        from .actions.fetch import render

        print(render(result))
    elif args.command in ("requeue", "db-migrate"):
        print(_one_line(args.command, result))
    return code


# Commands that move files or run long (whole-library checks, listings, downloads): a stop
# signal ends them within a second (agent/interrupts.py), not after their thread pools drain.
INTERRUPTIBLE = ("migrate", "upload", "retry", "verify", "reconcile", "fetch")


def _interrupted_json(code: int, signal_name: str) -> None:
    message = f"stopped by {signal_name}; run it again to continue"
    print(json.dumps({"error": "Interrupted", "message": message, "exit_code": code}, indent=2))


def dispatch(args: argparse.Namespace, config) -> tuple[dict[str, object], int]:
    command = args.command
    if command in ("migrate", "verify", "reconcile", "fetch") and not config.is_azure:
        raise ConfigError(
            "MEDIA_STORAGE_BACKEND",
            f"is local; `{command}` needs the azure_blob settings (for the way back, run "
            "`gighive-media migrate --to-local` before switching the backend to local)",
        )
    if command == "migrate":
        from .actions import migrate

        opts = migrate.Options(
            dry_run=args.dry_run,
            to_local=args.to_local,
            check=args.check,
            include_unlisted=args.include_unlisted,
            roots=tuple(args.root),
            limit=args.limit,
            concurrency=args.concurrency,
            bwlimit=args.bwlimit,
            evict_local=args.evict_local,
            interactive=False if args.no_progress or getattr(args, "json", False) else None,
        )
        return migrate.run(config, opts)
    if command == "verify":
        from .actions import migrate, verify

        roots = migrate.select_roots(config, tuple(args.root))
        interactive = False if args.no_progress or getattr(args, "json", False) else None
        return verify.run(config, roots, args.sample, args.readback, seed=args.seed, interactive=interactive)
    if command == "reconcile":
        from .actions import migrate, reconcile

        roots = migrate.select_roots(config, tuple(args.root))
        return reconcile.run(
            config,
            roots,
            prune_orphans=args.prune_orphans,
            dry_run=args.dry_run,
            accept_assets_shrink=args.accept_assets_shrink,
            accept_state_lost=args.accept_state_lost,
        )
    if command in ("upload", "retry") and not config.is_azure:
        log.info("MEDIA_STORAGE_BACKEND=local: media stays on local disk, nothing to upload")
        return {"backend": "local", "note": "nothing to do"}, EXIT_OK
    if command == "upload":
        from .actions import upload

        return upload.run(config, watch=not args.no_watch, idle_exit=args.idle_exit), EXIT_OK
    if command == "retry":
        from .actions import retry

        return retry.run(config), EXIT_OK
    if command == "status":
        from .actions import status

        result = status.run(config, limit=args.limit)
        counts = result.get("counts") or {}
        needs_attention = bool(counts.get("dead") or counts.get("quarantined"))  # type: ignore[union-attr]
        return result, EXIT_FAILURE if needs_attention else EXIT_OK
    if command == "requeue":
        from .actions import requeue

        states = ["dead"] + (["quarantined"] if args.quarantined else []) + (["failed"] if args.failed else [])
        return requeue.run(config, states, args.items), EXIT_OK
    if command == "db-migrate":
        from .actions import db_migrate

        return db_migrate.run(config), EXIT_OK
    if command == "undelete":
        from . import deletes
        from .context import queue_worker

        with queue_worker(config, wait_for_lock=True) as worker:
            kept = deletes.undelete(worker.state, [i.lstrip("/") for i in args.items])
        missing = [i for i in args.items if i.lstrip("/") not in kept]
        return {"undeleted": kept, "not_soft_deleted": missing}, EXIT_FAILURE if missing else EXIT_OK
    if command == "fetch":
        from .actions import fetch

        return fetch.run(config, args.items, args.keep_days)
    if command == "doctor":
        from .actions import doctor

        return doctor.run(config)
    if command == "serve":
        from .stream import run as serve

        return {"command": "serve"}, serve(config, listen=args.listen)
    raise AssertionError(f"unhandled command {command}")


def _render(args: argparse.Namespace, result: dict[str, object]) -> str:
    if args.command == "migrate":
        from .actions import migrate, migrate_back

        return migrate_back.render(result) if result.get("to_local") else migrate.render(result)
    if args.command == "verify":
        from .actions import verify

        return verify.render(result)
    from .actions import reconcile

    return reconcile.render(result)


def _one_line(command: str, result: dict[str, object]) -> str:
    if command == "requeue":
        return f"requeued {result.get('requeued', 0)} item(s)"
    changes = result.get("changes") or []
    return "db pointer table is up to date" if not changes else "; ".join(map(str, changes))


if __name__ == "__main__":
    sys.exit(main())
