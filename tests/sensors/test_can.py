"""CanSource and FrameDecoder on real python-can buses (virtual in-process, udp_multicast across
processes): decoded values match what was encoded, filters filter, bad frames are quarantined
or counted without stopping good ones (I8), a failing bus is reopened after a backoff, and
garbage never escapes a poll."""

from __future__ import annotations

import math
import random
import select
import socket
import struct
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import can
import cantools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.sensors.can import CanSource, FrameDecoder, raw_frame, safe_name
from config.can import CanFilterSettings, CanSourceSettings
from config.loader import ConfigError, structure_strict
from messages.readings import Reading
from tools.can_player import encode, plan, play

ROOT = Path(__file__).resolve().parents[2]
DBC = str(ROOT / "config" / "demo_vehicle.dbc")
DB = cantools.database.load_file(DBC)
GROUP = "239.74.163.187"  # an administratively scoped group no one else here uses
ENGINE = DB.get_message_by_name("EngineData")
BRAKE = DB.get_message_by_name("BrakeStatus")
BATTERY = DB.get_message_by_name("BatteryStatus")


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def new_channel() -> str:
    return f"fleetgw-test-{uuid.uuid4().hex}"


def can_settings(channel: str, **kw) -> CanSourceSettings:
    kw.setdefault("dbc", DBC)
    kw.setdefault("interface", "virtual")
    return CanSourceSettings(channel=channel, **kw)


_SOURCES: list[CanSource] = []


@pytest.fixture(autouse=True)
def _close_sources():
    yield
    while _SOURCES:
        _SOURCES.pop().close()


def opened(channel: str, **kw) -> CanSource:
    """An opened source on ``channel`` (closed after the test)."""
    src_kw = {k: kw.pop(k) for k in ("clock", "clock_ns", "bus_factory", "rng") if k in kw}
    src = CanSource(can_settings(channel, **kw), "can0", "veh-001", **src_kw)
    _SOURCES.append(src)
    src.open()
    return src


def poll_until(src: CanSource, n: int, deadline_s: float = 10.0, max_items: int = 10_000):
    """Poll until ``n`` outcomes (readings + quarantined) arrived or the deadline passed."""
    readings, quarantined = [], []
    deadline = time.monotonic() + deadline_s
    while len(readings) + len(quarantined) < n and time.monotonic() < deadline:
        r, q = src.poll(max_items)
        readings += r
        quarantined += q
        if not r and not q:
            fd = src.fileno()
            if fd is not None:
                select.select([fd], [], [], 0.05)
            else:
                time.sleep(0.001)  # an in-process queue: nothing to wait on but time
    return readings, quarantined


def frame(message, values, **kw) -> can.Message:
    msg = encode(message, values)
    for key, value in kw.items():
        setattr(msg, key, value)
    return msg


def engine_frame(rpm: float = 1500.0, data: bytes | None = None) -> can.Message:
    values = {"EngineSpeed": rpm, "CoolantTemp": 80, "ThrottlePos": 20.0, "OilPressure": 300,
              "EngineTorque": 100.0, "AliveCounter": 1}
    msg = encode(ENGINE, values)
    if data is not None:
        msg.data, msg.dlc = bytearray(data), len(data)
    return msg


def identity_holds(fig) -> bool:
    return fig["frames"] == (fig["readings"] + fig["unknown_ids"] + fig["decode_failures"]
                             + fig["error_frames"] + fig["remote_frames"])


@pytest.fixture
def channel():
    return new_channel()


@pytest.fixture
def sender(channel):
    bus = can.Bus(interface="virtual", channel=channel, ignore_config=True)
    yield bus
    bus.shutdown()


