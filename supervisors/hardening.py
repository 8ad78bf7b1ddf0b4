"""Workarounds for four Thespian 4.0.1 defects that break "crashes never stop journaling".

Where this sits: below every supervisor. ``fleetgw run`` calls :func:`apply` once, in its main
process, before it creates the ``ActorSystem``; the Admin, the logger and every actor are forked
from that process (``'Process Startup Method': 'fork'``) and inherit the patched classes and
module globals. A process that only attaches to a running system (the inspector) must call
:func:`apply` too: an unpatched one advertises the LAN address and cannot reach an Admin that
listens on loopback. Nothing here is an actor. Measurements: /work/shared/THESPIAN_NOTES.md.

The defects, and what :func:`apply` changes (paths are inside the ``thespian`` package):

1. Segfaults hang. ``system/multiprocCommon.py`` ``startChild`` installs a Python handler for
   every catchable signal through the module global ``set_signal_handler`` (looked up at call
   time), SIGSEGV/SIGBUS/SIGFPE/SIGILL included. A Python handler only sets a flag and returns,
   so the faulting instruction runs again: the actor spins at 100% CPU and its parent never
   gets ``ChildActorExited``. Patch: ``multiprocCommon.set_signal_handler`` is wrapped so those
   four signals get ``SIG_DFL``; :func:`restore_fatal_signal_defaults` does the same from inside
   an actor, for belt and braces.
2. Lost ``ChildActorExited``. ``MultiProcReplicator._childExited`` (~line 383) drops *every*
   dead child from ``_child_procs`` while handling one child's exit, but only ``childDied()``
   (~line 398) synthesizes notices, so children that died after ``childDied``'s last look are
   never announced (kquick/Thespian#85). Upstream also announces a cleanly stopped child twice
   in about half the cases (its own goodbye plus the one ``childDied`` synthesizes once the
   process has ended). Patch: ``_childExited`` removes only the child it is called for and
   announces any other dead child it finds; a child that announced itself while still running
   is reaped later by ``childDied`` without a second notice; ``ActorManager._handleOneMessage``
   drops a ``ChildActorExited`` for an address already announced (forgotten again when a new
   child connects from that address). ``_checkChildLiveness`` records each dead child's
   exit code (``-9`` SIGKILL, ``-11`` SIGSEGV, ...) for :func:`pop_exit_code`.
3. The Admin dies with its logger. ``MultiProcReplicator.childDied`` restarts a dead logger
   with ``self.logDefs``, but the attribute is ``self.logdefs`` (``AdminCore`` and
   ``ActorManager`` both set it), so the Admin raises ``AttributeError`` and exits; afterwards
   ``createActor`` raises ``ActorSystemFailure``. Patch: a ``logDefs`` property on
   ``MultiProcReplicator`` that aliases ``logdefs``. Actors started before the restart keep
   sending their log records to the dead logger's address: those records are lost.
4. Every socket listens on 0.0.0.0. ``system/transport/IPBase.py`` ``IPActorAddress`` sets
   ``self.bindname = ('', port)`` for external addresses and ``TCPTransport`` binds
   ``bindArgs``, even with ``THESPIAN_BASE_IPADDR`` set, and it unpickles whatever arrives
   (``TCPTransport.py`` ~line 157): anyone on the LAN can run code on the gateway. Patch:
   ``IPActorAddress.bindArgs`` returns ``bind_host`` (default ``127.0.0.1``) for every IPv4
   bind, and ``THESPIAN_BASE_IPADDR`` is set to ``bind_host`` so the addresses actors
   advertise match the address they listen on.

The patches reach into 4.0.1 internals, so :func:`apply` refuses any other version.

Seen and not patched here: ``ActorManager._shutdownActor`` (``system/actorManager.py`` ~line
222) gives each child's ActorExitRequest an ``onError`` lambda that late-binds the loop
variable, so an unreachable child marks the *last* child as exited; the parent then waits for a
notice that never comes and ``shutdown()`` gives up after 10 s leaving it running (seen
whenever two or more notices had been lost). Every forked process also keeps the listening
socket of the process that started the system (and the logger keeps the admin port). Teardown
must therefore still kill the Admin's process group.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import signal
import socket
from importlib import metadata
from typing import Any

#: The only Thespian release whose internals these patches were written against and tested on.
SUPPORTED_THESPIAN_VERSION = "4.0.1"

#: Signals that mean "this process is broken": they must kill it so the parent sees the exit.
FATAL_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name)
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL")
    if hasattr(signal, name)
)

#: Exit codes kept for `pop_exit_code`, and announced addresses kept per actor for dropping
#: duplicate notices; beyond this many the oldest are forgotten (duplicates arrive within ms).
MAX_REMEMBERED = 1024

# Set once by apply(); invariant: _bind_host is None exactly when the patches are not installed.
_bind_host: str | None = None
# Thespian's own versions of what apply() replaces, by "Owner.name" (see _capture_upstream);
# the replacements call through them, tests reproduce the defects with them.
_upstream: dict[str, Any] = {}


class UnsupportedThespianVersion(RuntimeError):
    """The installed Thespian is not the release these patches were written for."""


class _ExitRecord:
    __slots__ = ("code", "keys")

    def __init__(self, code: int, keys: tuple[str, ...]) -> None:
        self.code = code  # multiprocessing exitcode: >= 0 exit status, < 0 minus the signal
        self.keys = keys  # every str(address) this record is filed under


# str(child address) -> its _ExitRecord, oldest first; a child's local and real addresses share
# one record, so popping either forgets both. Per process: each parent actor has its own.
_exit_codes: collections.OrderedDict[str, _ExitRecord] = collections.OrderedDict()


def capabilities(admin_port: int) -> dict[str, Any]:
    """The capabilities dict fleetgw passes to ``ActorSystem('multiprocTCPBase', ...)``.

    ``'Admin Port'`` is read by ``TCPTransport.getAdminAddr``; ``'Process Startup Method'`` by
    ``multiprocCommon.get_multiproc_context``. ``fork`` is required: actors must inherit the
    patches, and with ``forkserver`` a dead child is never detected.
    """
    if (
        isinstance(admin_port, bool)
        or not isinstance(admin_port, int)
        or not 0 < admin_port < 65536
    ):
        raise ValueError(f"admin_port must be an int in 1..65535 (got {admin_port!r})")
    return {"Admin Port": admin_port, "Process Startup Method": "fork"}


def applied() -> bool:
    """True once `apply` has installed the patches in this process (or in a forked ancestor)."""
    return _bind_host is not None


def apply(bind_host: str = "127.0.0.1") -> None:
    """Install the four workarounds; idempotent.

    Call it in the main process before the first ``ActorSystem(...)``: the Admin is forked when
    the system starts and only inherits what is already patched. ``bind_host`` is the IPv4
    address every actor, the Admin and the logger listen on (and advertise).
    """
    global _bind_host
    host = _checked_bind_host(bind_host)
    if _bind_host is not None:
        if host != _bind_host:
            raise RuntimeError(
                f"hardening.apply(bind_host={host!r}) after apply(bind_host={_bind_host!r}): "
                "actors already forked keep the first host; call apply() once per process"
            )
        return
    _check_thespian_version()

    from thespian.actors import ActorSystem
    from thespian.system import actorManager, multiprocCommon
    from thespian.system.transport import IPBase

    if getattr(ActorSystem, "systemBase", None) is not None:
        raise RuntimeError(
            "hardening.apply() was called after an ActorSystem was created in this process, "
            "whose Admin therefore runs unpatched; call apply() before the first ActorSystem()"
        )
    _capture_upstream()
    replicator = multiprocCommon.MultiProcReplicator

    # 1. Segfaults hang: fatal signals keep their default action in every forked actor.
    multiprocCommon.set_signal_handler = _set_signal_handler
    # 2. Lost (and doubled) ChildActorExited; exit codes.
    replicator._childExited = _child_exited
    replicator.childDied = _child_died
    replicator.h_EndpointConnected = _endpoint_connected
    replicator._checkChildLiveness = staticmethod(_check_child_liveness)
    actorManager.ActorManager._handleOneMessage = _handle_one_message
    # 3. Admin crash on logger death: childDied() reads self.logDefs.
    replicator.logDefs = property(_get_logdefs, _set_logdefs)
    # 4. Listen on bind_host only, and advertise it.
    IPBase.IPActorAddress.bindArgs = property(_bind_args)
    os.environ["THESPIAN_BASE_IPADDR"] = host
    IPBase.thisSystem.add_local_addr(host)

    _bind_host = host


def pop_exit_code(address: Any) -> int | None:
    """The exit code of the dead child at ``address``, once; None if unknown.

    Call it in the parent actor while handling ``ChildActorExited(address)``. Negative codes
    are signals (-9 SIGKILL, -11 SIGSEGV). None when the child announced its own exit (a normal
    stop) before its process ended, or when the patches are not applied.
    """
    record = _exit_codes.pop(str(address), None)
    if record is None:
        return None
    for key in record.keys:  # the child's other address (local or real) goes too
        if _exit_codes.get(key) is record:
            del _exit_codes[key]
    return record.code


def restore_fatal_signal_defaults() -> None:
    """Give SIGSEGV/SIGBUS/SIGFPE/SIGILL their default action (terminate) in this process.

    Actors may call this when they start; `apply` already arranges it for them, this guards
    against anything (a library, another Thespian path) installing Python handlers later.
    """
    for signum in FATAL_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------
# Checks and installation


def _checked_bind_host(bind_host: str) -> str:
    try:
        addr = ipaddress.ip_address(bind_host)
    except ValueError:
        addr = None
    if not isinstance(addr, ipaddress.IPv4Address):
        raise ValueError(
            f"bind_host must be an IPv4 address literal such as '127.0.0.1' (got {bind_host!r})"
        )
    if addr.is_unspecified:
        raise ValueError(
            f"bind_host {bind_host!r} listens on every interface, and Thespian unpickles "
            "whatever arrives; use '127.0.0.1' or one interface's address"
        )
    return str(addr)


def _check_thespian_version() -> None:
    try:
        found = metadata.version("thespian")
    except metadata.PackageNotFoundError:
        found = None
    if found != SUPPORTED_THESPIAN_VERSION:
        raise UnsupportedThespianVersion(
            f"supervisors.hardening patches thespian {SUPPORTED_THESPIAN_VERSION} internals "
            f"(multiprocCommon, actorManager, transport.IPBase) but found thespian {found}; "
            f"pin thespian=={SUPPORTED_THESPIAN_VERSION}, or re-check the four defects in "
            "THESPIAN_NOTES.md against that release and update this module"
        )


def _capture_upstream() -> dict[str, Any]:
    """Thespian's own versions of everything `apply` replaces, captured once (before any
    replacement), by "Owner.name"; raises if this Thespian lacks one of them."""
    if _upstream:
        return _upstream
    from thespian.system import actorManager, multiprocCommon
    from thespian.system.transport import IPBase

    replicator = vars(multiprocCommon.MultiProcReplicator)
    found = {
        "multiprocCommon.set_signal_handler": getattr(multiprocCommon, "set_signal_handler", None),
        "MultiProcReplicator._childExited": replicator.get("_childExited"),
        "MultiProcReplicator.childDied": replicator.get("childDied"),
        "MultiProcReplicator.h_EndpointConnected": replicator.get("h_EndpointConnected"),
        "MultiProcReplicator._checkChildLiveness": getattr(
            replicator.get("_checkChildLiveness"), "__func__", None
        ),
        "ActorManager._handleOneMessage": vars(actorManager.ActorManager).get("_handleOneMessage"),
        "IPActorAddress.bindArgs": vars(IPBase.IPActorAddress).get("bindArgs"),
    }
    missing = sorted(name for name, value in found.items() if value is None)
    if missing:
        raise UnsupportedThespianVersion(
            f"thespian lacks {', '.join(missing)}: it is not the {SUPPORTED_THESPIAN_VERSION} "
            "these patches were written for"
        )
    _upstream.update(found)
    return _upstream


# ---------------------------------------------------------------------------------------------
# 1. Fatal signals


def _set_signal_handler(signum: int, handler: Any) -> Any:
    """Replacement for ``multiprocCommon.set_signal_handler`` (``signal.signal``)."""
    if signum in FATAL_SIGNALS:
        return signal.signal(signum, signal.SIG_DFL)
    return _upstream["multiprocCommon.set_signal_handler"](signum, handler)


# ---------------------------------------------------------------------------------------------
# 2. Child exits


def _addresses_of(info: Any) -> list[Any]:
    """A ChildInfo's addresses: the local one from createActor and, once connected, the real one."""
    real = getattr(info, "childRealAddr", None)
    return [info.childAddr] if real is None else [info.childAddr, real]


