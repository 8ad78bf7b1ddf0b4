"""The `fleetgw` command line: run, topology, journal, bench.

Where this sits: the operator's entry point. Each verb is a thin argparse layer over a function
in tools/ that returns an exit status (0 ok, 1 failed, 2 bad usage or input).
"""

from __future__ import annotations

import argparse
import sys


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds (got {text!r})") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number (got {text!r})") from None
    if not 1024 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1024..65535 (got {value})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetgw", description="Offline-first telemetry gateway for vehicle fleets."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway in the foreground")
    run.add_argument("--config", default=None,
                     help="gateway TOML config (default: the embedded config/demo.toml)")
    run.add_argument("--data-dir", default="data",
                     help="where journal.db and logs live (default: ./data)")
    run.add_argument("--admin-port", type=_port, default=None,
                     help="Thespian admin port on loopback (default: from the config)")
    run.add_argument("--duration", type=_positive_float, default=None,
                     help="stop after this many seconds, as SIGTERM would")

    topo = sub.add_parser("topology", help="show the live supervision tree of a running gateway")
    topo.add_argument("--admin-port", type=_port, default=None,
                      help="admin port of the gateway (default: 19001, the config default)")
    fmt = topo.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the tree as JSON")
    fmt.add_argument("--dot", action="store_true", help="print the tree as Graphviz dot")
    topo.add_argument("--watch", action="store_true", help="refresh every second, mark changes")
    topo.add_argument("--interval", type=_positive_float, default=1.0, help=argparse.SUPPRESS)
    topo.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)

    journal = sub.add_parser("journal", help="inspect a journal database")
    jsub = journal.add_subparsers(dest="journal_command", required=True, metavar="ACTION")
    stats = jsub.add_parser("stats", help="records per device, seq ranges, cursors, size")
    stats.add_argument("--db", required=True, help="path to journal.db")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    verify = jsub.add_parser("verify", help="integrity check and seq continuity (I2)")
    verify.add_argument("--db", required=True, help="path to journal.db")

    policy = sub.add_parser("policy", help="check a routing policy file")
    psub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    pcheck = psub.add_parser("check", help="validate a policy; --explain shows how a record "
                                           "is routed")
    pcheck.add_argument("file", help="policy TOML (see config/policy.example.toml)")
    pcheck.add_argument("--explain", metavar="RECORD_JSON", default=None,
                        help='a reading as JSON: {"device_id", "sensor_id", "ts", "kind", '
                             '"values"}')

    bench = sub.add_parser("bench", help="benchmarks that print figures beside references")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    bj = bsub.add_parser("journal", help="durable journaling through the actors vs raw apsw")
    bj.add_argument("--seconds", type=_positive_float, default=20.0)
    bj.add_argument("--sensors", type=int, default=4, help="simulated sensors (default 4)")
    bj.add_argument("--rate", type=float, default=None,
                    help="offered readings/s per sensor (default: saturating)")
    bj.add_argument("--admin-port", type=_port, default=19081)
    bj.add_argument("--json", action="store_true", help="print one JSON object")
    br = bsub.add_parser("router", help="router throughput beside ingest, and bytes saved")
    br.add_argument("--seconds", type=_positive_float, default=20.0)
    br.add_argument("--vehicles", type=int, default=4,
                    help="simulated vehicles, each with imu, gps and engine at 10x demo rates")
    br.add_argument("--admin-port", type=_port, default=19091)
    br.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from config.loader import default_config_path
        from tools.run import run_command

        return run_command(args.config or str(default_config_path()), args.data_dir,
                           args.admin_port, args.duration)
    if args.command == "topology":
        from config.schema import DEFAULT_ADMIN_PORT
        from tools.topology import topology_command

        return topology_command(args.admin_port or DEFAULT_ADMIN_PORT, args.json, args.dot,
                                args.watch, args.interval, args.count)
    if args.command == "journal":
        from tools.journal_cmd import stats_command, verify_command

        if args.journal_command == "stats":
            return stats_command(args.db, args.json)
        return verify_command(args.db)
    if args.command == "policy":
        from tools.policy_cmd import check_command

        return check_command(args.file, args.explain)
    if args.command == "bench" and args.bench_command == "router":
        from tools.bench_router import bench_router_command

        return bench_router_command(args.seconds, args.vehicles, args.admin_port, args.json)
    if args.command == "bench":
        from tools.bench import bench_journal_command

        return bench_journal_command(args.seconds, args.sensors, args.rate, args.admin_port,
                                     args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