# ---- settings ----------------------------------------------------------------------------------
def test_settings_from_toml_take_documented_defaults():
    text = f"""
        dbc = "{DBC}"
        channel = "can0"
        filters = [{{ can_id = 0x1A0 }}, {{ can_id = 0x18FF50E5, extended = true }}]
        kinds = {{ EngineData = "engine" }}
    """
    s = structure_strict(tomllib.loads(text), CanSourceSettings, "gw.toml")
    assert (s.interface, s.bitrate, s.port, s.decode_choices, s.unknown_ids) == (
        "socketcan", 0, 0, False, "count")
    assert s.filters == (CanFilterSettings(0x1A0), CanFilterSettings(0x18FF50E5, extended=True))
    assert s.bus_kwargs() == {
        "interface": "socketcan", "channel": "can0",
        "can_filters": [{"can_id": 0x1A0, "can_mask": 0x1FFFFFFF, "extended": False},
                        {"can_id": 0x18FF50E5, "can_mask": 0x1FFFFFFF, "extended": True}],
    }
    udp = CanSourceSettings(dbc=DBC, interface="udp_multicast")
    assert udp.bus_channel == "239.74.163.2"  # python-can's IPv4 default group
    assert CanSourceSettings(dbc=DBC, interface="virtual").bus_channel == "channel-0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('dbc = "x.dbc"\ninterface = "nocan"', "interface: must be a python-can interface name "
                                               "(got 'nocan')"),
        ('dbc = "x.dbc"', "channel: must name the CAN network interface for socketcan"),
        ('dbc = "x.dbc"\nchannel = "can0"\nbitrate = 500000',
         "bitrate: must be 0 for socketcan (got 500000): the OS sets it"),
        ('dbc = "x.dbc"\ninterface = "udp_multicast"\nchannel = "10.0.0.1"',
         "channel: must be a multicast group address"),
        ('dbc = "x.dbc"\ninterface = "virtual"\nfilters = [{ can_id = 0x18FF50E5 }]',
         "filters[0].can_id: must be <= 0x7FF for an 11-bit identifier (got 0x18ff50e5); "
         "set extended = true"),
        ('dbc = "x.dbc"\ninterface = "virtual"\nkinds = { EngineData = "bad kind" }',
         "kinds.EngineData: must be 1-128 characters"),
        ('dbc = "x.dbc"\ninterface = "virtual"\nunknown_ids = "drop"',
         "unknown_ids: must be one of count, quarantine (got 'drop')"),
        ('dbc = "x.dbc"\ninterface = "virtual"\nreconnect_min_s = 5\nreconnect_max_s = 1',
         "reconnect_max_s: must be >= reconnect_min_s (5.0)"),
        ('dbc = "x.dbc"\ninterface = "virtual"\nport = 4000', "port: is for interface "
                                                             "udp_multicast only"),
        ('dbc = ""\ninterface = "virtual"', "dbc: must name the DBC file"),
        ('interface = "virtual"', "dbc: required key 'dbc' is missing"),
        ('dbc = "x.dbc"\ninterface = "virtual"\nmax_frames_per_poll = 0',
         "max_frames_per_poll: must be > 0 (got 0)"),
        ('dbc = "x.dbc"\ninterface = "virtual"\nbogus = 1', "unknown key(s) bogus"),
    ],
)
def test_bad_settings_name_the_key_the_value_and_the_rule(text, expected):
    with pytest.raises(ConfigError) as info:
        structure_strict(tomllib.loads(text), CanSourceSettings, "gw.toml")
    assert expected in str(info.value)


