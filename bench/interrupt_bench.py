#!/usr/bin/env python3
"""How long a stop takes: the time from SIGINT (or SIGTERM) to the agent's exit, per situation.

The situations are those of tests/integration/test_interrupts.py (the same code puts the agent
there, against one Azurite through tests/faults/faultproxy.py, and signals it once a state says it
is there): a rate-limit wait (`migrate --bwlimit 128K`), a slow link (64 KiB/s, a Put Block on the
wire), files smaller than a block (one Put Blob on a 32 KiB/s link), a request that hangs mid-body,
the SDK retrying 503s, `upload` on a slow link, `upload` watching idle, `retry` while the SDK
retries, `migrate --to-local` mid-download, `verify --all` with its requests unanswered,
`verify --all --readback` on a slow link, `reconcile` with its listing unanswered, and `fetch`
mid-download. Per case: --tries runs, each with a fresh
library, container and state; median and max of the signal-to-exit time, and the exit codes.

--agent-tree runs the agent from another source tree (e.g. `git archive` of a commit before the
fix) with this tree's harness, for a before/after comparison. A run still going after --guard
seconds is killed and counted as "hung".

    .venv/bin/python bench/interrupt_bench.py --tries 5
    .venv/bin/python bench/interrupt_bench.py --tries 3 --agent-tree /tmp/before --out /tmp/before-results

Results: bench/results/interrupts.{json,md}; docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import tests.integration.agent_harness as agent_harness  # noqa: E402
import tests.integration.test_interrupts as cases  # noqa: E402
from tests.support.azurite import Azurite  # noqa: E402

CASES = {
    "rate-limit wait (migrate --bwlimit 128K)": cases.case_rate_limit,
    "slow link, Put Block on the wire (migrate)": cases.case_slow_link,
    "file smaller than a block, Put Blob on the wire (migrate)": cases.case_small_files,
    "request hung mid-body (migrate)": cases.case_hung_request,
    "SDK retrying 503s (migrate)": cases.case_sdk_retrying,
    "slow link (upload --no-watch)": cases.case_upload_slow_link,
    "watching, idle (upload)": cases.case_upload_idle,
    "SDK retrying 503s (retry)": cases.case_retry_sdk_retrying,
    "mid-download (migrate --to-local)": cases.case_to_local,
    "requests held, no answer (verify --all)": cases.case_verify_held,
    "slow link, a download on the wire (verify --all --readback)": cases.case_verify_readback_slow_link,
    "container listing held, queue lock taken (reconcile)": cases.case_reconcile_held,
    "mid-download (fetch)": cases.case_fetch_slow_link,
}


def machine() -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg(),
    }


def one_try(azurite: Azurite, case, sig: signal.Signals) -> tuple[float | None, int | None]:
    tmp = Path(tempfile.mkdtemp(prefix="gighive-interrupt-bench-"))
    container = cases.fresh_container(azurite)
    try:
        with contextlib.contextmanager(cases.make_setup)(azurite, tmp, container) as setup:
            try:
                out, _files = case(setup, sig)
            except AssertionError as e:
                if "still running" in str(e):
                    return None, None
                # The agent never got where the case signals it (e.g. Azurite stalled): no figure.
                print(f"  try skipped: {str(e)[:500]}", flush=True)
                return None, -1
            return out.seconds, out.code
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        container.delete_container()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tries", type=int, default=5, help="runs per case (default 5)")
    ap.add_argument("--signal", choices=("INT", "TERM"), default="INT")
    ap.add_argument("--guard", type=float, default=60.0, help="seconds before a run counts as hung (default 60)")
    ap.add_argument("--agent-tree", type=Path, help="run the agent from this source tree instead of this one")
    ap.add_argument("--only", help="only cases whose name contains this text (or one of these, comma-separated)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="directory for interrupts.{json,md}")
    args = ap.parse_args()
    sig = signal.Signals[f"SIG{args.signal}"]
    cases.HANG_GUARD_S = args.guard
    if args.agent_tree is not None:
        agent_harness.REPO = args.agent_tree.resolve()
    tree = str(agent_harness.REPO)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    results: dict[str, dict[str, object]] = {}
    with Azurite(Path(tempfile.mkdtemp(prefix="gighive-interrupt-azurite-"))) as azurite:
        for name, case in CASES.items():
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            times: list[float] = []
            codes: list[int | None] = []
            hung = skipped = 0
            for _ in range(args.tries):
                seconds, code = one_try(azurite, case, sig)
                if code == -1:
                    skipped += 1
                    continue
                if seconds is None:
                    hung += 1
                else:
                    times.append(seconds)
                codes.append(code)
            results[name] = {
                "tries": args.tries,
                "median_s": round(statistics.median(times), 3) if times else None,
                "max_s": round(max(times), 3) if times else None,
                "hung": hung,
                "skipped": skipped,
                "exit_codes": sorted({c for c in codes if c is not None}),
                "times_s": [round(t, 3) for t in times],
            }
            r = results[name]
            print(
                f"{name:<60} median {r['median_s']} s, max {r['max_s']} s, hung {hung}/{args.tries}, "
                f"skipped {skipped}, exit {r['exit_codes']}",
                flush=True,
            )
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(),
        "agent_tree": tree,
        "signal": sig.name,
        "guard_s": args.guard,
        "machine": machine(),
        "cases": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "interrupts.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Signal-to-exit times, {sig.name}, {args.tries} tries per case ({report['date']}, commit "
        f"{report['commit']}, agent from {tree}; {report['machine']['cpus']} CPUs, "
        f"{report['machine']['cpu_model']})",
        "",
        "| Situation | median | max | hung (> guard) | exit codes |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        med = "-" if r["median_s"] is None else f"{r['median_s']:.2f} s"
        mx = "-" if r["max_s"] is None else f"{r['max_s']:.2f} s"
        lines.append(f"| {name} | {med} | {mx} | {r['hung']}/{r['tries']} | {r['exit_codes']} |")
    (args.out / "interrupts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"done in {time.monotonic() - started:.0f} s")
    sys.exit(code)
