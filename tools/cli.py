"""The `fleetgw` command line: run, topology, journal, drill, bench.

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
    verify = jsub.add_parser("verify", help="integrity check and seq continuity (I2); with "
                             "--key-file, every sealed payload opened and authenticated")
    verify.add_argument("--db", required=True, help="path to journal.db")
    verify.add_argument("--key-file", default=None, help="the journal's key file ([journal] "
                        "key_file)")
    jdown = jsub.add_parser("downgrade", help="take the journal back to an earlier release's "
                            "schema, losslessly, for a rollback (gateway stopped; run with "
                            "this, the newer, release)")
    jdown.add_argument("--db", required=True, help="path to journal.db")
    jdown.add_argument("--to", type=int, required=True, metavar="N",
                       help="the schema version of the release rolled back to (`fleetgw "
                            "journal stats --json` of that release: schema_version)")
    jdown.add_argument("--key-file", default=None,
                       help="the journal's key file (sealed payloads are written back in "
                            "clear: schemas before v6 have no encryption)")
    jkey = jsub.add_parser("key", help="encryption at rest: make, rotate or show a journal "
                           "key file (ids and fingerprints only, never key material)")
    jkey.add_argument("key_action", choices=("new", "rotate", "show"),
                      help="new: a key file with key id 1 (mode 0600); rotate: add the next "
                           "id, which seals from the next start; show: ids, fingerprints")
    jkey.add_argument("--key-file", required=True, help="the key file ([journal] key_file)")
    jkey.add_argument("--db", default=None, help="show: also count what each key seals in "
                      "this journal and check that the file fits it")
    quar = jsub.add_parser("quarantine", help="inputs sources could not decode (oldest first) "
                           "and each sensor's totals")
    quar.add_argument("--db", required=True, help="path to journal.db")
    quar.add_argument("--sensor", default=None, help="only this sensor's inputs and totals")
    quar.add_argument("--limit", type=int, default=50, metavar="N",
                      help="list at most N inputs (default 50)")
    quar.add_argument("--after", type=int, default=0, metavar="ID",
                      help="list those with an id above ID (page on from the last one shown)")
    quar.add_argument("--json", action="store_true",
                      help="print one JSON object (raw bytes in full, as hex)")
    quar.add_argument("--key-file", default=None, help="the journal's key file (sealed "
                      "inputs need it)")

    policy = sub.add_parser("policy", help="check a routing policy file")
    psub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    pcheck = psub.add_parser("check", help="validate a policy; --explain shows how a record "
                                           "is routed")
    pcheck.add_argument("file", help="policy TOML (see config/policy.example.toml)")
    pcheck.add_argument("--explain", metavar="RECORD_JSON", default=None,
                        help='a reading as JSON: {"device_id", "sensor_id", "ts", "kind", '
                             '"values"}')

    model = sub.add_parser("model", help="the signed model registry: list, verify, install, "
                                         "activate, rollback; keygen and train")
    registry = argparse.ArgumentParser(add_help=False)
    registry.add_argument("--data-dir", default="data",
                          help="the registry is DATA_DIR/models (default: ./data)")
    registry.add_argument("--registry", default=None, help="registry directory (overrides "
                                                            "--data-dir)")
    registry.add_argument("--trusted-keys", default=None, metavar="DIR",
                          help="trusted *.pub keys (default: the repository's "
                               "models/trusted_keys)")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    mlist = msub.add_parser("list", parents=[registry], help="installed versions, the active "
                                                            "one marked")
    mlist.add_argument("--json", action="store_true", help="print a JSON list")
    mverify = msub.add_parser("verify", parents=[registry],
                              help="signature, hashes and self-test of installed versions")
    mverify.add_argument("version", nargs="?", default=None,
                         help="one installed version (default: all)")
    mverify.add_argument("--path", default=None, metavar="DIR",
                         help="check a model directory instead (not installed)")
    minstall = msub.add_parser("install", parents=[registry],
                               help="verify, self-test and install a model directory")
    minstall.add_argument("path", help="model directory (model.xml, model.bin, manifest.json, "
                                       "manifest.sig)")
    mactivate = msub.add_parser("activate", parents=[registry],
                                help="serve an installed version (re-verified, self-tested)")
    mactivate.add_argument("version")
    msub.add_parser("rollback", parents=[registry],
                    help="serve the version active before the current one")
    mkeygen = msub.add_parser("keygen", help="make an Ed25519 signing key and its .pub")
    mkeygen.add_argument("path", help="where to write the private key (PATH.pub: public key)")
    mtrain = msub.add_parser("train", help="train, self-test and sign a model directory")
    mtrain.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    mtrain.add_argument("--signing-key", required=True, metavar="KEY",
                        help="private key from `fleetgw model keygen`")
    mtrain.add_argument("--version", default=None,
                        help="model version (default: the out directory's name)")
    mtrain.add_argument("--seed", type=int, default=20261127,
                        help="data and training seed (default 20261127, the shipped model's)")
    mtrain.add_argument("--quick", action="store_true", help="a small data set (for tests)")

    central = sub.add_parser("central", help="the central ingest receiver and its ClickHouse")
    csub = central.add_subparsers(dest="central_command", required=True, metavar="ACTION")
    cserve = csub.add_parser("serve", help="receive signed batches over HTTP(S) and store them")
    cserve.add_argument("--config", required=True,
                        help="central TOML config (see central/example.toml)")
    cquery = csub.add_parser("query", help="run SQL against the configured backend and print "
                                           "the result (chdb: not while `serve` holds the path)")
    cquery.add_argument("sql", help="one SQL statement")
    cquery.add_argument("--config", required=True, help="central TOML config")
    cquery.add_argument("--format", default=None,
                        help="ClickHouse output format (default PrettyCompactMonoBlock)")

    provision = sub.add_parser("provision", help="the fleet CA, the receiver's TLS certificate "
                                                 "and device keys (mTLS, batch signing)")
    prsub = provision.add_subparsers(dest="provision_command", required=True, metavar="ACTION")
    prca = prsub.add_parser("ca", help="create the fleet CA (ca.key, ca.crt)")
    prca.add_argument("--dir", required=True, help="directory for ca.key and ca.crt")
    prca.add_argument("--force", action="store_true",
                      help="replace an existing CA (everything it issued must be reissued)")
    prserver = prsub.add_parser("server", help="the receiver's TLS key and certificate")
    prserver.add_argument("--ca", required=True, metavar="DIR", help="the CA directory")
    prserver.add_argument("--out", required=True, metavar="DIR",
                          help="directory for receiver.key, receiver.crt and ca.crt")
    prserver.add_argument("--host", action="extend", nargs="+", default=None, metavar="H",
                          help="IP address or DNS name gateways reach it at (repeatable; "
                               "default: 127.0.0.1 localhost)")
    prserver.add_argument("--force", action="store_true",
                          help="replace an existing receiver key and certificate")
    prdevice = prsub.add_parser("device", help="a device's Ed25519 key (batch signing and "
                                               "TLS client key) and client certificate")
    prdevice.add_argument("--id", required=True, help="the device id (its certificate's CN)")
    prdevice.add_argument("--ca", required=True, metavar="DIR", help="the CA directory")
    prdevice.add_argument("--out", required=True, metavar="DIR",
                          help="directory for ID.key, ID.crt and ca.crt (the gateway's keys)")
    prdevice.add_argument("--devices-dir", default=None, metavar="DIR",
                          help="register the public key in the receiver's devices directory")
    prdevice.add_argument("--replace", action="store_true",
                          help="re-key a device that has a key or is registered")

    demo = sub.add_parser("demo", help="the whole mission on this machine: gateway, HTTPS "
                          "receiver on chdb, a link cut, and the reconciliation (make demo)")
    demo.add_argument("--data-dir", default="data", help="its files go to DATA_DIR/demo, made "
                      "afresh (default ./data)")
    demo.add_argument("--up-s", type=_positive_float, default=20.0,
                      help="seconds with the link up first (default 20)")
    demo.add_argument("--cut-s", type=_positive_float, default=20.0,
                      help="seconds the link is cut (default 20)")
    demo.add_argument("--after-s", type=_positive_float, default=20.0,
                      help="seconds with the link back before the gateway stops (default 20)")
    recon = sub.add_parser("reconcile", help="per device: what the journal synced beside what "
                           "central holds (FINAL, raw, duplicates); exit 1 if I5 fails")
    recon.add_argument("--data-dir", default="data", help="the gateway's data dir (journal.db)")
    recon.add_argument("--central-config", required=True, metavar="FILE",
                       help="the receiver's TOML config (its backend is read; stop a chdb "
                            "receiver first: one process owns its path)")
    recon.add_argument("--json", action="store_true", help="print JSON rows")

    drill = sub.add_parser("drill", help="field chaos drills: a timeline of real faults "
                           "against a gateway, then the invariants checked (drills/)")
    dsub = drill.add_subparsers(dest="drill_command", required=True, metavar="ACTION")
    drun = dsub.add_parser("run", help="run a drill; exit 1 on any violated invariant, 2 on a "
                                       "bad drill file")
    drun.add_argument("file", help="drill TOML (see drills/)")
    drun.add_argument("--json", action="store_true", help="print one JSON object")
    drun.add_argument("--short", action="store_true",
                      help="the short version (the drill's short_duration_s; CI runs these)")
    drun.add_argument("--keep", default=None, metavar="DIR",
                      help="work in DIR and keep it (logs, journal, configs); default: a "
                           "temporary dir removed at the end")

    bench = sub.add_parser("bench", help="benchmarks that print figures beside references")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    bj = bsub.add_parser("journal", help="durable journaling through the actors vs raw apsw")
    bj.add_argument("--seconds", type=_positive_float, default=20.0)
    bj.add_argument("--sensors", type=int, default=4, help="simulated sensors (default 4)")
    bj.add_argument("--rate", type=float, default=None,
                    help="offered readings/s per sensor (default: saturating)")
    bj.add_argument("--admin-port", type=_port, default=19081)
    bj.add_argument("--sealed", action="store_true",
                    help="with encryption at rest ([journal] key_file) on")
    bj.add_argument("--json", action="store_true", help="print one JSON object")
    bseal = bsub.add_parser("seal", help="journal appends/s with payloads sealed beside in "
                            "clear and raw apsw, and disk bytes per record")
    bseal.add_argument("--records", type=int, default=240_000,
                       help="records appended per side, over 6 alternating rounds "
                            "(default 240000)")
    bseal.add_argument("--json", action="store_true", help="print one JSON object")
    br = bsub.add_parser("router", help="router throughput beside ingest, and bytes saved")
    br.add_argument("--seconds", type=_positive_float, default=20.0)
    br.add_argument("--vehicles", type=int, default=4,
                    help="simulated vehicles, each with imu, gps and engine at 10x demo rates")
    br.add_argument("--admin-port", type=_port, default=19091)
    br.add_argument("--json", action="store_true", help="print one JSON object")
    bm = bsub.add_parser("model", help="inference latency, runner throughput and memory, and "
                         "precision/recall per anomaly type beside the rules alone")
    bm.add_argument("--model", default=None,
                    help="model directory (default: the shipped one, models/DEFAULT)")
    bm.add_argument("--seed", type=int, default=7,
                    help="seed of the held-out test set (default 7; training used another)")
    bm.add_argument("--vehicles", type=int, default=8, help="simulated vehicles for the "
                    "runner throughput (default 8)")
    bm.add_argument("--seconds", type=_positive_float, default=60.0,
                    help="seconds of their driving (default 60)")
    bm.add_argument("--admin-port", type=_port, default=19101)
    bm.add_argument("--json", action="store_true", help="print one JSON object")
    bw = bsub.add_parser("wire", help="bytes a reading on the uplink's wire (fleetgw.cols/1 + "
                         "zstd) beside gzip JSONEachRow, and encode/decode rates")
    bw.add_argument("--seconds", type=_positive_float, default=600.0,
                    help="seconds of the demo vehicle's driving (default 600)")
    bw.add_argument("--json", action="store_true", help="print one JSON object")
    bq = bsub.add_parser("mqtt", help="MQTT messages/s from the broker into the journal (QoS "
                         "1, acked after commit) beside mosquitto_sub on the same broker")
    bq.add_argument("--messages", type=int, default=100_000,
                    help="messages to publish (default 100000)")
    bq.add_argument("--publishers", type=int, default=4,
                    help="mosquitto_pub processes, one vehicle topic each (default 4)")
    bq.add_argument("--admin-port", type=_port, default=19131)
    bq.add_argument("--json", action="store_true", help="print one JSON object")
    bs = bsub.add_parser("sync", help="P1 latency to ClickHouse while a P3 backlog drains, "
                         "drain goodput beside the token bucket, receiver rows/s beside raw "
                         "chdb inserts")
    bs.add_argument("--backlog-s", type=_positive_float, default=60.0,
                    help="seconds the link is cut while P3 piles up (default 60)")
    bs.add_argument("--drain-s", type=_positive_float, default=120.0,
                    help="at most this many seconds of draining (default 120)")
    bs.add_argument("--rate", type=_positive_float, default=1000.0,
                    help="readings/s of the bulk P3 sensor (default 1000)")
    bs.add_argument("--rate-bytes", type=_positive_float, default=8000.0,
                    help="the link's P2/P3 token bucket, bytes/s (default 8000)")
    bs.add_argument("--admin-port", type=_port, default=19111)
    bs.add_argument("--central-port", type=_port, default=19121)
    bs.add_argument("--json", action="store_true", help="print one JSON object")

    deploy = sub.add_parser("deploy", help="deployment files derived from a gateway config")
    desub = deploy.add_subparsers(dest="deploy_command", required=True, metavar="WHAT")
    from tools.nftables import add_arguments as nftables_arguments

    nftables_arguments(desub.add_parser(
        "nftables", help="print an nftables rule set (table inet fleetgw) opening only what "
                         "the config listens on beyond loopback"))

    health = sub.add_parser("health", help="is the running gateway fit to serve? actors, "
                            "journal, backlog, sync, model self-test (the rollout gate); exit 0 "
                            "healthy, 1 unhealthy, 2 unreachable")
    health.add_argument("--admin-port", type=_port, default=None,
                        help="admin port of the gateway (default: 19001, the config default)")
    health.add_argument("--data-dir", default=None,
                        help="the gateway's data dir as seen here (default: what the gateway "
                             "reports)")
    health.add_argument("--json", action="store_true", help="print one JSON object")
    health.add_argument("--wait", type=_positive_float, default=None, metavar="SECONDS",
                        help="retry until healthy or SECONDS have passed (after an upgrade)")
    health.add_argument("--max-backlog-age-s", type=_positive_float, default=None,
                        metavar="SECONDS", help="fail when a lane's oldest waiting record is "
                        "older (default: no limit; a link may be down for days)")
    health.add_argument("--require-sync", action="store_true",
                        help="fail until one batch was acknowledged by central since the "
                             "uplink started (the canary's proof that this release syncs)")
    health.add_argument("--min-free-mb", type=_positive_float, default=16.0,
                        help="free MiB the data dir's filesystem must keep (default 16)")
    health.add_argument("--expect-version", default=None, metavar="VERSION",
                        help="fail unless the running gateway is this fleetgw release")
    return parser


#: Characters of the raw bytes `fleetgw journal quarantine` shows in its table (--json: all).
QUARANTINE_RAW_SHOWN = 60


def journal_quarantine_command(db: str, sensor: str | None, limit: int, after: int,
                               as_json: bool, key_file: str | None = None) -> int:
    """`fleetgw journal quarantine`: up to ``limit`` quarantined inputs with an id above
    ``after`` (oldest first; of ``sensor`` or all) and each sensor's totals (quarantined,
    trimmed to keep the quarantine bounded, kept). Read-only, like `journal stats`.
    Exit status: 0 listed, 1 the file cannot be read, 2 bad usage or no journal at ``db``."""
    import json

    import apsw

    from actors.journal import JournalError, open_readonly
    from tools.journal_cmd import _table, _when

    if limit <= 0:
        print(f"fleetgw journal quarantine: --limit must be > 0 (got {limit})", file=sys.stderr)
        return 2
    try:
        with open_readonly(db, key_file) as reader:
            rows = reader.quarantined(limit + 1, sensor, after)  # one more: are there more?
            totals = [q for q in reader.stats().quarantine if sensor in (None, q.sensor_id)]
    except JournalError as exc:
        print(f"fleetgw journal quarantine: {exc}", file=sys.stderr)
        return 2
    except apsw.Error as exc:  # a damaged file: say so instead of a traceback
        print(f"fleetgw journal quarantine: {db} cannot be read: {exc}; run "
              f"`fleetgw journal verify --db {db}`", file=sys.stderr)
        return 1
    more, rows = len(rows) > limit, rows[:limit]
    if as_json:
        print(json.dumps({
            "db": db,
            "inputs": [row.to_json() for row in rows],
            "more": more,
            "totals": {q.sensor_id: {"quarantined": q.quarantined, "trimmed": q.trimmed,
                                     "kept": q.quarantined - q.trimmed,
                                     "last_reason": q.last_reason, "last_ns": q.last_ns}
                       for q in totals},
        }, separators=(",", ":")))
        return 0

    def safe(text: str) -> str:  # names and reasons come from outside: no terminal controls
        return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")

    def shown(raw: bytes) -> str:  # printable ASCII (\t \r \n escaped) as text, else hex
        if not raw:
            return "-"
        if all(0x20 <= b < 0x7F or b in (9, 10, 13) for b in raw):
            text = raw.decode("ascii").encode("unicode_escape").decode("ascii")
        else:
            text = "hex:" + raw.hex()
        cut = QUARANTINE_RAW_SHOWN
        return text if len(text) <= cut else text[: cut - 3] + "..."

    def when(ns: int) -> str:
        try:
            return _when(ns)
        except (OverflowError, OSError, ValueError):
            return str(ns)

    of = "" if sensor is None else f" of sensor {safe(sensor)}"
    if rows:
        lines = [f"quarantined inputs{of} ({len(rows)} shown, oldest first)"]
        lines += _table(
            ("ID", "RECEIVED (UTC)", "SENSOR", "SOURCE", "RAW_LEN", "RAW", "REASON"),
            [(r.id, when(r.received_ns), safe(r.sensor_id), safe(r.source), r.raw_len,
              shown(r.raw), safe(r.reason)) for r in rows],
        )
        if more:
            lines.append(f"  ... more: --after {rows[-1].id}")
    else:
        lines = [f"no quarantined inputs{of} kept" + (f" after id {after}" if after else "")]
    lines += ["", f"totals{of}"]
    lines += _table(
        ("SENSOR", "QUARANTINED", "TRIMMED", "KEPT", "LAST", "LAST_REASON"),
        [(safe(q.sensor_id), q.quarantined, q.trimmed, q.quarantined - q.trimmed,
          when(q.last_ns), safe(q.last_reason)) for q in totals],
    )
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "deploy":
        from tools.nftables import nftables_command

        return nftables_command(args.config, args.ssh_from, args.ssh_port)
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
    if args.command == "health":
        from config.schema import DEFAULT_ADMIN_PORT
        from tools.health import health_command
        from tools.health_checks import Limits

        limits = Limits(max_backlog_age_s=args.max_backlog_age_s,
                        require_sync=args.require_sync,
                        min_free_bytes=int(args.min_free_mb * (1 << 20)),
                        expect_version=args.expect_version)
        return health_command(args.admin_port or DEFAULT_ADMIN_PORT, args.data_dir, args.json,
                              args.wait, limits)
    if args.command == "journal":
        from tools.journal_cmd import key_command, stats_command, verify_command

        if args.journal_command == "stats":
            return stats_command(args.db, args.json)
        if args.journal_command == "quarantine":
            return journal_quarantine_command(args.db, args.sensor, args.limit, args.after,
                                              args.json, args.key_file)
        if args.journal_command == "downgrade":
            from tools.journal_cmd import downgrade_command

            return downgrade_command(args.db, args.to, args.key_file)
        if args.journal_command == "key":
            return key_command(args.key_action, args.key_file, args.db)
        return verify_command(args.db, args.key_file)
    if args.command == "policy":
        from tools.policy_cmd import check_command

        return check_command(args.file, args.explain)
    if args.command == "model":
        from tools.model_cmd import model_command

        return model_command(args)
    if args.command == "demo":
        from tools.demo import demo_command

        return demo_command(args.data_dir, args.up_s, args.cut_s, args.after_s)
    if args.command == "reconcile":
        from tools.reconcile import reconcile_command

        return reconcile_command(args.data_dir, args.central_config, args.json)
    if args.command == "central":
        from tools.central_cmd import query_command, serve_command

        if args.central_command == "serve":
            return serve_command(args.config)
        return query_command(args.config, args.sql, args.format)
    if args.command == "provision":
        from tools.provision_cmd import provision_command

        return provision_command(args)
    if args.command == "drill":
        from tools.drill.runner import run_drill

        return run_drill(args.file, args.json, args.short, args.keep)
    if args.command == "bench" and args.bench_command == "seal":
        from tools.bench_seal import bench_seal_command

        return bench_seal_command(args.records, args.json)
    if args.command == "bench" and args.bench_command == "model":
        from tools.bench_model import bench_model_command

        return bench_model_command(args.model, args.seed, args.vehicles, args.seconds,
                                   args.admin_port, args.json)
    if args.command == "bench" and args.bench_command == "sync":
        from tools.bench_sync import bench_sync_command

        return bench_sync_command(args.backlog_s, args.drain_s, args.rate, args.rate_bytes,
                                  args.admin_port, args.central_port, args.json)
    if args.command == "bench" and args.bench_command == "mqtt":
        from tools.bench_mqtt import bench_mqtt_command

        return bench_mqtt_command(args.messages, args.publishers, args.admin_port, args.json)
    if args.command == "bench" and args.bench_command == "wire":
        from tools.bench_wire import bench_wire_command

        return bench_wire_command(args.seconds, args.json)
    if args.command == "bench" and args.bench_command == "router":
        from tools.bench_router import bench_router_command

        return bench_router_command(args.seconds, args.vehicles, args.admin_port, args.json)
    if args.command == "bench":
        from tools.bench import bench_journal_command

        return bench_journal_command(args.seconds, args.sensors, args.rate, args.admin_port,
                                     args.sealed, args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
