#!/usr/bin/env python3
"""Memory of the commands that read the whole library, this code beside an earlier revision.

`migrate --dry-run` (state kept, and state lost: it lists), `migrate` with nothing to do and
`verify --all` each hold something per file: walk results, state rows, the container listing.
This measures their peak RSS and wall time at several library sizes, each command run by the
code of this checkout and by the code of `--baseline` (a git revision, its `agent/` unpacked
into the work directory) against the same Azurite container, state and files, alternating, so
the ratio is this code's against the earlier one's on the same machine in the same minutes.

The container is filled straight with Put Blob (the agent's names, Content-MD5 and sha256
metadata, as an upload writes them), not through `migrate`: Azurite's in-memory store slows
with every blob it holds (about 350 puts/s empty, 30/s at 40,000), and the agent's own upload
is not what is measured here. Each size's library is the first N files of the walk, as hard
links (same inode, size and mtime), and its state is built by a `migrate` of this code that
finds every file already in Blob (it verifies and records them; nothing is sent).

    .venv/bin/python bench/listing_memory.py --sizes 10000,40000 --baseline d8e84bc \\
        --out bench/results/listing-memory

`--seed-store` gives Azurite its container by writing its on-disk store instead (bench/azurite_seed.py):
even the direct Put Blob is quadratic in Azurite 3.35 (each put scans the whole container), so a
100,000-blob fill never finishes. Azurite then runs on that store (`--location`, not in memory)
and serves every listing and read of the measurement itself; the seeded container is checked
through its API (the full listing against every file's size, MD5 and SHA-256, and a sample of
GETs compared byte for byte and HEADs) before anything is measured.

    nice -n 10 .venv/bin/python bench/listing_memory.py --sizes 100000 --baseline d8e84bc \\
        --seed-store --out bench/results/listing-memory-100k

`--run DIR` reuses the Azurite and MariaDB of an earlier `--hold` run (its agent.env and
filled container) instead of starting and filling new ones.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import azurite_seed  # noqa: E402
from azure.storage.blob import BlobServiceClient, ContentSettings  # noqa: E402
from migrate_bench import agent_config, cpu_model, make_library  # noqa: E402

from agent import config as agent_config_module  # noqa: E402
from agent.actions.migrate import _walk  # noqa: E402
from agent.scan import ScanReport  # noqa: E402
from tests.support.azurite import Azurite  # noqa: E402
from tests.support.mariadb import MariaDB  # noqa: E402
from tests.support.rusage import measure  # noqa: E402

PYTHON = str(REPO / ".venv" / "bin" / "python")
MAIN = "import sys; from agent.cli import main; sys.exit(main())"
# name for --commands: (label in the results, which config: "sub" has a state, "lost" none, argv).
COMMANDS = {
    "dry-run": ("dry run, state kept", "sub", ("migrate", "--dry-run")),
    "dry-run-lost": ("dry run, state lost (lists)", "lost", ("migrate", "--dry-run")),
    "migrate": ("migrate, nothing to do", "sub", ("migrate", "--no-progress")),
    "verify": ("verify --all", "sub", ("verify", "--all", "--no-progress")),
    # The two that hold the whole container listing (agent.inventory.list_roots), run only in
    # their read-only forms: a benchmark must not repair, restore or set the way back's hold.
    # The way back's dry run (migrate_back.plan) opens the state read-only and needs neither the
    # units stopped nor a hold, so nothing has to be arranged for it.
    "reconcile": ("reconcile --dry-run", "sub", ("reconcile", "--dry-run")),
    "to-local": ("migrate --to-local --dry-run", "sub", ("migrate", "--to-local", "--dry-run")),
}
DEFAULT_COMMANDS = "dry-run,dry-run-lost,migrate,verify"
LISTING_COMMANDS = ("reconcile", "to-local")


def walk(env_file: Path) -> list[tuple[str, Path]]:
    """(blob name, path) of every file of the configured roots, in the agent's walk order."""
    config = agent_config_module.load(env_file, environ={})
    return [(mf.blob_name, mf.path) for mf, _st in _walk(config.roots, ScanReport())]


