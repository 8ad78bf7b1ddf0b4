"""A damaged journal file: `fleetgw journal verify` and `stats` say so, with no traceback."""

from __future__ import annotations

import os

from actors.journal import Journal
from messages.journal import BatchId
from tests.journal import make_batch
from tools.journal_cmd import stats_command, verify_command


def test_verify_and_stats_of_a_damaged_journal_report_it_without_a_traceback(tmp_path, capsys):
    path = str(tmp_path / "journal.db")
    with Journal(path, synchronous="NORMAL") as journal:
        for no in range(1, 200):
            journal.append(BatchId("imu-1", 1, no), make_batch("imu-1", ["veh-1"] * 20, f"b{no}"))
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:  # scribble over pages past the header and schema
        fh.seek(size // 2)
        fh.write(os.urandom(16384))
    assert verify_command(path) == 1
    out = capsys.readouterr()
    assert "FAILED" in out.out and "Traceback" not in out.out + out.err
    assert stats_command(path, as_json=True) in (0, 1)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err


def test_a_second_journal_writer_is_refused(tmp_path):
    import pytest

    from actors.journal.actor import take_writer_lock
    from actors.journal.schema import JournalError

    path = str(tmp_path / "journal.db")
    first = take_writer_lock(path)
    try:
        with pytest.raises(JournalError, match="second writer"):
            take_writer_lock(path)
    finally:
        os.close(first)
    os.close(take_writer_lock(path))  # free again once the first writer is gone