# ---- decoding on a virtual bus -----------------------------------------------------------------
def test_frames_decode_to_the_encoded_values_with_their_timestamps(channel):
    src = opened(channel, kinds={"EngineData": "engine", "VehicleDynamics": "imu"})
    sender = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True,
                     ignore_config=True)
    sent = []
    t0 = time.time() - 5.0
    for k in range(0, 1200, 7):  # ticks across the whole driving story
        for message, values in plan(DB, 3, k, 20.0):
            msg = encode(message, values)
            msg.timestamp = t0 + len(sent) * 0.000_123_4
            sender.send(msg)
            sent.append((message, values, msg.timestamp))
    sender.shutdown()
    readings, quarantined = poll_until(src, len(sent))
    assert quarantined == [] and len(readings) == len(sent)
    kinds = {"EngineData": "engine", "VehicleDynamics": "imu"}
    for reading, (message, values, ts) in zip(readings, sent, strict=True):
        assert reading.kind == kinds.get(message.name, message.name)
        assert (reading.device_id, reading.sensor_id) == ("veh-001", "can0")
        assert reading.ts == round(ts * 1e6) * 1000  # the frame's time, to the microsecond
        assert set(reading.values) == set(values)
        for name, value in values.items():
            sig = message.get_signal_by_name(name)
            assert abs(reading.values[name] - value) <= sig.scale / 2 + 1e-9, (name, value)
    fig = src.figures()
    assert fig["readings"] == fig["frames"] == len(sent) and fig["state"] == "open"
    assert fig["clock_fallbacks"] == 0 and identity_holds(fig)
    # multiplexed: each TireStatus frame carries the wheel its TireIndex selects
    tires = [r.values for r in readings if r.kind == "TireStatus"]
    assert {next(n for n in v if n.startswith("Pressure")) for v in tires} == {
        "PressureFL", "PressureFR", "PressureRL", "PressureRR"}
    src.close()


def test_enumerated_signals_give_numbers_or_labels(channel, sender):
    values = {"PedalState": 1, "AbsActive": 0, "BrakePressure": 12.3, "PedalTravel": 40.0}
    numbers, labels = opened(channel), opened(channel, decode_choices=True)
    sender.send(frame(BRAKE, values))
    (n,), _ = poll_until(numbers, 1)
    (lab,), _ = poll_until(labels, 1)
    assert n.values["PedalState"] == 1 and type(n.values["PedalState"]) is int
    assert lab.values["PedalState"] == "Pressed" and lab.values["AbsActive"] == "Inactive"
    assert lab.values["BrakePressure"] == pytest.approx(12.3)


def test_missing_or_implausible_frame_time_falls_back_to_the_receive_clock(channel):
    now_ns = time.time_ns()
    src = opened(channel, clock_ns=lambda: now_ns)
    sender = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True,
                     ignore_config=True)
    for ts in (0.0, 12_345.678, now_ns / 1e9 + 86_400.0, now_ns / 1e9 - 1.0):
        msg = engine_frame()
        msg.timestamp = ts
        sender.send(msg)
    sender.shutdown()
    readings, _ = poll_until(src, 4)
    # no time, seconds since the adapter's power-up, a day ahead: the receive clock
    assert [r.ts for r in readings[:3]] == [now_ns] * 3
    assert readings[3].ts == round((now_ns / 1e9 - 1.0) * 1e6) * 1000
    assert src.figures()["clock_fallbacks"] == 3


def test_filters_let_only_matching_frames_through(channel, sender):
    filters = (CanFilterSettings(0x1A0, 0x7F0), CanFilterSettings(0x18FF50E5, extended=True))
    src = opened(channel, filters=filters)
    for message, values in plan(DB, 1, 0, 20.0):
        sender.send(encode(message, values))
    # 0x1A5 passes the 0x1A_ filter but is unknown; a 29-bit 0x1A0 does not pass
    sender.send(can.Message(arbitration_id=0x1A5, is_extended_id=False, data=bytes(8)))
    sender.send(can.Message(arbitration_id=0x1A0, is_extended_id=True, data=bytes(8)))  # 29-bit
    sender.send(can.Message(arbitration_id=0x040, is_error_frame=True, data=bytes(8)))
    readings, quarantined = poll_until(src, 2)
    src.poll(100)
    assert sorted(r.kind for r in readings) == ["BatteryStatus", "EngineData"]
    fig = src.figures()
    # passed: 2 readings, 0x1A5 (unknown), the error frame (error frames always pass)
    assert (fig["frames"], fig["unknown_ids"], fig["error_frames"]) == (4, 1, 1)
    assert fig["filtered"] == 4  # VehicleDynamics, BrakeStatus, TireStatus, 29-bit 0x1A0
    assert identity_holds(fig)


