"""`gighive-media doctor`: run every preflight check; the checks live in agent/doctor/."""

from __future__ import annotations

import json

from ..config import Config
from ..doctor import EXIT_CODES, FAIL, Check, render, run_checks, worst
from ..errors import EXIT_CONFIG, ConfigErrors


def run(config: Config) -> tuple[dict[str, object], int]:
    checks = run_checks(config)
    status = worst(checks)
    code = EXIT_CODES[status]
    return {"result": status, "exit_code": code, "checks": [c.as_dict() for c in checks]}, code


def render_result(result: dict[str, object]) -> str:
    checks = [Check(**{k: v for k, v in c.items()}) for c in result["checks"]]  # type: ignore[union-attr]
    return render(checks)


def config_failed(errors: ConfigErrors, as_json: bool) -> int:
    """Invalid configuration: one FAIL naming every bad variable, nothing else checked, exit 78."""
    problems = [str(e) for e in errors.errors]
    check = Check(
        "config",
        FAIL,
        "; ".join(problems),
        "fix each variable named above in agent.env, then run again",
        {"problems": problems},
    )
    if as_json:
        print(json.dumps({"result": FAIL, "exit_code": EXIT_CONFIG, "checks": [check.as_dict()]}, indent=2))
    else:
        print(render([check]))
    return EXIT_CONFIG