def _record_exit_code(info: Any) -> None:
    code = info.childProc.exitcode
    if code is None or info.childClass == "logger":
        return
    record = _ExitRecord(code, tuple(str(addr) for addr in _addresses_of(info)))
    for key in record.keys:
        _exit_codes.pop(key, None)
        _exit_codes[key] = record
    while len(_exit_codes) > MAX_REMEMBERED:
        _exit_codes.popitem(last=False)


def _check_child_liveness(info: Any) -> bool:
    """Replacement for the ``_checkChildLiveness`` staticmethod: same answer (and the same reaping
    join), and a dead child's exit code is kept for `pop_exit_code`."""
    alive = _upstream["MultiProcReplicator._checkChildLiveness"](info)
    if not alive:
        _record_exit_code(info)
    return alive


def _child_exited(self: Any, childAddr: Any) -> None:
    """Replacement for ``MultiProcReplicator._childExited``, called once per ChildActorExited.

    Invariant: a ChildInfo leaves ``_child_procs`` only here for the child this call is about
    (then to ``_hardening_unreaped`` if still running), or together with the scheduling of its
    one synthesized notice (here or in ``childDied``): no dead child is dropped unannounced.
    """
    from thespian.actors import ChildActorExited
    from thespian.system.addressManager import CannotPickleAddress
    from thespian.system.transport import TransmitIntent
    from thespian.system.utilis import thesplog

    keep, dead = [], []
    unreaped = _unreaped(self)
    for info in getattr(self, "_child_procs", []):
        if any(addr == childAddr for addr in _addresses_of(info)):
            # The child this notice is about (already delivered, so its exit code would never
            # be popped: check without recording); if it announced its own exit it may still run.
            if _upstream["MultiProcReplicator._checkChildLiveness"](info):
                unreaped.append(info)
        elif self._checkChildLiveness(info):
            keep.append(info)
        else:
            dead.append(info)
    self._child_procs = keep
    for info in dead:  # died since childDied() last looked: announce here, exactly once
        addr = getattr(info, "childRealAddr", info.childAddr)
        try:
            self.transport.scheduleTransmit(
                None, TransmitIntent(self.transport.myAddress, ChildActorExited(addr))
            )
        except CannotPickleAddress:
            thesplog("hardening: child %s is dead but its address cannot be translated", addr)
    _reap(self)


