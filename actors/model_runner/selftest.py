"""The self-test: does a signed model load, compile as promised and give its own answers?

Where this sits: between the registry and OpenVINO. Before the registry installs or activates
a model it runs ``python -m actors.model_runner.selftest MODEL_DIR`` in a child process
(`run_selftest_child`), because upstream OpenVINO has segfaulted on malformed IR: a crash
there fails the self-test, never the gateway. The child verifies the manifest (signature and
sha256 of every file), checks the input contract (feature set, shape, dtype), reads and
compiles the IR with the manifest's ``compile`` config, and then runs `selftest_in_process`:
the compiled precision is f32, NaN input is refused, and every ``self_test`` vector gives its
expected outputs within its rtol/atol. The model runner calls `selftest_in_process` again on
the session it serves, once the child has passed.

The child prints one JSON line ``{"ok", "version", "problems", "vectors", "compile_ms",
"max_abs_diff"}`` and exits 0 when ok, 1 otherwise. ``FLEETGW_SELFTEST_CRASH`` (tests only)
makes it crash (``segv``) or hang (``hang``) before loading anything.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from actors.model_runner.features import FEATURE_SET, N_FEATURES
from actors.model_runner.inference import (
    OUTPUT_NAMES,
    InferenceSession,
    InvalidInput,
    ModelLoadError,
    as_input,
)
from actors.model_runner.manifest import (
    MODEL_XML,
    REPO_ROOT,
    ManifestError,
    trusted_keys,
    verify_model_dir,
)

SELFTEST_MODULE = "actors.model_runner.selftest"
DEFAULT_TIMEOUT_S = 60.0
#: The manifest's input contract every fleetgw model must have.
INPUT_SHAPE = [-1, N_FEATURES]
INPUT_DTYPE = "float32"
#: What the compiled model must report as INFERENCE_PRECISION_HINT (as "f32" or its Type).
F32_NAMES = ("f32", "float32")
#: Tests only: "segv" kills the child with SIGSEGV, "hang" makes it wait forever.
CRASH_HOOK_ENV = "FLEETGW_SELFTEST_CRASH"
#: How much of a failed child's stderr is kept in the result's details.
STDERR_TAIL_CHARS = 2000


@attrs.frozen
class SelfTestResult:
    """The outcome of a self-test child: ``problems`` is empty exactly when ``ok``;
    ``details`` is the child's JSON report (plus ``returncode``/``stderr`` when it failed)."""

    ok: bool
    problems: tuple[str, ...]
    details: Mapping[str, Any] = attrs.field(factory=dict)


# ---- checks (shared by the child and the model runner) ------------------------------------
def check_contract(manifest: Mapping[str, Any]) -> list[str]:
    """Problems with the manifest's input contract: this runner computes only FEATURE_SET,
    as float32 rows of N_FEATURES."""
    spec = manifest.get("input")
    if not isinstance(spec, Mapping):
        return [f"manifest input is {spec!r}, not an object"]
    problems = []
    if spec.get("feature_set") != FEATURE_SET:
        problems.append(f"manifest input feature_set is {spec.get('feature_set')!r}; this "
                        f"gateway computes {FEATURE_SET!r}")
    if spec.get("shape") != INPUT_SHAPE:
        problems.append(f"manifest input shape is {spec.get('shape')!r}, expected {INPUT_SHAPE}")
    if spec.get("dtype") != INPUT_DTYPE:
        problems.append(f"manifest input dtype is {spec.get('dtype')!r}, expected {INPUT_DTYPE}")
    if not isinstance(manifest.get("compile"), Mapping):
        problems.append(f"manifest compile is {manifest.get('compile')!r}, not an object")
    return problems


def _precision_name(text: str) -> str:
    """``f32`` from ``f32`` and from the Type's repr ``<Type: 'float32'>``."""
    match = re.fullmatch(r"<Type: '(.*)'>", text)
    return match.group(1) if match else text


def _compare_vector(session: InferenceSession, vector: Mapping[str, Any], n_labels: int
                    ) -> tuple[list[str], float]:
    """Problems of one self-test vector, and its largest absolute difference."""
    name = vector["name"]
    rtol, atol = float(vector["rtol"]), float(vector["atol"])
    out = session.run(as_input(vector["input"]))
    problems, max_abs = [], 0.0
    for key in OUTPUT_NAMES:
        actual = np.asarray(out[key][0], dtype=np.float64)
        expected = np.asarray(vector["expected"][key], dtype=np.float64)
        if actual.shape != expected.shape:
            problems.append(f"vector {name!r}: {key} has shape {actual.shape}, the "
                            f"manifest expects {expected.shape}")
            continue
        max_abs = max(max_abs, float(np.max(np.abs(actual - expected), initial=0.0)))
        if not np.allclose(actual, expected, rtol=rtol, atol=atol):
            problems.append(f"vector {name!r}: {key} is {np.round(actual, 6).tolist()}, "
                            f"expected {np.round(expected, 6).tolist()} "
                            f"(rtol {rtol:g}, atol {atol:g})")
    if out["group_error"].shape[-1] != n_labels:
        problems.append(f"vector {name!r}: group_error has {out['group_error'].shape[-1]} "
                        f"columns for {n_labels} labels")
    return problems, max_abs


