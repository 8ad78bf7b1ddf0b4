"""Start-up cleanup never harms what is not ours."""

from __future__ import annotations

import subprocess

from supervisors import system
from tests.system.harness import free_port, wait_for


def test_cleanup_leaves_a_foreign_process_group_alone(tmp_path):
    # A power cut left a state file; after the reboot its group id belongs to someone else.
    foreign = subprocess.Popen(["setsid", "sleep", "60"])
    try:
        wait_for(lambda: system.group_members(foreign.pid), 10, "the foreign group to exist")
        system.write_state(str(tmp_path), pgid=foreign.pid, boot_id=system.boot_id())
        system.cleanup_stale(str(tmp_path), free_port())
        assert foreign.poll() is None, "cleanup killed a process that is not fleetgw's"
    finally:
        system.RunLocks.release()
        foreign.kill()
        foreign.wait()


def test_state_from_another_boot_is_ignored(tmp_path):
    system.write_state(str(tmp_path), pgid=1, boot_id="another-boot")
    try:
        assert system.cleanup_stale(str(tmp_path), free_port()) == []
    finally:
        system.RunLocks.release()
