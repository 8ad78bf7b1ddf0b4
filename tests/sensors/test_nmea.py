"""NMEA 0183 source: real receivers' sentences parse to exact values and times, bad lines are
quarantined with a reason while the good ones after them still come through (I8), and the
source survives its connection: UDP, TCP (replay tool, disconnects, backoff) and a serial
port (a pseudo-terminal)."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.sensors.nmea import (
    DATE_MAX_AGE_S,
    UNTIMED_MAX_AGE_S,
    LineFramer,
    NmeaParser,
    NmeaSource,
)
from config.loader import ConfigError, structure_strict
from config.nmea import NmeaSourceSettings, parse_source
from messages.journal import QuarantinedInput
from messages.readings import Reading
from tools.nmea_replay import DEMO_LOG, demo_drive, epochs, main, read_log, replay, sentence

NOW = 1_800_000_000 * 10**9  # the gateway's clock in these tests (2027-01-15)
S = 10**9
ALL = ("GGA", "RMC", "VTG", "GSA", "GLL")


def ts(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp()) * S


def parser(sentences=ALL) -> NmeaParser:
    return NmeaParser(NmeaSourceSettings(sentences=sentences), "gps0", "veh-1", "test")


def parse_all(lines: list[str], p: NmeaParser | None = None, mono: float = 100.0):
    p = p or parser()
    return [p.parse(line.encode("latin-1") + b"\r\n", NOW, mono) for line in lines]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def poll_until(src: NmeaSource, done: Callable[[list, list], bool], timeout: float = 5.0,
               max_items: int = 500) -> tuple[list[Reading], list[QuarantinedInput]]:
    readings: list[Reading] = []
    quarantined: list[QuarantinedInput] = []
    deadline = time.monotonic() + timeout
    while not done(readings, quarantined):
        assert time.monotonic() < deadline, (len(readings), quarantined, src.figures())
        r, q = src.poll(max_items)
        readings += r
        quarantined += q
        if not r and not q:
            fd = src.fileno()
            select.select([fd] if fd is not None else [], [], [], 0.01)
    return readings, quarantined


# ---- real-world sentences: exact values --------------------------------------------------------
# u-blox NEO-M9N, MTK and SiRF receivers' output and the NMEA examples everyone quotes; GN is a
# multi-constellation talker, GP GPS only.
REAL = [
    ("$GNGGA,103309.000,4935.780351,N,00700.812390,E,2,17,0.72,465.352,M,47.791,M,,*70",
     {"lat": 49.59633918, "lon": 7.01353983, "alt_m": 465.352, "geoid_m": 47.791, "sats": 17,
      "hdop": 0.72, "quality": 2, "fix": 2, "sentence": "GGA", "talker": "GN"}),
    ("$GNRMC,103309.000,A,4935.780351,N,00700.812390,E,0.01,58.03,271020,,,D*41",
     {"lat": 49.59633918, "lon": 7.01353983, "speed_kmh": 0.019, "course_deg": 58.03,
      "status": "A", "mode": "D", "sentence": "RMC", "talker": "GN"}),
    ("$GNVTG,5.40,T,,M,1.908,N,3.536,K,A*21",
     {"course_deg": 5.4, "speed_kmh": 3.536, "mode": "A", "sentence": "VTG", "talker": "GN"}),
    ("$GNGSA,A,3,78,69,68,70,80,79,,,,,,,0.97,0.59,0.77,2*0F",
     {"selection": "A", "fix": 2, "sats_used": 6, "pdop": 0.97, "hdop": 0.59, "vdop": 0.77,
      "system": 2, "sentence": "GSA", "talker": "GN"}),
    ("$GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,*76",
     {"lat": 53.36133667, "lon": -6.50562, "alt_m": 61.7, "geoid_m": 55.2, "sats": 8,
      "hdop": 1.03, "quality": 1, "fix": 2, "sentence": "GGA", "talker": "GP"}),
    ("$GPRMC,092750.000,A,5321.6802,N,00630.3372,W,0.02,31.66,280511,,,A*43",
     {"lat": 53.36133667, "lon": -6.50562, "speed_kmh": 0.037, "course_deg": 31.66,
      "status": "A", "mode": "A", "sentence": "RMC", "talker": "GP"}),
    ("$GPGSA,A,3,10,07,05,02,29,04,08,13,,,,,1.72,1.03,1.38*0A",
     {"selection": "A", "fix": 2, "sats_used": 8, "pdop": 1.72, "hdop": 1.03, "vdop": 1.38,
      "sentence": "GSA", "talker": "GP"}),
    ("$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000*6D",
     {"lat": -19.48408333, "lon": 24.1751, "alt_m": 100.0, "geoid_m": -33.9, "sats": 4,
      "hdop": 2.6, "quality": 1, "fix": 2, "sentence": "GGA", "talker": "GP"}),
    ("$GPRMC,225446,A,4916.45,N,12311.12,W,000.5,054.7,191194,020.3,E*68",
     {"lat": 49.27416667, "lon": -123.18533333, "speed_kmh": 0.926, "course_deg": 54.7,
      "mag_var_deg": 20.3, "status": "A", "sentence": "RMC", "talker": "GP"}),
    ("$GPVTG,054.7,T,034.4,M,005.5,N,010.2,K*48",
     {"course_deg": 54.7, "course_mag_deg": 34.4, "speed_kmh": 10.2, "sentence": "VTG",
      "talker": "GP"}),
    ("$GPGLL,4916.45,N,12311.12,W,225444,A,*1D",
     {"lat": 49.27416667, "lon": -123.18533333, "status": "A", "sentence": "GLL",
      "talker": "GP"}),
    # a NEO-M9N cold start, before the first lock: no position, fix 0
    ("$GNRMC,,V,,,,,,,,,,N,V*37",
     {"status": "V", "mode": "N", "fix": 0, "sentence": "RMC", "talker": "GN"}),
    ("$GNVTG,,,,,,,,,N*2E", {"mode": "N", "sentence": "VTG", "talker": "GN"}),
    ("$GNGGA,,,,,,0,00,99.99,,,,,,*56",
     {"sats": 0, "hdop": 99.99, "quality": 0, "fix": 0, "sentence": "GGA", "talker": "GN"}),
    ("$GNGSA,A,1,,,,,,,,,,,,,99.99,99.99,99.99,1*33",
     {"selection": "A", "fix": 0, "sats_used": 0, "pdop": 99.99, "hdop": 99.99,
      "vdop": 99.99, "system": 1, "sentence": "GSA", "talker": "GN"}),
    # quality 0 with a stale altitude: the guess is left out
    ("$GNGGA,031921.542,3653.0286,S,17441.8568,E,0,00,,-26.2,M,26.2,M,,0000*6D",
     {"sats": 0, "quality": 0, "fix": 0, "sentence": "GGA", "talker": "GN"}),
    ("$GNGLL,,,,,013104.00,V,N*53",
     {"status": "V", "mode": "N", "fix": 0, "sentence": "GLL", "talker": "GN"}),
]


@pytest.mark.parametrize(("line", "values"), REAL, ids=[r[0][:17] for r in REAL])
def test_real_world_sentences_parse_to_exact_values(line, values):
    [reading] = parse_all([line])
    assert isinstance(reading, Reading), reading
    assert dict(reading.values) == values
    assert (reading.device_id, reading.sensor_id, reading.kind) == ("veh-1", "gps0", "gps")


def test_rmc_date_times_the_epoch_and_untimed_sentences_take_its_time():
    lines = ["$GNRMC,120605.000,A,2252.9008,N,08747.5054,E,1.908,5.40,240721,,,A*4D",
             "$GNVTG,5.40,T,,M,1.908,N,3.536,K,A*21",
             "$GNGSA,A,3,05,07,13,14,15,20,30,,,,,,0.97,0.59,0.77,1*03",
             "$GNGGA,141148.00,4604.15257,N,01108.97976,E,1,12,0.59,372.1,M,46.1,M,,*4C"]
    rmc, vtg, gsa, gga = parse_all(lines)
    assert rmc.ts == vtg.ts == gsa.ts == ts("2021-07-24T12:06:05+00:00")
    assert gga.ts == ts("2021-07-24T14:11:48+00:00")


def test_fractional_seconds_are_kept():
    p = parser()
    parse_all([sentence("GPRMC,235959.25,A,4807.038,N,01131.000,E,0.0,0.0,140524,,,A")], p)
    [gga] = parse_all([sentence("GPGGA,235959.75,4807.038,N,01131.000,E,1,08,0.9,545.4,M,"
                                "46.9,M,,")], p)
    assert gga.ts == ts("2024-05-14T23:59:59+00:00") + 750_000_000


def test_sentences_before_any_date_carry_the_receive_time():
    p = parser()
    gga, rmc, gga2 = parse_all([
        sentence("GPGGA,093000.00,3844.214,N,00908.562,W,1,08,1.0,62.0,M,50.2,M,,"),
        sentence("GPRMC,093001.00,A,3844.214,N,00908.562,W,0.0,0.0,140524,,,A"),
        sentence("GPGGA,093001.00,3844.214,N,00908.562,W,1,08,1.0,62.0,M,50.2,M,,"),
    ], p)
    assert gga.ts == NOW and p.counts["ts_from_receive"] == 1
    assert rmc.ts == gga2.ts == ts("2024-05-14T09:30:01+00:00")


def test_utc_midnight_rolls_the_date_over_until_the_next_rmc():
    p = parser()
    readings = parse_all([
        sentence("GPRMC,235959.00,A,4807.038,N,01131.000,E,0.0,0.0,311224,,,A"),
        sentence("GPGGA,000000.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"),
        sentence("GPGGA,000001.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"),
        sentence("GPVTG,0.0,T,,M,0.0,N,0.0,K,A"),
        # a late sentence from before midnight lands on the old day
        sentence("GPGGA,235959.50,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"),
        sentence("GPRMC,000002.00,A,4807.038,N,01131.000,E,0.0,0.0,010125,,,A"),
    ], p)
    assert [r.ts for r in readings] == [
        ts("2024-12-31T23:59:59+00:00"), ts("2025-01-01T00:00:00+00:00"),
        ts("2025-01-01T00:00:01+00:00"), ts("2025-01-01T00:00:01+00:00"),
        ts("2024-12-31T23:59:59+00:00") + S // 2, ts("2025-01-01T00:00:02+00:00")]


def test_a_date_before_2000_is_not_trusted():
    """A receiver without a valid almanac (or a week-number roll-over) reports 1998."""
    p = parser()
    rmc, gga = parse_all([
        "$GPRMC,161229.487,A,3723.2475,N,12158.3416,W,0.13,309.62,120598,,*10",
        sentence("GPGGA,161230.00,3723.2475,N,12158.3416,W,1,07,1.0,9.0,M,,,,"),
    ], p)
    assert rmc.ts == gga.ts == NOW
    assert rmc.values["lat"] == 37.38745833
    assert p.counts["bad_dates"] == 1 and p.counts["ts_from_receive"] == 2


def test_stale_date_and_stale_epoch_time_fall_back_to_the_receive_time():
    p = parser()
    rmc_line = sentence("GPRMC,093000.00,A,4807.038,N,01131.000,E,0.0,0.0,140524,,,A")
    gga_line = sentence("GPGGA,093005.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")
    vtg_line = sentence("GPVTG,0.0,T,,M,0.0,N,0.0,K,A")
    [rmc] = parse_all([rmc_line], p, mono=100.0)
    [vtg] = parse_all([vtg_line], p, mono=100.0 + UNTIMED_MAX_AGE_S + 1)
    assert rmc.ts == ts("2024-05-14T09:30:00+00:00") and vtg.ts == NOW
    [gga] = parse_all([gga_line], p, mono=100.0 + DATE_MAX_AGE_S + 1)
    assert gga.ts == NOW  # the date may be stale: wait for the next RMC


# ---- bad lines: quarantined with a reason ------------------------------------------------------
GGA = "GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"
BAD = [
    ("$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*48", "bad_checksum",
     "checksum mismatch: the line says *48, its content gives *47"),
    ("$" + GGA, "no_checksum", "no checksum: '*hh' missing at the end (a truncated line"),
    ("$GPGGA,123519,4807.038,N,011", "no_checksum", "no checksum"),
    (sentence(GGA)[:-1], "truncated", "truncated: the checksum is cut short ('*4')"),
    ("$" + GGA + "*4G", "malformed", "the checksum must be two hex digits"),
    (sentence("GPGGA,123519,4807.038,N,01131.000,E"), "truncated",
     "truncated: GGA has 5 fields, expected at least 14"),
    (sentence("GPGGA,123519,48x7.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_field",
     "GGA field lat '48x7.038' is not ddmm.mmmm"),
    (sentence("GPGGA,123519,9107.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_field",
     "GGA field lat '9107.038','N' is out of range"),
    (sentence("GPGGA,123519,4807.038,,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_field",
     "lacks its N/S direction"),
    (sentence("GPGGA,253519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_field",
     "GGA field time '253519' is not hhmmss.ss UTC"),
    (sentence("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,nan,M,46.9,M,,"), "bad_field",
     "GGA field altitude 'nan' is not a number"),
    (sentence("GPRMC,123519,X,4807.038,N,01131.000,E,0.0,0.0,140524,,,A"), "bad_field",
     "RMC field status 'X' must be one of A, V"),
    (sentence("GPRMC,123519,A,4807.038,N,01131.000,E,0.0,0.0,310224,,,A"), "bad_field",
     "RMC field date '310224' is not a calendar date"),
    (sentence("GPGSA,A,3,04,05,,09,12,,,24,,,,,2.5,1.3,2.1,Z"), "bad_field",
     "GSA field system id 'Z' is not a hex digit"),
    ("GPGGA,123519,4807.038,N*00", "no_start", "no sentence start: a sentence begins with '$'"),
    ("$GPGGA,123519,\xb5\x62,N*00", "not_ascii", "byte 0xb5 at offset 14 is not printable"),
    ("$GP\x00GGA*00", "not_ascii", "byte 0x00 at offset 3"),
    (sentence("GPGG,1,2"), "malformed", "address 'GPGG' is not a talker and sentence type"),
    (sentence("GPGGA,1" + ",1" * 60), "too_long",
     "line too long: 133 bytes with CR LF, max_line_bytes is 120"),
]


@pytest.mark.parametrize(("line", "code", "reason"), BAD, ids=[b[1] for b in BAD])
def test_bad_lines_are_quarantined_with_a_clear_reason(line, code, reason):
    p = parser()
    [bad, good] = parse_all([line, sentence(GGA)], p)
    assert isinstance(bad, QuarantinedInput), bad
    assert reason in bad.reason, bad.reason
    assert bad.raw == line.encode("latin-1") + b"\r\n" and bad.source == "test"
    assert p.counts[code] == 1 and p.counts["quarantined"] == 1
    assert isinstance(good, Reading)  # the good line after it still parses


def test_other_sentence_types_are_counted_as_ignored_not_quarantined():
    p = parser(sentences=("GGA", "RMC", "VTG", "GSA"))
    results = parse_all([
        "$GPGSV,3,1,11,03,03,111,00,04,15,270,00,06,01,010,00,13,06,292,00*74",
        "$GNGLL,,,,,013104.00,V,N*53",
        sentence("PUBX,00,081350.00,4717.113210,N"),
        "!AIVDM,1,1,,A,13aEOK?P00PD2wVMdLDRhgvL289?,0*26",
        sentence("GPZDA,201530.00,04,07,2002,00,00"),
        "",
    ], p)
    assert results == [None] * 6
    assert p.counts["ignored"] == 5 and p.counts["quarantined"] == 0
    assert p.ignored_types == ["GSV", "GLL", "PUBX", "VDM", "ZDA"]


# ---- framing ----------------------------------------------------------------------------------
def test_framer_joins_partial_lines_and_accepts_lf_or_crlf():
    f = LineFramer(82)
    assert f.feed(b"$GPGGA,1") == []
    assert f.feed(b"23*00\r\n$GPVTG*00\n$GP") == [(b"$GPGGA,123*00\r\n", False),
                                                  (b"$GPVTG*00\n", False)]
    assert f.take_partial() == b"$GP" and f.take_partial() == b""


def test_framer_cuts_a_runaway_line_and_resumes_at_the_next_line_end():
    f = LineFramer(82)
    out = f.feed(b"x" * 50) + f.feed(b"y" * 50) + f.feed(b"z" * 500)
    assert out == [(b"x" * 50 + b"y" * 32, True)]
    assert f.feed(b"zzz\r\n$GPVTG*00\r\n") == [(b"$GPVTG*00\r\n", False)]
    assert f.discarded_bytes == 18 + 500 + 5


def test_framer_cuts_a_complete_overlong_line_too():
    f = LineFramer(82)
    assert f.feed(b"$" + b"A" * 99 + b"\r\n$GPVTG*00\r\n") == [
        (b"$" + b"A" * 81, True), (b"$GPVTG*00\r\n", False)]
    assert f.discarded_bytes == 20


# ---- settings ---------------------------------------------------------------------------------
def test_source_urls_parse_to_endpoints():
    assert str(parse_source("serial:///dev/ttyACM0?baud=115200")) == \
        "serial:///dev/ttyACM0?baud=115200"
    assert parse_source("serial:///dev/ttyUSB1").baud == 9600
    assert str(parse_source("tcp://gpsd.local:2947")) == "tcp://gpsd.local:2947"
    assert str(parse_source("udp://:10110")) == "udp://127.0.0.1:10110"  # loopback (I9)
    assert str(parse_source("udp://0.0.0.0:10110")) == "udp://0.0.0.0:10110"
    assert str(parse_source("tcp://[::1]:10110")) == "tcp://[::1]:10110"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"source": "http://x:1"}, "source: must be a URL like serial:///dev/ttyACM0"),
        ({"source": "/dev/ttyACM0"}, "source: must be a URL like"),
        ({"source": "serial://dev/ttyACM0"}, "must name a device path: serial:///dev/ttyACM0"),
        ({"source": "serial:///dev/ttyACM0?baud=fast"}, "baud must be a rate in 50..4000000"),
        ({"source": "serial:///dev/ttyACM0?parity=E"}, "knows only the serial option baud"),
        ({"source": "tcp://host"}, "must name the server to connect to: tcp://host:port"),
        ({"source": "tcp://:2947"}, "must name the server to connect to"),
        ({"source": "tcp://h:99999"}, "Port out of range"),
        ({"source": "udp://127.0.0.1"}, "must name the local port to bind"),
        ({"source": "udp://127.0.0.1:1/x"}, "udp URLs take only host:port"),
        ({"sentences": []}, "sentences: must name at least one of GGA"),
        ({"sentences": ["GPGGA"]}, "without the talker (GGA, not GPGGA) (got 'GPGGA')"),
        ({"sentences": ["GSV"]}, "must name types from GGA, GLL, GSA, RMC, VTG"),
        ({"kind": "g p s"}, "kind: must be 1-128 characters"),
        ({"max_line_bytes": 40}, "max_line_bytes: must be in 82..4096 (got 40)"),
        ({"reconnect_min_s": 0}, "reconnect_min_s: must be > 0"),
        ({"reconnect_min_s": 5, "reconnect_max_s": 1}, "reconnect_max_s: must be >= "),
        ({"bogus": 1}, "unknown key(s) bogus"),
    ],
)
def test_bad_nmea_settings_are_refused_naming_key_and_rule(data, needle):
    with pytest.raises(ConfigError) as info:
        structure_strict(data, NmeaSourceSettings, "gw.toml")
    assert any(needle in p for p in info.value.problems), info.value.problems


def test_settings_from_a_toml_table():
    s = structure_strict({"source": "tcp://127.0.0.1:2947", "sentences": ["GGA", "RMC"],
                          "reconnect_max_s": 10}, NmeaSourceSettings)
    assert s.sentences == ("GGA", "RMC") and s.reconnect_max_s == 10.0
    assert s.endpoint.port == 2947


# ---- the demo log and the replay tool ---------------------------------------------------------
def test_demo_log_is_what_the_generator_writes(tmp_path):
    assert read_log(DEMO_LOG) == [line.encode("latin-1") for line in demo_drive()]
    assert main(["--write-demo", str(tmp_path / "d.nmea")]) == 0
    assert (tmp_path / "d.nmea").read_bytes() == DEMO_LOG.read_bytes()


def test_demo_log_is_a_five_minute_drive_with_a_few_bad_lines():
    p = parser(sentences=("GGA", "RMC", "VTG", "GSA"))
    lines = read_log(DEMO_LOG)
    results = [p.parse(line, NOW, 1.0) for line in lines]
    readings = [r for r in results if isinstance(r, Reading)]
    assert len(epochs(lines)) == 300
    assert p.counts["bad_checksum"] == 2 and p.counts["no_checksum"] == 2
    assert p.counts["not_ascii"] == 1 and p.counts["quarantined"] == 5
    assert p.counts["ignored"] == 30 and p.counts["ts_from_receive"] == 0
    times = sorted({r.ts for r in readings})
    assert times[0] == ts("2024-05-14T09:30:00+00:00")
    assert times[-1] == ts("2024-05-14T09:34:59+00:00")
    assert any(r.values.get("fix") == 0 for r in readings)  # the tunnel
    assert max(r.values.get("speed_kmh", 0) for r in readings) == pytest.approx(55, abs=0.1)


def test_replay_command_line_refuses_a_bad_target(tmp_path, capsys):
    assert main([str(DEMO_LOG), "http://x:1"]) == 2
    assert "target must be udp://host:port or tcp://host:port" in capsys.readouterr().err


def expected_from_log(lines: list[bytes]) -> tuple[list[Reading], list[str]]:
    """What parsing the log directly gives: the source over a network must give the same."""
    p = parser(sentences=("GGA", "RMC", "VTG", "GSA"))
    out = [p.parse(line, NOW, 1.0) for line in lines]
    return ([r for r in out if isinstance(r, Reading)],
            [q.reason for q in out if isinstance(q, QuarantinedInput)])


def start_replay(lines, url, rate_hz=0.0, **kwargs):
    """The replay tool in a thread; returns (thread, stop event, listening address getter)."""
    listening = threading.Event()
    address: list = []
    stop = threading.Event()

    def on_listen(addr):
        address.append(addr)
        listening.set()

    thread = threading.Thread(target=replay, args=(lines, url, rate_hz),
                              kwargs={"stop": stop, "on_listen": on_listen, **kwargs},
                              daemon=True)
    thread.start()

    def where() -> tuple[str, int]:
        assert listening.wait(5), "the replay tool did not start listening"
        return address[0]

    return thread, stop, where


@pytest.mark.parametrize("per_epoch", [True, False])
def test_udp_replay_of_the_demo_log_arrives_parsed_and_quarantined(per_epoch):
    src = NmeaSource(NmeaSourceSettings(source="udp://127.0.0.1:0"), "gps0", "veh-1",
                     clock_ns=lambda: NOW)
    src.open()
    try:
        assert src.figures()["state"] == "open" and src.fileno() is not None
        lines = read_log(DEMO_LOG)
        want_readings, want_reasons = expected_from_log(lines)
        port = src.address[1]
        thread, stop, _ = start_replay(lines, f"udp://127.0.0.1:{port}", 0 if per_epoch else 600,
                                       per_epoch=per_epoch)
        readings, quarantined = poll_until(
            src, lambda r, q: len(r) + len(q) >= len(want_readings) + len(want_reasons))
        thread.join(5)
        assert [r.values for r in readings] == [r.values for r in want_readings]
        assert [r.ts for r in readings] == [r.ts for r in want_readings]
        assert [q.reason for q in quarantined] == want_reasons
        figures = src.figures()
        assert figures["quarantined_bad_checksum"] == 2 and figures["ignored"] == 30
        assert figures["ignored_types"] == "GSV"
    finally:
        src.close()
    assert src.fileno() is None and src.figures()["state"] == "closed"


def test_tcp_replay_streams_the_log_to_a_connected_source():
    lines = read_log(DEMO_LOG)
    want_readings, want_reasons = expected_from_log(lines)
    thread, stop, where = start_replay(lines, "tcp://127.0.0.1:0")
    host, port = where()
    src = NmeaSource(NmeaSourceSettings(source=f"tcp://{host}:{port}"), "gps0", "veh-1",
                     clock_ns=lambda: NOW)
    src.open()
    try:
        readings, quarantined = poll_until(
            src, lambda r, q: len(r) + len(q) >= len(want_readings) + len(want_reasons))
        assert [r.values for r in readings] == [r.values for r in want_readings]
        assert [q.reason for q in quarantined] == want_reasons
        thread.join(5)
        # the replay ended and closed the connection: the source backs off, nothing raised
        poll_until(src, lambda r, q: src.figures()["state"] == "backoff")
        assert src.figures()["disconnects"] == 1 and "retrying in 0.5 s" in src.problem
    finally:
        stop.set()
        src.close()


def test_replay_loop_repeats_until_stopped():
    src = NmeaSource(NmeaSourceSettings(source="udp://127.0.0.1:0"), "gps0", "veh-1")
    src.open()
    lines = [sentence("GPVTG,0.0,T,,M,0.0,N,0.0,K,A").encode()]
    thread, stop, _ = start_replay(lines, f"udp://127.0.0.1:{src.address[1]}", 200, loop=True)
    try:
        readings, _ = poll_until(src, lambda r, q: len(r) >= 5)
        assert {r.values["sentence"] for r in readings} == {"VTG"}
    finally:
        stop.set()
        thread.join(5)
        src.close()
    assert not thread.is_alive()


# ---- TCP connection trouble -------------------------------------------------------------------
@pytest.fixture
def server():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    yield listener
    listener.close()


def accept(listener: socket.socket, timeout: float = 5.0) -> socket.socket:
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    return conn


def test_tcp_disconnect_drops_the_half_line_and_reconnects_after_backoff(server):
    clock = FakeClock()
    port = server.getsockname()[1]
    settings_ = NmeaSourceSettings(source=f"tcp://127.0.0.1:{port}", reconnect_min_s=2.0,
                                   reconnect_max_s=7.0)
    src = NmeaSource(settings_, "gps0", "veh-1", clock_ns=lambda: NOW, clock=clock)
    src.open()
    conn = accept(server)
    poll_until(src, lambda r, q: src.figures()["state"] == "open")
    gga = sentence(GGA).encode()
    conn.sendall(gga + b"\r\n" + gga[:30])  # a whole sentence, then half of one
    conn.close()
    readings, quarantined = poll_until(src, lambda r, q: src.figures()["state"] == "backoff")
    assert len(readings) == 1
    [partial] = quarantined
    assert partial.raw == gga[:30] and "connection ended in the middle" in partial.reason
    figures = src.figures()
    assert figures["disconnects"] == 1 and figures["quarantined_partial"] == 1
    assert figures["retry_in_s"] == 2.0 and src.fileno() is None

    # no new attempt before the backoff is over
    clock.t += 1.9
    assert src.poll(10) == ([], [])
    server.settimeout(0)
    with pytest.raises(BlockingIOError):
        server.accept()
    clock.t += 0.2
    src.poll(10)
    conn = accept(server)
    # the next connection's data is not glued to the half line
    conn.sendall(gga + b"\r\n")
    readings, quarantined = poll_until(src, lambda r, q: len(r) == 1)
    assert readings[0].values["lat"] == 48.1173 and quarantined == []
    assert src.figures()["connects"] == 2
    conn.close()
    src.close()


def test_failed_connects_back_off_doubling_up_to_the_maximum(server):
    clock = FakeClock()
    port = server.getsockname()[1]
    server.close()  # nobody listens: connection refused
    settings_ = NmeaSourceSettings(source=f"tcp://127.0.0.1:{port}", reconnect_min_s=1.0,
                                   reconnect_max_s=5.0)
    src = NmeaSource(settings_, "gps0", "veh-1", clock=clock)
    src.open()
    delays = []
    for _ in range(5):
        poll_until(src, lambda r, q: src.figures()["state"] == "backoff")
        delays.append(src.figures()["retry_in_s"])
        clock.t += delays[-1]
        src.poll(10)
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert src.figures()["connect_failures"] >= 5
    assert "cannot connect: connection refused" in src.problem


def test_a_first_fragment_after_connecting_is_dropped_quietly(server):
    src = NmeaSource(NmeaSourceSettings(source=f"tcp://127.0.0.1:{server.getsockname()[1]}"),
                     "gps0", "veh-1")
    src.open()
    conn = accept(server)
    conn.sendall(b"0.9,545.4,M,46.9,M,,*47\r\n" + sentence(GGA).encode() + b"\r\n")
    readings, quarantined = poll_until(src, lambda r, q: len(r) == 1)
    assert quarantined == [] and src.figures()["fragments_dropped"] == 1
    conn.close()
    src.close()


def test_a_runaway_line_on_a_stream_is_cut_and_quarantined(server):
    src = NmeaSource(NmeaSourceSettings(source=f"tcp://127.0.0.1:{server.getsockname()[1]}"),
                     "gps0", "veh-1")
    src.open()
    conn = accept(server)
    conn.sendall(sentence(GGA).encode() + b"\r\n" + b"$" + b"A" * 5000 + b"\r\n"
                 + sentence(GGA).encode() + b"\r\n")
    readings, quarantined = poll_until(src, lambda r, q: len(r) == 2)
    [cut] = quarantined
    assert len(cut.raw) == 120 and "line too long: no line end within max_line_bytes=120" \
        in cut.reason
    conn.close()
    src.close()


def test_poll_returns_at_most_max_items_and_keeps_the_rest(server):
    src = NmeaSource(NmeaSourceSettings(source=f"tcp://127.0.0.1:{server.getsockname()[1]}"),
                     "gps0", "veh-1")
    src.open()
    conn = accept(server)
    conn.sendall((sentence(GGA).encode() + b"\r\n") * 50)
    first, _ = poll_until(src, lambda r, q: len(r) > 0, max_items=7)
    assert len(first) == 7
    rest, _ = poll_until(src, lambda r, q: len(r) == 43, max_items=7)
    conn.close()
    src.close()


def test_fileno_becomes_readable_when_data_waits(server):
    src = NmeaSource(NmeaSourceSettings(source=f"tcp://127.0.0.1:{server.getsockname()[1]}"),
                     "gps0", "veh-1")
    src.open()
    conn = accept(server)
    poll_until(src, lambda r, q: src.fileno() is not None)
    assert select.select([src.fileno()], [], [], 0)[0] == []
    conn.sendall(sentence(GGA).encode() + b"\r\n")
    assert select.select([src.fileno()], [], [], 5)[0] == [src.fileno()]
    conn.close()
    src.close()


def test_udp_port_in_use_backs_off_instead_of_raising():
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    try:
        clock = FakeClock()
        url = f"udp://127.0.0.1:{holder.getsockname()[1]}"
        src = NmeaSource(NmeaSourceSettings(source=url), "gps0", "veh-1", clock=clock)
        src.open()
        assert src.figures()["state"] == "backoff"
        assert "cannot open" in src.problem and "address already in use" in src.problem.lower()
        assert src.poll(10) == ([], []) and src.fileno() is None
    finally:
        holder.close()
    clock.t += 1.0
    src.poll(10)
    assert src.figures()["state"] == "open" and src.problem == ""
    src.close()


# ---- serial (a pseudo-terminal stands in for the receiver's USB port) --------------------------
def test_serial_port_reads_sentences_and_reopens_after_the_device_goes_away():
    master, slave = os.openpty()
    clock = FakeClock()
    src = NmeaSource(NmeaSourceSettings(source=f"serial://{os.ttyname(slave)}?baud=9600"),
                     "gps0", "veh-1", clock=clock)
    src.open()
    try:
        assert src.figures()["state"] == "open" and src.fileno() is not None
        os.write(master, b"E,1,08*11\r\n" + sentence(GGA).encode() + b"\r\n")
        readings, quarantined = poll_until(src, lambda r, q: len(r) == 1)
        assert quarantined == [] and src.figures()["fragments_dropped"] == 1
        os.close(master)  # unplugged
        poll_until(src, lambda r, q: src.figures()["state"] == "backoff")
        assert "connection lost" in src.problem
    finally:
        os.close(slave)
        src.close()


def test_missing_serial_device_backs_off_with_a_clear_problem(tmp_path):
    clock = FakeClock()
    src = NmeaSource(NmeaSourceSettings(source=f"serial://{tmp_path}/ttyACM9"), "gps0",
                     "veh-1", clock=clock)
    src.open()
    assert src.figures()["state"] == "backoff"
    assert "ttyACM9" in src.problem and "retrying in 0.5 s" in src.problem
    assert src.poll(10) == ([], [])


# ---- fuzz: nothing escapes, good data after garbage still comes through -----------------------
GOOD_LINES = [line for line, _ in REAL] + [sentence(GGA)]


@settings(max_examples=300, deadline=None)
@given(line=st.binary(max_size=150))
def test_random_lines_give_a_reading_a_quarantine_or_nothing(line):
    p = parser()
    result = p.parse(line, NOW, 1.0)
    assert result is None or isinstance(result, Reading | QuarantinedInput)
    assert isinstance(p.parse(sentence(GGA).encode(), NOW, 1.0), Reading)


@settings(max_examples=300, deadline=None)
@given(good=st.sampled_from(GOOD_LINES), data=st.data())
def test_mangled_real_sentences_never_raise(good, data):
    raw = bytearray(good.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[i:]
            if not raw:
                break
        else:
            raw.insert(i, data.draw(st.sampled_from(b",*.$-0123456789ANSEWV\r\n")))
    result = parser().parse(bytes(raw), NOW, 1.0)
    assert result is None or isinstance(result, Reading | QuarantinedInput)


@pytest.fixture(scope="module")
def tcp_pair():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    src = NmeaSource(NmeaSourceSettings(source=f"tcp://127.0.0.1:{listener.getsockname()[1]}"),
                     "gps0", "veh-1", clock_ns=lambda: NOW)
    src.open()
    conn = accept(listener)
    yield src, conn
    conn.close()
    src.close()
    listener.close()


@settings(max_examples=80, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=5))
def test_random_byte_streams_never_escape_poll_and_good_data_follows(tcp_pair, chunks):
    src, conn = tcp_pair
    marker = sentence(f"GPVTG,{len(chunks)}.5,T,,M,0.0,N,0.0,K,A").encode()
    for chunk in chunks:
        conn.sendall(chunk)
    conn.sendall(b"\r\n" + marker + b"\r\n")
    readings, _ = poll_until(src, lambda r, q: any(
        x.values.get("sentence") == "VTG" and x.values.get("course_deg") == len(chunks) + 0.5
        for x in r))
    assert src.figures()["state"] == "open"


@settings(max_examples=80, deadline=None)
@given(datagrams=st.lists(st.binary(max_size=300), max_size=5))
def test_random_datagrams_never_escape_poll_and_good_data_follows(datagrams):
    src = NmeaSource(NmeaSourceSettings(source="udp://127.0.0.1:0"), "gps0", "veh-1")
    src.open()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for datagram in [*datagrams, sentence(GGA).encode()]:
            sender.sendto(datagram, src.address)
        poll_until(src, lambda r, q: len(r) >= 1 and r[-1].values.get("lat") == 48.1173)
    finally:
        sender.close()
        src.close()