def test_unknown_ids_are_counted_per_id_and_quarantined_when_configured(channel, sender):
    counting, quarantining = opened(channel), opened(channel, unknown_ids="quarantine")
    for can_id, ext, n in ((0x123, False, 3), (0x18DAF110, True, 1), (0x7FF, False, 2)):
        for _ in range(n):
            sender.send(can.Message(arbitration_id=can_id, is_extended_id=ext,
                                    data=b"\x01\x02\x03"))
    sender.send(engine_frame())
    readings, quarantined = poll_until(counting, 1)
    assert len(readings) == 1 and quarantined == []
    fig = counting.figures()
    assert fig["unknown_ids"] == 6 and fig["unknown_top"] == "0x123=3, 0x7FF=2, 0x18DAF110=1"
    assert fig["quarantined"] == 0 and identity_holds(fig)

    readings, quarantined = poll_until(quarantining, 7)
    assert len(readings) == 1 and len(quarantined) == 6
    q = quarantined[3]
    assert q.source == "can:0x18daf110"
    assert q.reason == ("unknown CAN id 0x18DAF110 (29-bit, 3 data bytes): demo_vehicle.dbc "
                        "does not define it")
    assert q.raw == struct.pack(">I", 0x18DAF110 | 0x80000000) + b"\x01\x02\x03"
    assert quarantining.figures()["quarantined"] == 6


def test_error_frames_and_bus_off_are_counted_and_reported(channel, sender):
    src = opened(channel)
    sender.send(can.Message(arbitration_id=0x004, is_error_frame=True,
                            data=bytes([0, 0x10, 0, 0, 0, 0, 0, 0])))  # controller: rx-passive
    sender.send(can.Message(arbitration_id=0x040, is_error_frame=True, data=bytes(8)))
    assert poll_until(src, 1, deadline_s=0.2) == ([], [])
    fig = src.figures()
    assert (fig["error_frames"], fig["bus_off"], fig["frames"]) == (2, 1, 2)
    assert fig["last_error"] == "bus-off"
    assert "bus-off reported by the CAN controller" in fig["problem"]
    sender.send(can.Message(arbitration_id=0x004, is_error_frame=True,
                            data=bytes([0, 0x14, 0, 0, 0, 0, 0, 0])))
    sender.send(engine_frame())  # the controller is back: data flows, the problem clears
    readings, _ = poll_until(src, 1)
    fig = src.figures()
    assert len(readings) == 1 and fig["problem"] == "" and fig["bus_off"] == 1
    assert fig["last_error"] == "controller (rx-warning, rx-passive)" and identity_holds(fig)


def test_wrong_length_frame_is_quarantined_while_good_frames_keep_flowing(channel, sender):
    src = opened(channel)
    good = engine_frame(2000.0)
    sender.send(engine_frame(data=bytes(good.data[:3])))
    sender.send(good)
    sender.send(engine_frame(data=bytes(good.data) + b"\x00"))  # one byte too many
    sender.send(good)
    readings, quarantined = poll_until(src, 4)
    assert [r.values["EngineSpeed"] for r in readings] == [2000.0, 2000.0]
    assert [q.reason for q in quarantined] == [
        "EngineData (0x1A0): 3 data bytes, demo_vehicle.dbc says 8",
        "EngineData (0x1A0): 9 data bytes, demo_vehicle.dbc says 8",
    ]
    assert quarantined[0].source == "can:0x1a0"
    assert quarantined[0].raw == b"\x00\x00\x01\xa0" + bytes(good.data[:3])
    fig = src.figures()
    assert (fig["decode_failures"], fig["quarantined"]) == (2, 2) and identity_holds(fig)


