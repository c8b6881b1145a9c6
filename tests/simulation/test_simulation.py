"""Proof by simulation (issue 11, part 7): random interleavings of GigHive's actions, the agent's
commands and faults, against real files, Azurite, MariaDB and the stream server.

CI runs a bounded, reproducible slice: EXAMPLES examples of at most STEPS steps each, derandomized
(the same steps on every run), no shrinking (each shrink step replays real services; the long run
in bench/simulate.py can shrink). GIGHIVE_SIM_EXAMPLES / GIGHIVE_SIM_STEPS change the bound.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.simulation.machine import STATS, Simulation

EXAMPLES = int(os.environ.get("GIGHIVE_SIM_EXAMPLES", "12"))
STEPS = int(os.environ.get("GIGHIVE_SIM_STEPS", "25"))

CI_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


def test_simulation(world) -> None:
    Simulation.world = world
    before = dict(STATS)
    try:
        run_state_machine_as_test(Simulation, settings=CI_SETTINGS)
    finally:
        done = {k: STATS[k] - before[k] for k in STATS}
        print(f"\n[simulation] examples<={EXAMPLES} steps<={STEPS} " + " ".join(f"{k}={v}" for k, v in done.items()))
