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
