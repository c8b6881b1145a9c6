"""`gighive-media db-migrate`: create or complete the pointer table, idempotently."""

from __future__ import annotations

from ..config import Config
from ..errors import EXIT_CONFIG, AgentError
from ..pointer import TABLE, PointerDB, PointerUnavailable


class NoDatabase(AgentError):
    exit_code = EXIT_CONFIG


def run(config: Config) -> dict[str, object]:
    if config.mysql is None:
        raise NoDatabase("MYSQL_HOST: not set, so there is no database to migrate")
    db = PointerDB(config.mysql)
    try:
        changes = db.migrate()
    except PointerUnavailable as e:
        raise AgentError(str(e)) from None
    finally:
        db.close()
    return {"table": TABLE, "changes": changes, "changed": bool(changes)}
