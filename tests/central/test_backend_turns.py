"""The embedded backend runs one statement at a time; a P1 batch's statement that waits goes
before the others that wait (so a safety event waits for at most the statement running)."""

from __future__ import annotations

import threading
import time

from central.backend import _Turns


def test_an_urgent_statement_goes_before_those_queued_before_it() -> None:
    turns = _Turns()
    order: list[str] = []
    running = turns.hold(urgent=False)
    running.__enter__()  # a large P3 insert is running

    def statement(name: str, urgent: bool) -> None:
        with turns.hold(urgent):
            order.append(name)

    threads = [threading.Thread(target=statement, args=(f"p3-{i}", False)) for i in range(3)]
    threads.append(threading.Thread(target=statement, args=("p1", True)))
    for i, thread in enumerate(threads):
        thread.start()
        deadline = time.monotonic() + 30  # each one is waiting before the next starts
        while len(turns._cond._waiters) < i + 1 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.001)
    running.__exit__(None, None, None)
    for thread in threads:
        thread.join(30)
    assert order[0] == "p1" and sorted(order[1:]) == ["p3-0", "p3-1", "p3-2"]
