"""The public surface of supervisors.hardening: capabilities, apply's checks and effects,
pop_exit_code, restore_fatal_signal_defaults. Anything that installs patches or touches signal
handlers runs in a fresh interpreter so the pytest process stays unpatched.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from thespian.actors import ActorAddress
from thespian.system.multiprocCommon import ChildInfo, get_multiproc_context
from thespian.system.transport.TCPTransport import TCPTransport

from supervisors import hardening

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_capabilities_use_the_key_names_thespian_reads() -> None:
    caps = hardening.capabilities(21000)
    assert caps == {"Admin Port": 21000, "Process Startup Method": "fork"}
    assert TCPTransport.getAdminAddr(caps).addressDetails.sockname[1] == 21000
    assert get_multiproc_context(caps).get_start_method() == "fork"


@pytest.mark.parametrize("port", [0, 65536, "21000", True, None])
def test_capabilities_reject_a_port_that_is_not_a_tcp_port(port) -> None:
    with pytest.raises(ValueError, match="admin_port must be an int in 1..65535"):
        hardening.capabilities(port)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "localhost", "::1", "127.0.0.1:80"])
def test_apply_rejects_a_bind_host_that_is_not_one_ipv4_address(host) -> None:
    with pytest.raises(ValueError, match="bind_host"):
        hardening.apply(host)


def test_apply_refuses_any_other_thespian_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardening, "_bind_host", None)
    monkeypatch.setattr(hardening.metadata, "version", lambda name: "4.0.2")
    with pytest.raises(hardening.UnsupportedThespianVersion, match="found thespian 4.0.2"):
        hardening.apply()
    assert hardening.applied() is False


def test_apply_is_idempotent_and_installs_every_patch() -> None:
    out = run_python("""
        import os, signal
        from supervisors import hardening
        from thespian.system import multiprocCommon
        from thespian.system.transport.IPBase import TCPv4ActorAddress
        hardening.apply()
        hardening.apply()
        assert hardening.applied()
        assert os.environ["THESPIAN_BASE_IPADDR"] == "127.0.0.1"
        assert TCPv4ActorAddress(None, 0, external=True).bindArgs == (("127.0.0.1", 0),)
        multiprocCommon.set_signal_handler(signal.SIGSEGV, lambda *a: None)
        multiprocCommon.set_signal_handler(signal.SIGUSR1, lambda *a: None)
        assert signal.getsignal(signal.SIGSEGV) == signal.SIG_DFL
        assert callable(signal.getsignal(signal.SIGUSR1))
        assert multiprocCommon.MultiProcReplicator.logDefs.fget(
            type("A", (), {"logdefs": {"version": 1}})()) == {"version": 1}
        try:
            hardening.apply("127.0.0.2")
        except RuntimeError as ex:
            print("second host:", ex)
        """)
    assert "second host: hardening.apply(bind_host='127.0.0.2') after" in out


def test_apply_binds_and_advertises_the_configured_host() -> None:
    out = run_python("""
        import os
        from supervisors import hardening
        from thespian.system.transport.IPBase import TCPv4ActorAddress
        hardening.apply("127.0.0.2")
        addr = TCPv4ActorAddress(None, 0, external=True)
        print(addr.bindArgs, addr.sockname, os.environ["THESPIAN_BASE_IPADDR"])
        """)
    assert out.split() == ["(('127.0.0.2',", "0),)", "('127.0.0.2',", "0)", "127.0.0.2"]


def test_apply_after_an_actor_system_started_in_this_process_is_refused() -> None:
    out = run_python("""
        from thespian.actors import ActorSystem
        from supervisors import hardening
        ActorSystem()  # simpleSystemBase: in-process, nothing forked
        try:
            hardening.apply()
        except RuntimeError as ex:
            print(ex)
        finally:
            ActorSystem().shutdown()
        """)
    assert "call apply() before the first ActorSystem()" in out


def test_restore_fatal_signal_defaults_resets_all_four_signals() -> None:
    out = run_python("""
        import signal
        from supervisors import hardening
        for s in hardening.FATAL_SIGNALS:
            signal.signal(s, lambda *a: None)
        hardening.restore_fatal_signal_defaults()
        print(sorted(s.name for s in hardening.FATAL_SIGNALS
                     if signal.getsignal(s) == signal.SIG_DFL))
        """)
    assert out.strip() == "['SIGBUS', 'SIGFPE', 'SIGILL', 'SIGSEGV']"


def test_an_exit_code_is_popped_once_under_either_address_of_the_child() -> None:
    proc = types.SimpleNamespace(exitcode=-11)
    info = ChildInfo(ActorAddress("local-7"), "Probe", proc, 7)
    info.childRealAddr = ActorAddress("real-7")
    hardening._record_exit_code(info)
    assert hardening.pop_exit_code(ActorAddress("real-7")) == -11
    assert hardening.pop_exit_code(ActorAddress("local-7")) is None
    assert hardening.pop_exit_code(ActorAddress("never-seen")) is None


def test_exit_codes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardening, "MAX_REMEMBERED", 3)
    monkeypatch.setattr(hardening, "_exit_codes", type(hardening._exit_codes)())
    for n in range(5):
        hardening._record_exit_code(
            ChildInfo(ActorAddress(f"c{n}"), "Probe", types.SimpleNamespace(exitcode=n), n)
        )
    assert list(hardening._exit_codes) == ["ActorAddr-c2", "ActorAddr-c3", "ActorAddr-c4"]
