"""Figures a fault test measured (counts, status distribution, RSS), for docs/reliability.md.

Printed (pytest -s shows them) and, with GIGHIVE_FAULTS_FIGURES=<file>, appended to that file as
one JSON object per line, so a run's figures can be collected without scraping output.
"""

from __future__ import annotations

import json
import os


def record(scenario: str, figures: dict[str, object]) -> None:
    line = json.dumps({"scenario": scenario, **figures}, sort_keys=True, default=str)
    print(f"FIGURES {line}")
    path = os.environ.get("GIGHIVE_FAULTS_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