def check_session(session: InferenceSession, manifest: Mapping[str, Any]
                  ) -> tuple[list[str], float]:
    """Problems of a compiled model against its manifest, and the largest absolute
    difference from an expected output (precision, NaN refusal, every self-test vector)."""
    problems = []
    precision = _precision_name(session.property("INFERENCE_PRECISION_HINT"))
    if precision not in F32_NAMES:
        problems.append(f"compiled inference precision is {precision}, not f32 (set "
                        "INFERENCE_PRECISION_HINT=f32 in the manifest's compile config)")
    nan_row = np.zeros((1, N_FEATURES), dtype=np.float32)
    nan_row[0, 0] = np.nan
    try:
        session.run(nan_row)
        problems.append("NaN input was not refused by check_input")
    except InvalidInput:
        pass
    vectors = manifest.get("self_test")
    if not isinstance(vectors, list) or not vectors:
        return [*problems, "manifest has no self_test vectors"], 0.0
    max_abs = 0.0
    for i, vector in enumerate(vectors):
        try:
            found, diff = _compare_vector(session, vector, len(manifest["labels"]))
        except (KeyError, TypeError, ValueError) as exc:
            found, diff = [f"vector {i} is malformed ({type(exc).__name__}: {exc})"], 0.0
        problems += found
        max_abs = max(max_abs, diff)
    return problems, max_abs


def selftest_in_process(session: InferenceSession, manifest: Mapping[str, Any]) -> list[str]:
    """Problems of a compiled model against its (verified) manifest; empty when it passes."""
    return check_contract(manifest) + check_session(session, manifest)[0]


# ---- the child --------------------------------------------------------------------------
def _crash_hook() -> None:
    hook = os.environ.get(CRASH_HOOK_ENV)
    if hook == "segv":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from a test
        os.kill(os.getpid(), signal.SIGSEGV)
    elif hook == "hang":
        signal.pause()


def selftest_report(model_dir: Path, trusted_keys_dir: Path | None) -> dict[str, Any]:
    """The child's JSON report on ``model_dir``."""
    report: dict[str, Any] = {"ok": False, "version": None, "problems": [], "vectors": 0,
                              "compile_ms": None, "max_abs_diff": None}
    try:
        manifest = verify_model_dir(model_dir, trusted_keys(trusted_keys_dir))
    except ManifestError as exc:
        report["problems"] = [str(exc)]
        return report
    report["version"] = manifest.get("version")
    report["problems"] = check_contract(manifest)
    if report["problems"]:
        return report
    t0 = time.perf_counter()
    try:
        session = InferenceSession(str(model_dir / MODEL_XML), manifest["compile"])
    except ModelLoadError as exc:
        report["problems"] = [f"{model_dir / MODEL_XML}: OpenVINO could not read or compile "
                              f"it: {exc}"]
        return report
    report["compile_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    report["problems"], report["max_abs_diff"] = check_session(session, manifest)
    report["vectors"] = len(manifest["self_test"])
    report["ok"] = not report["problems"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {SELFTEST_MODULE}",
                                     description="Self-test one model directory.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--trusted-keys", type=Path, default=None,
                        help="directory of trusted *.pub keys (default: the repository's)")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a native crash leaves its Python stack on stderr
    _crash_hook()
    try:
        report = selftest_report(args.model_dir, args.trusted_keys)
    except Exception as exc:  # the child's one job is to answer in JSON, whatever happened
        report = {"ok": False, "version": None, "vectors": 0, "compile_ms": None,
                  "max_abs_diff": None,
                  "problems": [f"self-test failed unexpectedly: {type(exc).__name__}: {exc}"]}
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


# ---- the parent -------------------------------------------------------------------------
def _tail(text: str) -> str:
    return text[-STDERR_TAIL_CHARS:]


def result_from_child(returncode: int, stdout: str, stderr: str) -> SelfTestResult:
    """A child's exit status and output as a result; a crash or garbage fails it."""
    failure = {"returncode": returncode, "stderr": _tail(stderr)}
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return SelfTestResult(False, (f"self-test child died with {name}",), failure)
    lines = stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
        ok, problems = report["ok"], tuple(str(p) for p in report["problems"])
    except (IndexError, ValueError, KeyError, TypeError):
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return SelfTestResult(False, (f"self-test child exited with status {returncode} "
                                      f"without a JSON result: {last}",), failure)
    if ok is not True or returncode != 0 or problems:
        if not problems:
            problems = (f"self-test child exited with status {returncode} and no problem",)
        return SelfTestResult(False, problems, {**report, **failure})
    return SelfTestResult(True, (), report)


def run_selftest_child(model_dir: str | os.PathLike[str],
                       trusted_keys_dir: str | os.PathLike[str] | None = None,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> SelfTestResult:
    """Self-test ``model_dir`` in a fresh Python process (killed after ``timeout_s``)."""
    cmd = [sys.executable, "-m", SELFTEST_MODULE, str(Path(model_dir).resolve())]
    if trusted_keys_dir is not None:
        cmd += ["--trusted-keys", str(Path(trusted_keys_dir).resolve())]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr or ""
        if isinstance(stderr, bytes):
            stderr = stderr.decode(errors="replace")
        return SelfTestResult(False, (f"self-test timed out after {timeout_s:g}s (killed)",),
                              {"stderr": _tail(stderr)})
    return result_from_child(proc.returncode, proc.stdout, proc.stderr)


if __name__ == "__main__":
    sys.exit(main())