def _child_died(self: Any) -> bool:
    """Wrapper for ``MultiProcReplicator.childDied`` (runs on SIGCHLD): upstream's work, then
    reap the children that were announced while still running, without a second notice."""
    result = _upstream["MultiProcReplicator.childDied"](self)
    _reap(self)
    return result


def _unreaped(self: Any) -> list[Any]:
    if "_hardening_unreaped" not in self.__dict__:
        self._hardening_unreaped = []
    return self._hardening_unreaped


def _reap(self: Any) -> None:
    check = _upstream["MultiProcReplicator._checkChildLiveness"]  # joins; records no exit code
    self._hardening_unreaped = [info for info in _unreaped(self) if check(info)]


def _announced(self: Any) -> collections.OrderedDict[str, None]:
    if "_hardening_announced" not in self.__dict__:
        self._hardening_announced = collections.OrderedDict()
    return self._hardening_announced


def _handle_one_message(self: Any, envelope: Any) -> Any:
    """Wrapper for ``ActorManager._handleOneMessage``: a ChildActorExited for an address the
    actor was already told about is dropped instead of delivered."""
    from thespian.actors import ChildActorExited

    msg = envelope.message
    if isinstance(msg, ChildActorExited):
        announced = _announced(self)
        key = str(msg.childAddress)
        if key in announced:
            return True  # a duplicate: keep running, deliver nothing
        announced[key] = None
        while len(announced) > MAX_REMEMBERED:
            announced.popitem(last=False)
    return _upstream["ActorManager._handleOneMessage"](self, envelope)


def _endpoint_connected(self: Any, envelope: Any) -> Any:
    """Wrapper for ``MultiProcReplicator.h_EndpointConnected``: a new child reusing a dead one's
    address (port) must get its own notice later."""
    _announced(self).pop(str(envelope.sender), None)
    return _upstream["MultiProcReplicator.h_EndpointConnected"](self, envelope)


# ---------------------------------------------------------------------------------------------
# 3. Logger restart


def _get_logdefs(self: Any) -> Any:
    return self.logdefs


def _set_logdefs(self: Any, value: Any) -> None:
    self.logdefs = value


# ---------------------------------------------------------------------------------------------
# 4. Bind address


def _bind_args(self: Any) -> tuple[Any, ...]:
    """Replacement for the ``IPActorAddress.bindArgs`` property: IPv4 binds use the host given
    to `apply`; other families keep upstream's bind address."""
    if self.af == socket.AF_INET and _bind_host is not None:
        return ((_bind_host, self.bindname[1]),)
    return (self.bindname,)
