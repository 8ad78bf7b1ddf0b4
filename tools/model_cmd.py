"""`fleetgw model list|verify|install|activate|rollback|keygen|train`: the model registry from
the shell.

Where this sits: beside the data path, for operators and whoever trains models. It works on
the registry the model runner serves from (`actors.model_runner.registry`, DATA_DIR/models by
default, or ``--registry DIR``), trusting the public keys in ``--trusted-keys`` (by default the
repository's models/trusted_keys). A gateway that is running notices an activation or a
rollback by itself (the runner polls the registry's pointer). `train` hands over to the
trainer (tools.training), which writes a signed model directory to install.
Exit status: 0 done, 1 refused or a failed check, 2 bad usage or input; a failure always
ends with one line on stderr saying what and why.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from actors.model_runner.manifest import DEFAULT_TRUSTED_KEYS, generate_key
from actors.model_runner.registry import CheckReport, ModelInfo, ModelRegistry, RegistryError

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
#: The registry's place in the data directory.
REGISTRY_SUBDIR = "models"
#: How many hex digits of a model's sha256 the table shows.
SHORT_SHA = 16


def _error(action: str, message: object, status: int) -> int:
    print(f"fleetgw model {action}: {message}", file=sys.stderr)
    return status


def metrics_summary(metrics: Mapping[str, Any] | None) -> str:
    """The manifest's metrics in a few words: the system's (rules + model) recall per anomaly
    type and its false-positive rate; for another layout, its top-level numbers."""
    metrics = metrics or {}
    per_type = metrics.get("per_type")
    if isinstance(per_type, Mapping):
        parts = [f"{name} {v['recall']:.2f}" for name, v in per_type.items()
                 if isinstance(v, Mapping) and isinstance(v.get("recall"), int | float)]
        fpr = metrics.get("false_positive_rate")
        if isinstance(fpr, Mapping):
            fpr = fpr.get("per_type")
        tail = f"; false positives {fpr:.4f}" if isinstance(fpr, int | float) else ""
        return "recall " + ", ".join(parts) + tail
    parts = [f"{k} {v:.3g}" for k, v in metrics.items()
             if isinstance(v, int | float) and not isinstance(v, bool)]
    return ", ".join(parts) or "-"


def format_list(infos: list[ModelInfo]) -> str:
    """The table of `fleetgw model list` (``*`` marks the active version)."""
    rows = [("", "VERSION", "CHECK", "THRESHOLD", "SHA256", "METRICS")]
    for info in infos:
        rows.append(("*" if info.active else "", info.version,
                     "ok" if info.ok else f"FAILED: {info.problem}",
                     "-" if info.threshold is None else f"{info.threshold:.4g}",
                     (info.sha256 or "-")[:SHORT_SHA], metrics_summary(info.metrics)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)),
                                row[-1]]).rstrip() for row in rows)


def _format_check(report: CheckReport) -> str:
    name = report.version or str(report.path)
    if not report.ok:
        return f"FAILED {name}: {'; '.join(report.problems)}"
    d = report.details
    return (f"ok {name}: signature, hashes and {d['vectors']} self-test vectors (compile "
            f"{d['compile_ms']} ms, max |diff| {d['max_abs_diff']:.2g})")


def list_command(registry: ModelRegistry, as_json: bool) -> int:
    infos = registry.list()
    if as_json:
        print(json.dumps([attrs.asdict(info) for info in infos], indent=2))
    elif infos:
        print(format_list(infos))
    else:
        print(f"no models installed in {registry.root} (`fleetgw model install PATH`)")
    return EXIT_OK


def verify_command(registry: ModelRegistry, version: str | None, path: str | None) -> int:
    if version is not None and path is not None:
        return _error("verify", "give a VERSION or --path DIR, not both", EXIT_BAD_INPUT)
    if path is not None and not Path(path).is_dir():
        return _error("verify", f"--path {path}: not a directory", EXIT_BAD_INPUT)
    reports = [registry.check_dir(path)] if path is not None else registry.verify(version)
    if not reports:
        return _error("verify", f"no models installed in {registry.root} (`fleetgw model "
                                "install PATH`)", EXIT_REFUSED)
    for report in reports:
        print(_format_check(report), file=sys.stdout if report.ok else sys.stderr)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_REFUSED


def install_command(registry: ModelRegistry, path: str) -> int:
    if not Path(path).is_dir():
        return _error("install", f"{path}: not a directory (a model directory holds "
                                 "model.xml, model.bin, manifest.json, manifest.sig)",
                      EXIT_BAD_INPUT)
    report = registry.install(path)
    if report.already_installed:
        print(f"{report.version} is already installed (identical manifest sha256 "
              f"{report.sha256[:SHORT_SHA]}…): nothing to do")
    else:
        print(f"installed {report.version} (manifest sha256 {report.sha256[:SHORT_SHA]}…, "
              f"{report.selftest.details['vectors']} self-test vectors passed) into "
              f"{report.path}; serve it with `fleetgw model activate {report.version}`")
    return EXIT_OK


def activate_command(registry: ModelRegistry, version: str) -> int:
    previous = registry.active_version()
    model = registry.activate(version)
    print(f"active: {model.version} (was {previous or 'none'}; manifest sha256 "
          f"{model.sha256[:SHORT_SHA]}…)")
    return EXIT_OK


def rollback_command(registry: ModelRegistry) -> int:
    previous = registry.active_version()
    version = registry.rollback()
    print(f"rolled back: {version} is active (was {previous})")
    return EXIT_OK


def keygen_command(path: str) -> int:
    target = Path(path)
    if target.exists() or Path(f"{path}.pub").exists():
        return _error("keygen", f"{path} or {path}.pub exists; refusing to overwrite a key",
                      EXIT_BAD_INPUT)
    if not target.parent.is_dir():
        return _error("keygen", f"{target.parent}: no such directory", EXIT_BAD_INPUT)
    public = generate_key(target)
    print(f"wrote signing key {path} (mode 0600: keep it off the gateways) and public key "
          f"{path}.pub ({public[:SHORT_SHA]}…); to trust models it signs, copy {path}.pub "
          f"into {DEFAULT_TRUSTED_KEYS}/ (or the gateway's --trusted-keys)")
    return EXIT_OK


def train_command(out_dir: str, signing_key: str, version: str | None, seed: int,
                  quick: bool) -> int:
    try:
        from tools.training.train import run_training_subprocess
    except ImportError as exc:
        return _error("train", f"the trainer (tools.training.train) is not available: {exc}",
                      EXIT_REFUSED)
    return run_training_subprocess(out_dir, signing_key, version, seed, quick)


def model_command(args: argparse.Namespace) -> int:
    """Run ``fleetgw model ACTION`` as parsed by tools/cli.py."""
    action = args.model_command
    try:
        if action == "keygen":
            return keygen_command(args.path)
        if action == "train":
            return train_command(args.out, args.signing_key, args.version, args.seed,
                                 args.quick)
        root = args.registry or Path(args.data_dir) / REGISTRY_SUBDIR
        registry = ModelRegistry(root, args.trusted_keys)
        if action == "list":
            return list_command(registry, args.json)
        if action == "verify":
            return verify_command(registry, args.version, args.path)
        if action == "install":
            return install_command(registry, args.path)
        if action == "activate":
            return activate_command(registry, args.version)
        return rollback_command(registry)
    except RegistryError as exc:
        return _error(action, exc, EXIT_BAD_INPUT if exc.bad_input else EXIT_REFUSED)
    except OSError as exc:
        return _error(action, exc, EXIT_REFUSED)