def fill(connection_string: str, files: list[tuple[str, Path]]) -> float:
    """Put every file into container `agent` as the agent stores it; seconds taken."""
    container = BlobServiceClient.from_connection_string(connection_string).get_container_client("agent")

    def put(item: tuple[str, Path]) -> None:
        name, path = item
        data = path.read_bytes()
        container.upload_blob(
            name,
            data,
            overwrite=True,
            metadata={"sha256": hashlib.sha256(data).hexdigest()},
            content_settings=ContentSettings(content_md5=hashlib.md5(data).digest()),  # noqa: S324 - Content-MD5
        )

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        for done, _ in enumerate(pool.map(put, files), 1):
            if done % 5000 == 0:
                print(f"filled {done:,} blobs in {time.monotonic() - started:.0f} s", flush=True)
    return time.monotonic() - started


def seed_store(azurite: Azurite, files: list[tuple[str, Path]]) -> tuple[float, dict[str, int]]:
    """Stop Azurite, write every file into its store as `fill` would put it, start and check it."""
    started = time.monotonic()
    azurite.stop()
    sums = azurite_seed.seed(azurite.location, "agent", files)
    azurite.start()
    seeded = time.monotonic() - started
    print(f"seeded {len(files):,} blobs in {seeded:.0f} s; checking them through Azurite", flush=True)
    checked = azurite_seed.check(azurite.connection_string, "agent", sums, files)
    print(f"checked: {checked}", flush=True)
    return seeded, checked