def test_undecodable_values_are_quarantined_with_the_signal_named(channel, sender, tmp_path):
    dbc = tmp_path / "odd.dbc"
    dbc.write_text(
        'VERSION ""\nNS_ :\nBS_:\nBU_: X GW\n'
        'BO_ 256 _OddMessage: 8 X\n'
        ' SG_ Sel M : 0|8@1+ (1,0) [0|255] "" GW\n'
        ' SG_ A m0 : 8|8@1+ (1,0) [0|255] "" GW\n'
        ' SG_ B m1 : 8|8@1+ (1,0) [0|255] "" GW\n'
        ' SG_ Temp : 32|32@1- (1,0) [0|0] "degC" GW\n'
        "SIG_VALTYPE_ 256 Temp : 1;\n"
    )
    src = opened(channel, dbc=str(dbc))

    def send(sel: int, temp: float) -> None:
        data = bytes([sel, 7, 0, 0]) + struct.pack("<f", temp)
        sender.send(can.Message(arbitration_id=0x100, is_extended_id=False, data=data))

    send(1, float("nan"))
    send(9, 20.5)  # no signals for multiplexer value 9
    send(1, 21.5)
    readings, quarantined = poll_until(src, 3)
    assert [dict(r.values) for r in readings] == [{"Sel": 1, "Temp": 21.5, "B": 7}]
    assert readings[0].kind == "OddMessage"  # the message name made an identifier
    assert quarantined[0].reason.startswith("_OddMessage (0x100): Reading.values.Temp must be "
                                            "a finite number")
    assert quarantined[1].reason == ("_OddMessage (0x100): cannot decode: expected multiplexer "
                                     "id 0 or 1, but got 9")
    assert identity_holds(src.figures())


def test_value_names_are_made_identifier_safe_and_unique():
    assert safe_name("EngineSpeed") == "EngineSpeed"
    assert safe_name("_hidden") == "hidden" and safe_name("a b$c") == "a_b_c"
    assert safe_name("___") == "signal" and len(safe_name("x" * 300)) == 128
    db = cantools.database.load_string(
        'VERSION ""\nNS_ :\nBS_:\nBU_: X\nBO_ 5 M: 2 X\n'
        ' SG_ a_b : 0|8@1+ (1,0) [0|0] "" X\n SG_ _a_b : 8|8@1+ (1,0) [0|0] "" X\n',
        database_format="dbc")
    decoder = FrameDecoder(db, can_settings("x"), "can0", "veh-001")
    out = decoder.decode(can.Message(arbitration_id=5, is_extended_id=False, data=b"\x01\x02",
                                     timestamp=time.time()), time.time_ns())
    assert dict(out.values) == {"a_b": 1, "a_b_2": 2}


# ---- configuration errors at open --------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "DBC file '{path}' not found (setting dbc"),
        ("this is not a DBC\nBO_ x\n", "DBC file '{path}' cannot be parsed: DBC: \"Invalid "
                                       "syntax at line 1, column 1"),
        ("", "DBC file '{path}' cannot be parsed"),
        ('VERSION ""\nNS_ :\nBS_:\nBU_: X\n', "DBC file '{path}' defines no CAN messages"),
        ('VERSION ""\nBO_ 416 E: 8 X\n SG_ S : 70|16@1+ (1,0) [0|1] "" X\n',
         "DBC file '{path}' cannot be parsed: DBC: \"The signal S does not fit in message E.\""),
    ],
)
def test_dbc_missing_or_garbage_is_a_clear_value_error(tmp_path, content, expected):
    path = tmp_path / "vehicle.dbc"
    if content is not None:
        path.write_text(content)
    src = CanSource(can_settings(new_channel(), dbc=str(path)), "can0", "veh-001")
    with pytest.raises(ValueError) as info:
        src.open()
    assert str(info.value).startswith(f"CAN sensor can0: {expected.format(path=path)}")
    assert src.poll(10) == ([], [])


def test_kinds_naming_a_message_the_dbc_lacks_is_a_value_error():
    src = CanSource(can_settings(new_channel(), kinds={"EngineDta": "engine"}), "can0", "v1")
    with pytest.raises(ValueError, match="kinds names message.s. EngineDta that DBC file .* "
                                         "does not define .it defines: BatteryStatus, "):
        src.open()


