"""A bad configuration under real systemd: exit 78, no restart loop, the triggers keep working."""

from __future__ import annotations

import time

import pytest

from tests.system.nspawn import Container, wait_for

pytestmark = pytest.mark.system

BAD = {"MEDIA_STORAGE_BACKEND": "bogus"}


def test_bad_value_exits_78_and_systemd_does_not_restart_it(installed: Container, configure_agent) -> None:
    configure_agent(installed, env=BAD)
    for service in ("gighive-media-upload.service", "gighive-media-retry.service"):
        installed.systemctl("start", "--no-block", service)
        props = installed.wait_inactive(service)
        log = installed.journal(service, "-o", "cat")
        assert props["ExecMainStatus"] == "78", log
        assert props["ActiveState"] == "failed" and props["SubState"] == "failed", props
        # Restart=on-failure would have put it in "auto-restart"; RestartPreventExitStatus=78 did not.
        assert props["NRestarts"] == "0", props
        time.sleep(2)
        again = installed.show(service, "ActiveState", "NRestarts")
        assert again == {"ActiveState": "failed", "NRestarts": "0"}, again
        assert "MEDIA_STORAGE_BACKEND" in log, "the log names the bad variable:\n" + log
        assert "status=78/CONFIG" in log


def test_path_unit_keeps_watching_while_every_run_fails_on_bad_configuration(
    installed: Container, configure_agent
) -> None:
    """Files keep arriving while agent.env is broken: each one starts a run that exits 78 at once.
    The path unit must not hit a start limit (that would stop the watching for good)."""
    setup = configure_agent(installed, env=BAD)
    installed.systemctl("enable", "--now", "gighive-media-upload.path")
    root = setup.roots["video"]
    service = "gighive-media-upload.service"

    def failed_runs() -> int:
        return installed.journal(service, "-o", "cat").count("status=78/CONFIG")

    # More runs than systemd's default start limit (5 in 10 s). Each file is written once the run
    # the previous one started has failed (a state, not a pause): every file then starts a run of
    # its own, however slowly the agent starts on this machine.
    for i in range(8):
        installed.path(f"{root}/clip-{i}.mp4").write_bytes(b"x" * 1024)
        wait_for(lambda n=i + 1: failed_runs() >= n, timeout=120, what=f"run {i + 1} to fail with 78")
    path = installed.show("gighive-media-upload.path", "ActiveState", "SubState", "Result")
    assert path["ActiveState"] == "active" and path["Result"] == "success", path
    log = installed.journal(service, "-o", "cat")
    runs = log.count("status=78/CONFIG")
    print(f"{runs} runs failed with 78; path unit: {path}")
    assert runs >= 8, f"each file started a run ({runs} runs):\n{log}"
    assert "start-limit" not in installed.journal("gighive-media-upload.path", "-o", "cat")
    # Fixing agent.env is itself a file event: the next run starts by itself and succeeds.
    configure_agent(installed, env={"MEDIA_STORAGE_BACKEND": "local"}, reload=False)
    props = wait_for(
        lambda: (
            (p := installed.show(service, "ActiveState", "Result", "ExecMainStatus"))
            and p["Result"] == "success"
            and p["ActiveState"] == "inactive"
            and p
        ),
        timeout=300,
        what="a successful run after fixing agent.env",
    )
    assert props["ExecMainStatus"] == "0"
