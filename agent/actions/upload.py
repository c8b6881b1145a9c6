"""`gighive-media upload`: what the path unit starts.

Drain everything due, then keep watching the roots and exit 0 once nothing happened for
UPLOAD_IDLE_EXIT_SECONDS. Failures are recorded for the retry timer and still exit 0, so a
broken Azure link never drives the path unit into its start limit. The first failure that says
Azure itself is unusable (an outage, agent/worker.py) ends the run at once: its files wait, queued,
for the retry timer, and watching on would only queue more of them.
"""

from __future__ import annotations

import logging
import time

from ..config import Config
from ..context import queue_worker
from ..watch import RootWatcher
from ..worker import RunReport, Worker

log = logging.getLogger(__name__)


def run(config: Config, watch: bool = True, idle_exit: float | None = None) -> dict[str, object]:
    idle = config.idle_exit_seconds if idle_exit is None else idle_exit
    with queue_worker(config, wait_for_lock=True) as worker:
        worker.notifier.ready("scanning media roots")
        # The watch starts before the scan, so a file that lands during the scan is not missed.
        watcher = RootWatcher(config) if watch else None
        try:
            scan = worker.scan()
            report = RunReport()
            report.add(worker.housekeeping(audit=False))
            report.add(worker.run_due())
            if watcher is not None and worker.outage is None:
                report.add(_watch(worker, watcher, idle))
        finally:
            if watcher is not None:
                watcher.close()
        worker.notifier.stopping()
    summary = {"scan": scan.as_dict(), **report.as_dict(), "outage": worker.outage}
    log.info(
        "upload run finished: %d uploaded, %d already in Blob, %d failed, %d quarantined, %d evicted",
        report.uploaded,
        report.already_present,
        report.failed + report.dead,
        report.quarantined,
        report.evicted,
    )
    return summary


def _watch(worker: Worker, watcher: RootWatcher, idle: float) -> RunReport:
    report = RunReport()
    last_activity = time.monotonic()
    log.info("watching the media roots for new files (exits after %g s without any)", idle)
    while True:
        now_wall = time.time()
        next_due = worker.state.next_due_time()
        remaining_idle = idle - (time.monotonic() - last_activity)
        if remaining_idle <= 0:
            return report
        timeout = remaining_idle
        if next_due is not None:
            timeout = max(0.05, min(timeout, next_due - now_wall))
        files, new_dirs, renamed_in = watcher.read(timeout)
        if watcher.overflowed:
            watcher.overflowed = False
            log.warning("inotify queue overflowed; rescanning every root")
            worker.scan()
        for d in new_dirs:
            worker.scan_dir(d)
        queued = sum(1 for p in files if worker.enqueue_path(p, renamed_in=p in renamed_in))
        result = worker.run_due()
        report.add(result)
        # Only run_due, in this thread, can meet an outage, so checking right after it is the
        # moment the worker declares one: going back to the read would sit out the idle time
        # or the next due file (issue 15 part 5: the run exited ~40 s after its outage).
        if worker.outage is not None:
            return report  # queued files wait for the retry timer
        if files or new_dirs or queued or result.uploaded or result.already_present or result.deferred:
            last_activity = time.monotonic()