def unpack_agent(rev: str, dest: Path) -> Path:
    """The `agent/` package of revision `rev`, unpacked under dest (what PYTHONPATH points at)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "agent"], check=True, capture_output=True)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def sub_library(files: list[tuple[str, Path]], n: int, run: Path, base_env: Path) -> tuple[Path, Path]:
    """Hard links to the first n files, and two configs for them: with a state, and with none."""
    library = run / f"lib-{n}"
    for name, path in files[:n]:
        target = library / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    for root in ("audio", "video"):
        (library / root).mkdir(parents=True, exist_ok=True)
    text = base_env.read_text()
    roots = next(line for line in text.splitlines() if line.startswith("MEDIA_ROOTS="))
    old = Path(dict(item.split("=", 1) for item in roots.split("=", 1)[1].split(","))["audio"]).parent
    out = []
    for tag in ("sub", "lost"):
        lines = [
            line
            for line in text.replace(str(old), str(library)).splitlines()
            if not line.startswith("GIGHIVE_MEDIA_STATE_DIR=")
        ]
        lines.append(f"GIGHIVE_MEDIA_STATE_DIR={run / f'state-{n}-{tag}'}")
        path = run / f"{tag}-{n}.env"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        out.append(path)
    return out[0], out[1]


def run_agent(code: Path, env_file: Path, args: tuple[str, ...], log: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "UPLOAD_"))}
    env["PYTHONPATH"] = str(code)
    # -P: the working directory (this checkout, often) must not shadow PYTHONPATH's agent/.
    u = measure([PYTHON, "-P", "-c", MAIN, "--config", str(env_file), "--json", *args], env, log)
    return {"exit": u.exit, "wall_s": round(u.wall, 2), "max_rss_mib": round(u.maxrss_kib / 1024, 1)}


def json_result(log: Path) -> dict[str, object]:
    """The --json answer a command printed into its log (after its log lines)."""
    text = log.read_text()
    start = text.find("\n{\n") + 1 if not text.startswith("{") else 0
    return json.JSONDecoder().raw_decode(text[start:])[0]


def check_read_only(key: str, log: Path, n: int) -> dict[str, object]:
    """What a listing command's dry run reported, refused unless it changed nothing and saw every blob.

    A peak RSS is only worth recording for a run that listed the whole container; and a dry run
    that says it repaired something would mean the library under measurement was altered.
    """
    out = json_result(log)
    if out.get("dry_run") is not True:
        raise SystemExit(f"{key}: not a dry run according to its own answer; see {log}")
    if key == "reconcile":
        if out["blobs"] != n or out["repaired"] != 0 or out["unsafe"] or out["repairs"]:
            raise SystemExit(f"reconcile --dry-run saw {out['blobs']} blobs, repairs {out['repairs']!r}; see {log}")
        return {"blobs": out["blobs"], "local_files": out["local_files"], "pointer_rows": out["pointer_rows"]}
    if out["evicted"] != 0 or out.get("unverifiable"):
        raise SystemExit(f"migrate --to-local --dry-run would restore {out['evicted']} file(s); see {log}")
    return {"would_restore": out["evicted"], "left_in_blob": out["left_in_blob"], "unlisted": out["unlisted"]}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def listing_entry_bytes(env_file: Path) -> dict[str, object]:
    """What one entry of list_roots' dict (a Listed and its name key) costs; run by `--entry-cost`
    in a fresh process, so that no memory freed earlier is there for the listing to reuse.

    Measured twice over the same container: the RSS growth while the dict is built and kept
    (what the operating system sees, allocator slack and the listing threads included), and
    tracemalloc's count of the bytes still allocated once it is built (Python objects only).
    The sys.getsizeof parts of one entry say where the bytes go. Then, by tracemalloc, the other
    per-file collections reconcile and the way back hold beside the listing: the walk's stats,
    the state's records and the DB pointers, so the listing's share of their peak can be read.
    """
    import gc
    import tracemalloc

    from agent.inventory import list_roots
    from agent.pointer import PointerDB
    from agent.scan import walk_root
    from agent.state import StateStore
    from agent.storage.azure_blob import AzureBlobStore

    config = agent_config_module.load(env_file, environ={})
    store = AzureBlobStore(config)
    names = [r.name for r in config.roots]
    # Warm (the SDK's modules, the connection) on one small page only: a whole listing built and
    # freed first would leave its memory to the allocator, and the growth measured next would reuse it.
    next(store.list_entries(f"{names[0]}/", page_size=10), None)
    gc.collect()
    before = rss_bytes()
    started = time.monotonic()
    listing = list_roots(store, names)
    wall = time.monotonic() - started
    rss_growth = rss_bytes() - before
    count = len(listing)
    name, entry = next(iter(listing.items()))
    fields = [entry.size, entry.etag, entry.content_md5, entry.sha256, entry.last_modified]
    parts = {
        "name_str": sys.getsizeof(name),
        "listed_tuple": sys.getsizeof(entry),
        # Small ints are shared singletons in CPython; a blob's size is not small.
        "fields": sum(sys.getsizeof(f) for f in fields if f is not None),
        "dict_slot": round(sys.getsizeof(listing) / count, 1),
    }
    del listing, name, entry, fields
    gc.collect()

    def traced(build) -> tuple[int, int]:
        """(bytes held once built, entries) of what build() returns, by tracemalloc."""
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        built = build()
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        return held, len(built)

    state = StateStore.open_readonly(config.state_dir)
    db = PointerDB(config.mysql)
    try:
        others = {
            "listing (list_roots)": traced(lambda: list_roots(store, names)),
            "walk: blob name -> os.stat_result (reconcile)": traced(
                lambda: {mf.blob_name: st for root in config.roots for mf, st in walk_root(root, ScanReport())}
            ),
            "state: blob name -> FileRecord": traced(lambda: {r.blob_name: r for r in state.records()}),
            "DB: path -> Location": traced(db.locations),
        }
    finally:
        state.close()
        db.close()
    held = others["listing (list_roots)"][0]
    return {
        "entries": count,
        "list_seconds": round(wall, 1),
        "rss_growth_mib": round(rss_growth / 2**20, 1),
        "rss_bytes_per_entry": round(rss_growth / count),
        "traced_held_mib": round(held / 2**20, 1),
        "traced_bytes_per_entry": round(held / count),
        "getsizeof_parts": parts,
        "getsizeof_bytes_per_entry": round(sum(parts.values())),
        "per_file_collections": {
            k: {"entries": c, "mib": round(b / 2**20, 1), "bytes_per_entry": round(b / max(c, 1))}
            for k, (b, c) in others.items()
        },
    }


def entry_cost_in_child(env_file: Path) -> dict[str, object]:
    done = subprocess.run(
        [PYTHON, str(Path(__file__).resolve()), "--entry-cost", str(env_file)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,40000", help="library sizes, comma-separated")
    ap.add_argument("--baseline", default="d8e84bc", help="git revision whose agent/ is measured beside this one")
    ap.add_argument("--reps", type=int, default=2, help="runs of each command by each code at each size")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gighive-listing-memory")
    ap.add_argument(
        "--seed-store", action="store_true", help="write Azurite's on-disk store instead of filling it with Put Blob"
    )
    ap.add_argument("--run", type=Path, help="reuse this run directory's live Azurite, MariaDB and container")
    ap.add_argument("--hold", action="store_true", help="keep Azurite and MariaDB up afterwards, until RUN/stop exists")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "listing-memory")
    ap.add_argument(
        "--commands",
        default=DEFAULT_COMMANDS,
        help=f"which commands, comma-separated, of {', '.join(COMMANDS)} (default {DEFAULT_COMMANDS}); "
        f"{' and '.join(LISTING_COMMANDS)} are dry runs that hold the whole container listing",
    )
    ap.add_argument("--entry-cost", type=Path, help=argparse.SUPPRESS)  # the child entry_cost_in_child starts
    args = ap.parse_args()
    if args.entry_cost is not None:
        print(json.dumps(listing_entry_bytes(args.entry_cost)))
        return 0
    sizes = sorted(int(s) for s in args.sizes.split(","))
    chosen = [c.strip() for c in args.commands.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in COMMANDS]
    if unknown or not chosen:
        ap.error(f"--commands: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(COMMANDS)}")
    commands = [(key, *COMMANDS[key]) for key in chosen]
    entry_cost = None
    load_at_start = os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    services: list[object] = []
    try:
        if args.run is not None:
            run = args.run
            base_env = run / "agent.env"
            files = walk(base_env)
            filled_s = None
            checked = None
        else:
            run = Path(tempfile.mkdtemp(prefix="run-", dir=args.work))
            library = args.work / f"library-{sizes[-1]}-{args.seed}"
            if not library.exists():
                make_library(library, sizes[-1], 0, args.seed)
            azurite = Azurite(run / "azurite", in_memory=not args.seed_store).start()
            services.append(azurite)
            db = MariaDB(run / "mariadb").start()
            services.append(db)
            if args.seed_store:
                azurite_seed.prepare(azurite.connection_string, "agent")
            else:
                BlobServiceClient.from_connection_string(azurite.connection_string).create_container("agent")
            base_env = agent_config(run / "agent.env", azurite, db, "agent", library, run / "state", 8)
            exe = str(REPO / ".venv" / "bin" / "gighive-media")
            subprocess.run([exe, "--config", str(base_env), "db-migrate"], check=True, capture_output=True)
            files = walk(base_env)
            if args.seed_store:
                seeded_s, checked = seed_store(azurite, files[: sizes[-1]])
                filled_s = round(seeded_s, 1)
            else:
                filled_s, checked = round(fill(azurite.connection_string, files[: sizes[-1]]), 1), None
        if len(files) < sizes[-1]:
            raise SystemExit(f"the library has {len(files)} files, fewer than {sizes[-1]}")
        codes = {
            "baseline": unpack_agent(args.baseline, run / f"baseline-{args.baseline}"),
            "this": REPO,
        }
        results: list[dict[str, object]] = []
        for n in sizes:
            sub, lost = sub_library(files, n, run, base_env)
            adopt = run_agent(REPO, sub, ("migrate", "--no-progress"), run / f"adopt-{n}.log")
            if adopt["exit"] != 0:
                raise SystemExit(f"building the state of {n} files failed; see {run / f'adopt-{n}.log'}")
            for key, label, which, argv in commands:
                env_file = sub if which == "sub" else lost
                for rep in range(args.reps):
                    for code_name, code in codes.items():
                        log = run / f"{n}-{label.replace(' ', '_')}-{code_name}-{rep}.log"
                        r = run_agent(code, env_file, argv, log)
                        if r["exit"] != 0:
                            raise SystemExit(f"{label} ({code_name}) exited {r['exit']}; see {log}")
                        if key in LISTING_COMMANDS:
                            r["answer"] = check_read_only(key, log, n)
                        results.append({"files": n, "command": label, "code": code_name, "rep": rep + 1, **r})
                        print(json.dumps(results[-1]), flush=True)
        if any(key in LISTING_COMMANDS for key in chosen):
            # At the largest size, against the same container, while Azurite still runs.
            entry_cost = entry_cost_in_child(sub)  # sub: the largest size's config, from the last round
            print(json.dumps({"listing_entry": entry_cost}), flush=True)
    finally:
        if args.hold and services:
            print(f"holding until {run / 'stop'} exists", flush=True)
            while not (run / "stop").exists():
                time.sleep(5)
        for s in reversed(services):
            s.stop()  # type: ignore[attr-defined]

    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "baseline": args.baseline,
        "head": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "load_at_start": list(load_at_start),
        },
        "fill": "seeded store (bench/azurite_seed.py)" if args.seed_store else "Put Blob",
        "fill_seconds": filled_s,
        "seed_check": checked,
        "load_at_end": list(os.getloadavg()),
        "commands": chosen,
        "listing_entry": entry_cost,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# Peak RSS of the whole-library commands: {summary['head']} beside {args.baseline}",
        "",
        f"machine: {os.cpu_count()} CPUs ({cpu_model()}), load average {load_at_start[0]:.2f} at the start, "
        f"{summary['load_at_end'][0]:.2f} at the end (1 min); "
        f"{args.reps} run(s) of each, alternating; MiB is the highest peak RSS of the runs, s the median wall time; "
        f"container: {summary['fill']}",
        "",
        f"| files | command | {args.baseline} MiB | this MiB | ratio | {args.baseline} s | this s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        for _key, label, _which, _argv in commands:

            def pick(code: str, key: str, n: int = n, label: str = label) -> list[float]:
                return sorted(
                    float(r[key]) for r in results if r["files"] == n and r["command"] == label and r["code"] == code
                )

            b, t = max(pick("baseline", "max_rss_mib")), max(pick("this", "max_rss_mib"))
            bw, tw = pick("baseline", "wall_s"), pick("this", "wall_s")
            walls = f"{bw[len(bw) // 2]:.1f} | {tw[len(tw) // 2]:.1f}"
            lines.append(f"| {n:,} | {label} | {b:.0f} | {t:.0f} | {t / b:.2f} | {walls} |")
    if entry_cost is not None:
        lines += [
            "",
            f"one entry of list_roots' dict (a Listed and its name key), {entry_cost['entries']:,} entries, "
            f"measured in a fresh process: {entry_cost['traced_bytes_per_entry']} bytes by tracemalloc "
            f"({entry_cost['traced_held_mib']} MiB held), {entry_cost['rss_bytes_per_entry']} bytes of RSS growth "
            f"({entry_cost['rss_growth_mib']} MiB), {entry_cost['getsizeof_bytes_per_entry']} "
            f"by sys.getsizeof of its parts {entry_cost['getsizeof_parts']}",
            "",
            "the per-file collections reconcile and the way back hold, each built alone (tracemalloc):",
            "",
            "| collection | entries | MiB | bytes each |",
            "|---|---:|---:|---:|",
        ]
        for what, c in entry_cost["per_file_collections"].items():  # type: ignore[union-attr]
            lines.append(f"| {what} | {c['entries']:,} | {c['mib']} | {c['bytes_per_entry']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