def test_an_interface_python_can_cannot_load_here_is_a_value_error():
    # python-can knows "vector" but it runs on Windows only: no retry cures that.
    src = CanSource(can_settings("0", interface="vector"), "can0", "veh-001")
    with pytest.raises(ValueError, match="interface 'vector' with channel '0' cannot be used"):
        src.open()


def test_socketcan_without_the_interface_backs_off_instead_of_raising():
    # No CAN interface (or no SocketCAN at all) here: the Pi's can0 may come up later.
    clock = FakeClock()
    src = CanSource(CanSourceSettings(dbc=DBC, channel="fgwtest0"), "can0", "veh-001",
                    clock=clock, rng=random.Random(0))
    src.open()
    fig = src.figures()
    assert fig["state"] == "backoff" and fig["bus_errors"] == 1
    assert fig["problem"].startswith("cannot open socketcan:fgwtest0: ")
    assert "retrying in" in fig["problem"] and src.fileno() is None
    t = time.perf_counter()
    assert src.poll(100) == ([], [])
    clock.t += 1.0
    assert src.poll(100) == ([], [])  # tried again, still not there
    assert time.perf_counter() - t < 0.5
    assert src.figures()["bus_errors"] == 2


# ---- failure and recovery ----------------------------------------------------------------------
def test_bus_shut_down_under_the_source_is_reopened_after_backoff(channel, sender):
    clock = FakeClock()
    src = opened(channel, clock=clock, rng=random.Random(1), reconnect_min_s=0.5)
    sender.send(engine_frame(1000.0))
    assert len(poll_until(src, 1)[0]) == 1
    src.bus.shutdown()  # the bus dies under the source
    assert src.poll(100) == ([], [])
    fig = src.figures()
    assert fig["state"] == "backoff" and fig["bus_errors"] == 1
    assert "Cannot operate on a closed bus" in fig["problem"]
    clock.t += 0.5 * 0.75 - 0.01  # not yet: the first delay is 0.5 s less up to 25 % jitter
    assert src.poll(100) == ([], []) and src.state == "backoff"
    clock.t += 0.2
    assert src.poll(100) == ([], []) and src.state == "open"
    sender.send(engine_frame(1100.0))
    readings, _ = poll_until(src, 1)
    assert [r.values["EngineSpeed"] for r in readings] == [1100.0]
    fig = src.figures()
    assert (fig["reconnects"], fig["problem"], fig["state"]) == (1, "", "open")


def test_failing_interface_backs_off_doubling_to_the_cap_then_data_flows(channel, sender):
    clock = FakeClock()
    attempts: list[float] = []

    def flaky_bus(**kwargs):
        attempts.append(clock.t)
        if len(attempts) <= 5:
            raise can.CanInitializationError("adapter unplugged")
        return can.Bus(ignore_config=True, **kwargs)

    src = opened(channel, clock=clock, bus_factory=flaky_bus, rng=random.Random(2),
                 reconnect_min_s=1.0, reconnect_max_s=4.0)
    assert src.state == "backoff" and "adapter unplugged" in src.problem
    for _ in range(2000):
        if src.state == "open":
            break
        assert src.poll(100) == ([], [])
        clock.t += 0.01
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    for gap, delay in zip(gaps, (1.0, 2.0, 4.0, 4.0, 4.0), strict=True):
        assert delay * 0.75 - 1e-9 <= gap <= delay + 0.011, gaps
    sender.send(engine_frame(900.0))
    readings, _ = poll_until(src, 1)
    assert len(readings) == 1 and src.figures()["bus_errors"] == 5
    # data flowed: the next failure starts again at the shortest delay
    src.bus.shutdown()
    src.poll(100)
    assert "retrying in 0." in src.problem or "retrying in 1.0 s" in src.problem


