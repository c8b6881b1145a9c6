"""`gighive-media retry`: what the timer starts.

Full scan of the roots (the safety net for missed events), every due failure with its backoff,
pointer flips that MySQL refused earlier, and evictions that waited for them. If an upload run
holds the queue, it already handles due work, so this run steps aside and exits 0.
"""

from __future__ import annotations

import logging

from .. import deletes
from ..config import Config
from ..context import queue_worker
from ..errors import LockBusy
from ..worker import RunReport

log = logging.getLogger(__name__)


def run(config: Config) -> dict[str, object]:
    try:
        with queue_worker(config, wait_for_lock=False) as worker:
            worker.notifier.ready("scanning media roots")
            scan = worker.scan()
            report = RunReport()
            report.add(worker.housekeeping())
            report.add(worker.run_due(include_failed=True))
            report.add(worker.housekeeping())
            # GigHive's deletes: soft-delete, and purge after the grace period (agent.deletes).
            deleted = deletes.track(config, worker.state, worker.store, worker.pointer_db)
            worker.notifier.stopping()
    except LockBusy as e:
        log.info("%s; it handles due retries itself, so this run has nothing to do", e)
        return {"skipped": str(e)}
    log.info(
        "retry run finished: %d uploaded, %d already in Blob, %d failed, %d dead, %d quarantined, "
        "%d pointers flipped, %d evicted",
        report.uploaded,
        report.already_present,
        report.failed,
        report.dead,
        report.quarantined,
        report.pointers_flipped,
        report.evicted,
    )
    return {
        "scan": scan.as_dict(),
        **report.as_dict(),
        "outage": worker.outage,
        "soft_deleted": deleted.soft_deleted,
        "purged": deleted.purged,
        "undeleted": deleted.restored,
        "assets_problem": deleted.assets_problem,
    }
