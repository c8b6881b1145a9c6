"""ansible-lint, production profile, over ansible/ (the role, the playbook, the inventories).

ansible-lint is the current release, pinned with hashes in tests/ansible/locks/lint.lock: operators
lint with what pip gives them today, and newer releases add rules (var-naming[no-role-prefix])."""

from __future__ import annotations

import subprocess

from tests.ansible.conftest import ANSIBLE_DIR, venv_env


def test_role_passes_ansible_lint_production_profile(ansible_host):
    # ansible/.ansible-lint sets profile: production and offline: true (no Galaxy, no network).
    env = venv_env("lint")
    version = subprocess.run(
        ["ansible-lint", "--nocolor", "--version"], env=env, capture_output=True, text=True, timeout=120
    )
    assert version.stdout.startswith("ansible-lint 26."), version.stdout + version.stderr
    r = subprocess.run(
        ["ansible-lint", "--nocolor"], cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, f"ansible-lint failed:\n{r.stdout}\n{r.stderr}"
    assert "Profile 'production' was required, and it passed" in (r.stdout + r.stderr)


def test_playbook_syntax(ansible_host):
    r = subprocess.run(
        ["ansible-playbook", "--syntax-check", "-i", "localhost,", "playbooks/media_storage.yml"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
            "HOME": str(ANSIBLE_DIR.parent),
        },
    )
    assert r.returncode == 0, r.stdout + r.stderr
