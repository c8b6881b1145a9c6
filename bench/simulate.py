#!/usr/bin/env python3
"""The long run of the simulation (tests/simulation): many seeded examples, failures recorded, not fatal.

Each example is one hypothesis run of the state machine (tests/simulation/machine.py) with its
own seed: a fresh host, then up to --example-steps random steps (GigHive's actions, the agent's
commands, kills, power cuts, races, lost responses, outages), the invariants checked after every
step. A failing example is recorded with its seed, the class of failure (Violation.kind) and the
steps that led to it, and the run goes on with the next seed until --steps steps have run.

    .venv/bin/python bench/simulate.py --steps 100000 --seed 1 --json > bench/results/simulate.json

Repeat one example: --seed <its seed> --examples 1 (add --shrink for hypothesis' minimal steps).
Starts its own Azurite and MariaDB (tests/support), in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis import seed as use_seed  # noqa: E402
from hypothesis.stateful import get_state_machine_test  # noqa: E402

from tests.simulation.machine import STATS, BudgetReached, Simulation, Violation  # noqa: E402
from tests.simulation.world import World  # noqa: E402
from tests.support.azurite import Azurite  # noqa: E402
from tests.support.mariadb import MariaDB  # noqa: E402


def run_seed(run_seed: int, budget: int, steps: int, max_examples: int | None, shrink: bool) -> dict | None:
    """Examples from one hypothesis seed until one fails or the step budget is used up; None if
    every invariant held, else what failed."""
    phases = (Phase.explicit, Phase.generate, *((Phase.shrink,) if shrink else ()))
    s = settings(
        max_examples=max_examples or 10**6,
        stateful_step_count=steps,
        database=None,
        deadline=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    test = use_seed(run_seed)(get_state_machine_test(Simulation, settings=s))
    report = io.StringIO()
    Simulation.step_budget = budget
    try:
        with contextlib.redirect_stdout(report):
            test()
    except BudgetReached:
        return None
    except Violation as e:
        return {"kind": e.kind, "detail": str(e), "steps": _steps(e, report.getvalue())}
    except Exception as e:  # noqa: BLE001 - the harness itself broke: record it, go on
        if _budget_end(e):
            return None
        return {
            "kind": f"harness:{type(e).__name__}",
            "detail": str(e)[:2000],
            "steps": _steps(e, report.getvalue()),
            "traceback": traceback.format_exc()[-4000:],
        }
    finally:
        Simulation.step_budget = None
    return None


def _budget_end(e: BaseException) -> bool:
    """Hypothesis sometimes reports the BudgetReached that ends a run as its own error (a test
    case that "stopped drawing earlier" than the one before): that is the end of the budget, not
    a failure."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, BudgetReached):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _steps(e: BaseException, printed: str) -> list[str]:
    notes = [n for n in getattr(e, "__notes__", []) if n.startswith(("state.", "@reproduce"))]
    lines = [ln.strip() for ln in printed.splitlines() if ln.strip().startswith("state.")]
    return [ln for ln in (notes or lines) if not ln.endswith("every_wanted_file_is_readable_and_served()")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="total steps to run (default 1000)")
    p.add_argument(
        "--seed", type=int, default=1, help="hypothesis seed of the run; after a failure the run goes on with seed+1"
    )
    p.add_argument("--example-steps", type=int, default=40, help="steps per example at most (default 40)")
    p.add_argument("--examples", type=int, help="at most this many examples per seed (repeat one failure: 1)")
    p.add_argument("--shrink", action="store_true", help="shrink failing examples to minimal steps (slow)")
    p.add_argument(
        "--without",
        default="",
        metavar="RULES",
        help="leave these out (comma-separated: upload, retry, migrate, migrate_evict, to_local, verify, "
        "reconcile, prune, truncate, lose_state, outage), to look past failures already known",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--progress", type=Path, help="rewrite this file with the figures after every example")
    args = p.parse_args(argv)

    started = time.monotonic()
    failures: list[dict] = []
    seeds = 0
    with tempfile.TemporaryDirectory(prefix="gighive-sim-") as tmp:
        base = Path(tmp)
        azurite = Azurite(base / "azurite").start()
        mariadb = MariaDB(base / "mariadb").start()
        world = World(base / "world", azurite, mariadb)
        Simulation.world = world
        Simulation.disabled = frozenset(x for x in args.without.split(",") if x)
        stop = threading.Event()
        if args.progress:
            # A seed that finds nothing runs until the budget: report the figures meanwhile too.
            def report_progress() -> None:
                while not stop.wait(20):
                    figures = _figures(args, seeds, failures, time.monotonic() - started)
                    args.progress.write_text(json.dumps(figures, indent=2))

            threading.Thread(target=report_progress, daemon=True).start()
        try:
            while STATS["steps"] < args.steps:
                run_seed_value = args.seed + seeds
                before = STATS["examples"]
                failure = run_seed(run_seed_value, args.steps, args.example_steps, args.examples, args.shrink)
                seeds += 1
                if failure is not None:
                    failure["seed"] = run_seed_value
                    failure["example"] = STATS["examples"] - before
                    failures.append(failure)
                    print(f"[simulate] seed {run_seed_value}: {failure['detail'][:300]}", file=sys.stderr)
                figures = _figures(args, seeds, failures, time.monotonic() - started)
                if args.progress:
                    args.progress.write_text(json.dumps(figures, indent=2))
                if failure is None and args.examples is not None:
                    break
        finally:
            stop.set()
            world.close()
            mariadb.cleanup()
            azurite.stop()
    figures = _figures(args, seeds, failures, time.monotonic() - started)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(
            f"steps {figures['steps']}, examples {figures['examples']}, seeds {seeds}, "
            f"invariant checks {figures['invariant_checks']}, "
            f"failures {len(failures)} in {figures['seconds']:.0f} s ({figures['steps_per_second']:.2f} steps/s)"
        )
        for kind, seeds in figures["failure_seeds_by_kind"].items():
            print(f"  {kind}: seeds {', '.join(map(str, seeds))}")
    return 1 if failures else 0


def _figures(args, seeds: int, failures: list[dict], seconds: float) -> dict:
    by_kind: dict[str, list[int]] = {}
    for f in failures:
        by_kind.setdefault(f["kind"], []).append(f["seed"])
    return {
        "first_seed": args.seed,
        "without": args.without,
        "example_steps": args.example_steps,
        "seeds": seeds,
        **STATS,
        "seconds": round(seconds, 1),
        "steps_per_second": round(STATS["steps"] / seconds, 3) if seconds else 0.0,
        "failures": len(failures),
        "failure_seeds_by_kind": by_kind,
        "failure_details": failures,
    }


if __name__ == "__main__":
    sys.exit(main())