def test_poll_bounds_readings_and_frames_and_close_stops_it(channel, sender):
    src = opened(channel, max_frames_per_poll=7)
    for rpm in range(30):
        sender.send(engine_frame(1000.0 + rpm))
    assert len(src.poll(5)[0]) == 5  # max_items
    assert len(src.poll(100)[0]) == 7  # max_frames_per_poll
    assert src.poll(0) == ([], [])
    got = []
    while len(got) < 18:
        got += src.poll(100)[0]
    assert [r.values["EngineSpeed"] for r in got] == [1000.0 + k for k in range(12, 30)]
    src.close()
    sender.send(engine_frame())
    assert src.poll(100) == ([], []) and src.figures()["state"] == "closed"
    assert src.fileno() is None


# ---- fuzz --------------------------------------------------------------------------------------
KNOWN = [(m.frame_id, m.is_extended_frame, m.length) for m in DB.messages]
frames = st.one_of(
    st.builds(  # a DBC message's id with any data
        lambda known, data, fd: (known[0], known[1], data, False, fd),
        st.sampled_from(KNOWN), st.binary(max_size=12), st.booleans(),
    ),
    st.builds(  # a DBC message with data of the right length
        lambda known, raw: (known[0], known[1], raw[: known[2]], False, False),
        st.sampled_from(KNOWN), st.binary(min_size=8, max_size=8),
    ),
    st.tuples(  # anything
        st.integers(0, 0x1FFFFFFF), st.booleans(), st.binary(max_size=64), st.booleans(),
        st.booleans(),
    ),
)
timestamps = st.one_of(
    st.just(None), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**20, 10**20)
)


def to_message(spec, ts=None) -> can.Message:
    can_id, ext, data, error, fd = spec
    if not ext:
        can_id &= 0x7FF
    return can.Message(arbitration_id=can_id, is_extended_id=ext, data=data,
                       is_error_frame=error, is_fd=fd or len(data) > 8,
                       timestamp=time.time() if ts is None else ts)


@settings(max_examples=200, deadline=None)
@given(specs=st.lists(st.tuples(frames, timestamps), max_size=30),
       choices=st.booleans(), unknown=st.sampled_from(["count", "quarantine"]))
def test_fuzzed_frames_never_escape_and_counts_add_up(specs, choices, unknown):
    decoder = FrameDecoder(DB, can_settings("x", decode_choices=choices, unknown_ids=unknown),
                           "can0", "veh-001", DBC)
    now = time.time_ns()
    outs = [decoder.decode(to_message(spec, ts), now) for spec, ts in specs]
    fig = decoder.figures()
    assert identity_holds(fig) and fig["frames"] == len(specs)
    assert sum(isinstance(o, Reading) for o in outs) == fig["readings"]
    assert len(outs) - outs.count(None) - fig["readings"] == fig["quarantined"]
    good = decoder.decode(engine_frame(1234.0), now)  # good data after garbage comes through
    assert isinstance(good, Reading) and good.values["EngineSpeed"] == 1234.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(frames, max_size=25))
def test_fuzzed_frames_on_a_bus_never_escape_a_poll(specs):
    channel = new_channel()
    src = opened(channel, unknown_ids="quarantine")
    bus = can.Bus(interface="virtual", channel=channel, ignore_config=True)
    try:
        for spec in specs:
            bus.send(to_message(spec))
        bus.send(engine_frame(4321.0))
        readings, quarantined = poll_until(src, 1 + sum(not s[3] for s in specs), 2.0)
        fig = src.figures()
        assert fig["frames"] == len(specs) + 1 and identity_holds(fig)
        assert readings[-1].values["EngineSpeed"] == 4321.0 and fig["state"] == "open"
        assert len(quarantined) == fig["quarantined"]
    finally:
        bus.shutdown()
        src.close()


def test_raw_frame_is_the_socketcan_layout():
    msg = can.Message(arbitration_id=0x1A0, is_extended_id=False, data=b"\x01\x02")
    assert raw_frame(msg) == b"\x00\x00\x01\xa0\x01\x02"
    msg = can.Message(arbitration_id=0x18FF50E5, is_extended_id=True, data=b"")
    assert raw_frame(msg) == b"\x98\xff\x50\xe5"


