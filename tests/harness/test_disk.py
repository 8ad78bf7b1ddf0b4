"""SmallDisk: a real tmpfs of the size asked for; filled, the kernel refuses the next write
(ENOSPC); freed, it takes writes again; unmounted, even while busy, no mount is left."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

from tools.gateway_process import ROOT
from tools.harness.disk import PAGE_BYTES, DiskError, SmallDisk

MIB = 1 << 20


@pytest.fixture
def disk(tmp_path):
    try:
        small = SmallDisk(tmp_path / "disk", 4)
    except DiskError as exc:
        pytest.skip(str(exc))
    with small:
        yield small
    assert not os.path.ismount(small.directory)


def write_one_page(directory: str) -> None:
    with open(os.path.join(directory, "one-more-page"), "ab", buffering=0) as fh:
        fh.write(bytes(PAGE_BYTES))


def test_the_disk_has_the_size_asked_for_and_is_a_mount(disk):
    assert os.path.ismount(disk.directory) and disk.mounted
    assert disk.usage().total == 4 * MIB


def test_a_filled_disk_refuses_the_next_write_until_freed(disk):
    added = disk.fill()
    assert added > 3 * MIB
    assert disk.usage().free < PAGE_BYTES
    with pytest.raises(OSError) as refused:
        write_one_page(disk.directory)
    assert refused.value.errno == errno.ENOSPC
    assert disk.free() == added
    assert disk.usage().free > 3 * MIB
    write_one_page(disk.directory)


def test_fill_leaves_the_bytes_asked_for(disk):
    disk.fill(leave_bytes=MIB)
    assert MIB - PAGE_BYTES <= disk.usage().free <= MIB + PAGE_BYTES
    disk.fill()  # and again, to the last page
    assert disk.usage().free < PAGE_BYTES


def test_unmount_is_idempotent(tmp_path):
    small = SmallDisk(tmp_path / "disk", 1)
    small.unmount()
    small.unmount()
    assert not os.path.ismount(small.directory) and not small.mounted


def test_a_busy_disk_is_still_unmounted(tmp_path):
    small = SmallDisk(tmp_path / "disk", 1)
    with open(os.path.join(small.directory, "held-open"), "w") as held:
        small.unmount()  # busy: detached lazily
        assert not os.path.ismount(small.directory)
        held.write("still writable through the open file")


def test_a_test_that_fails_inside_the_block_leaves_no_mount(tmp_path):
    with pytest.raises(AssertionError), SmallDisk(tmp_path / "disk", 1) as small:
        raise AssertionError("the test failed")
    assert not os.path.ismount(small.directory)


def test_a_mount_point_is_not_mounted_over(disk):
    with pytest.raises(DiskError, match="already a mount point"):
        SmallDisk(disk.directory, 1)


_WITHOUT_ROOT = """
import sys
from tools.harness.disk import DiskError, SmallDisk
try:
    SmallDisk(sys.argv[1], 1)
except DiskError as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs root and util-linux's setpriv")
def test_without_the_right_to_mount_the_error_says_a_full_disk_needs_root(tmp_path):
    target = tmp_path / "disk"
    # Root without CAP_SYS_ADMIN (dropped from the bounding set) may not mount: as a user.
    done = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", sys.executable, "-c",
                           _WITHOUT_ROOT, str(target)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.startswith("a real full disk needs root to mount a tmpfs: "), done.stdout
    assert "permission denied" in done.stdout
    assert not os.path.ismount(target)
