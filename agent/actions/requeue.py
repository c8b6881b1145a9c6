"""`gighive-media requeue`: give dead (or quarantined, or failed) items a fresh set of attempts."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..errors import AgentError
from ..media import media_file_for_path
from ..state import StateStore


def run(config: Config, states: list[str], items: list[str]) -> dict[str, object]:
    state = StateStore.open_existing(config.state_dir)
    if state is None:
        return {"requeued": 0}
    names = []
    for item in items:
        if item.startswith("/"):
            mf = media_file_for_path(config, Path(item))
            if mf is None:
                raise AgentError(f"{item} is not under any configured media root")
            names.append(mf.blob_name)
        else:
            names.append(item.lstrip("/"))
    try:
        return {"requeued": state.requeue(states, names), "states": states}
    finally:
        state.close()