# ---- udp_multicast across processes ------------------------------------------------------------
def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class PlayedValues:
    """The value sets the player sends, as decoded, per message: computed tick by tick as far
    as needed (the player starts at tick 0; at most ``max_ticks``)."""

    def __init__(self, seed: int, rate: float, max_ticks: int) -> None:
        self.seed, self.rate, self.max_ticks, self.k = seed, rate, max_ticks, 0
        self.seen: dict[str, set[tuple]] = {m.name: set() for m in DB.messages}

    def __contains__(self, reading: Reading) -> bool:
        values = tuple(sorted(reading.values.items()))
        while values not in self.seen[reading.kind] and self.k < self.max_ticks:
            for message, planned in plan(DB, self.seed, self.k, self.rate):
                decoded = message.decode(encode(message, planned).data, decode_choices=False)
                self.seen[message.name].add(tuple(sorted(decoded.items())))
            self.k += 1
        return values in self.seen[reading.kind]


def test_player_in_another_process_is_decoded_over_udp_multicast():
    port = free_udp_port()
    src = opened(GROUP, interface="udp_multicast", port=port)
    assert src.state == "open", src.problem
    fd = src.fileno()
    assert isinstance(fd, int) and fd >= 0
    started_ns = time.time_ns()
    player = subprocess.Popen(
        [sys.executable, "-m", "tools.can_player", "--interface", "udp_multicast",
         "--channel", GROUP, "--port", str(port), "--dbc", DBC, "--rate", "50",
         "--seconds", "30", "--seed", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    readings = []
    try:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            r, q = poll_until(src, 1, deadline_s=0.5)
            assert q == []
            readings += r
            per_kind = {k: sum(x.kind == k for x in readings) for k in
                        ("EngineData", "VehicleDynamics", "BrakeStatus", "BatteryStatus",
                         "TireStatus")}
            if min(per_kind.values()) >= 10:
                break
            assert player.poll() is None, player.communicate()
    finally:
        player.terminate()
        _, err = player.communicate(timeout=10)
    assert min(per_kind.values()) >= 10, (per_kind, err)
    played = PlayedValues(5, 50.0, 50 * 30)
    now_ns = time.time_ns()
    for r in readings:
        assert r in played, r
        assert started_ns <= r.ts <= now_ns  # the kernel's receive time
    assert b"can_player: 5 messages x 50 Hz on udp_multicast:" + GROUP.encode() in err
    assert identity_holds(src.figures())
    src.close()


def test_garbled_datagram_on_the_group_is_quarantined_and_frames_keep_flowing():
    port = free_udp_port()
    src = opened(GROUP, interface="udp_multicast", port=port)
    bus = can.Bus(interface="udp_multicast", channel=GROUP, port=port, ignore_config=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        raw.sendto(b"\xc1 not msgpack", (GROUP, port))
    try:
        bus.send(engine_frame(3000.0))
        readings, quarantined = poll_until(src, 2)
    finally:
        bus.shutdown()
    assert [r.values["EngineSpeed"] for r in readings] == [3000.0]
    assert len(quarantined) == 1 and quarantined[0].reason.startswith(
        f"undecodable datagram on udp_multicast:{GROUP}")
    fig = src.figures()
    assert fig["state"] == "open" and fig["reconnects"] == 0 and identity_holds(fig)
    src.close()


def test_play_sends_every_message_each_tick_on_schedule(channel):
    rx = can.Bus(interface="virtual", channel=channel, ignore_config=True)
    tx = can.Bus(interface="virtual", channel=channel, ignore_config=True)
    clock = FakeClock()
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        clock.t += s

    try:
        sent = play(tx, DB, 10.0, 0.5, seed=1, clock=clock, sleep=sleep)
        got = []
        while (msg := rx.recv(timeout=0)) is not None:
            got.append(msg)
    finally:
        rx.shutdown()
        tx.shutdown()
    assert sent == len(got) == 5 * len(DB.messages)
    assert sleeps == pytest.approx([0.1] * 4)
    assert {m.arbitration_id for m in got} == {m.frame_id for m in DB.messages}
    assert math.isclose(clock.t, 1000.4)
