"""deploy/: the systemd unit, sysusers/tmpfiles, the Dockerfile and its .dockerignore, the CI
workflow template and the production example config, each checked by the tool that owns its
format (systemd-analyze, systemd-sysusers/-tmpfiles, hadolint, the vendored GitHub workflow
schema, yamllint, the project's own config loader) and for what a reviewer cares about.

systemd's tools come from the ``systemd`` package (.ci/run installs it): without them those
tests are skipped, unless ``FLEETGW_REQUIRE_SYSTEMD_ANALYZE=1`` (CI) makes that a failure.
hadolint, check-jsonschema and yamllint come with the [test] extra.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from config.loader import load_config
from tools.run import START_TIMEOUT_S, Runner

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "fleetgw.service"
DOCKERFILE = DEPLOY / "Dockerfile"
WORKFLOW = DEPLOY / "ci" / "github-actions.yml"
PRODUCTION_CONFIG = DEPLOY / "fleetgw.toml"
REQUIRE_ENV = "FLEETGW_REQUIRE_SYSTEMD_ANALYZE"
#: The installed command the unit starts (deploy/PACKAGING.md's layout: releases side by side,
#: /opt/fleetgw/current the one that runs).
INSTALLED_FLEETGW = "/opt/fleetgw/current/bin/fleetgw"
#: What `fleetgw run` may need after the orderly stop: the actor system's shutdown (Thespian
#: gives up after 10 s), SIGKILL of leftovers (waits up to 10 s), the summary.
TEARDOWN_S = 25.0


def tool(name: str) -> str:
    """A command of the systemd package, or skip (fail under FLEETGW_REQUIRE_SYSTEMD_ANALYZE=1)."""
    path = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/bin/{name}")
                                       if os.access(p, os.X_OK)), None)
    if path:
        return path
    reason = f"{name} is not installed (Debian: apt-get install systemd)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)


def venv_tool(name: str) -> str:
    """A console script of the [test] extra, beside this interpreter."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is missing: install the test extra (pip install -e '.[test]')"
    return found


def seconds(text: str) -> float:
    """A systemd time span such as ``30s``, ``2min``, ``120`` in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit]
    return total


# ---- the systemd unit ------------------------------------------------------------------------

def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """``Section.Key`` -> every value it is given (DeviceAllow= and friends repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(f"Service.{key}") or settings.get(f"Unit.{key}")
    assert values, f"{UNIT.name} does not set {key}="
    return values[-1]


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` on ``unit_text`` with ExecStart pointed at this venv's
    fleetgw (verify insists the executable exists)."""
    analyze = tool("systemd-analyze")
    fleetgw = venv_tool("fleetgw")
    unit = tmp_path / "fleetgw.service"
    unit.write_text(unit_text.replace(INSTALLED_FLEETGW, fleetgw))
    return subprocess.run([analyze, "verify", f"./{unit.name}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_unit_passes_systemd_analyze_verify_without_a_single_warning(tmp_path):
    result = verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", result.stdout + result.stderr


def test_verify_reports_a_misspelt_directive(tmp_path):
    """The check above would notice a typo: systemd ignores unknown keys with a warning."""
    text = UNIT.read_text().replace("KillMode=mixed", "KilMode=mixed")
    result = verify(text, tmp_path)
    assert "Unknown key 'KilMode'" in result.stderr


def test_unit_runs_the_gateway_as_a_watched_unprivileged_notify_service():
    s = unit_settings()
    assert one(s, "Type") == "notify"
    assert one(s, "NotifyAccess") == "main"  # tests/deploy/test_sd_notify.py: all from main
    command = shlex.split(one(s, "ExecStart"))
    assert command == [INSTALLED_FLEETGW, "run", "--config", "/etc/fleetgw/fleetgw.toml",
                       "--data-dir", "/var/lib/fleetgw"]
    assert (one(s, "User"), one(s, "Group")) == ("fleetgw", "fleetgw")
    assert one(s, "Restart") == "always"
    # The run loop can block for 60 s inside Thespian when the root stops answering
    # (test_sd_notify): the watchdog must fire well before that.
    assert 10 <= seconds(one(s, "WatchdogSec")) < 60
    assert seconds(one(s, "RestartSec")) > 0
    assert seconds(one(s, "TimeoutStartSec")) > START_TIMEOUT_S
    assert one(s, "StateDirectory") == "fleetgw"
    assert one(s, "ConfigurationDirectory") == "fleetgw"
    assert one(s, "Documentation") == "file:/opt/fleetgw/current/app/deploy/PACKAGING.md"


def test_packaging_installs_the_layout_the_unit_runs():
    """PACKAGING.md's systemd install makes what the unit starts: the release's venv with its
    source tree in app/, `current` and the config's symlink into it (ROLLOUT.md's layout)."""
    text = (DEPLOY / "PACKAGING.md").read_text()
    install = text[text.index("## Install as a systemd service"):]
    install = install[:install.index("\n## ")]
    steps = install[install.index("```sh"):install.index("```", install.index("```sh") + 5)]
    assert 'R=/opt/fleetgw/releases/' in steps
    for step in ('python3 -m venv "$R"', '"$R/bin/pip" install -e "$R/app"',
                 'install -m 0644 deploy/fleetgw.toml "$R/fleetgw.toml"',
                 'ln -sfn "$R" /opt/fleetgw/current',
                 "ln -sfn /opt/fleetgw/current/fleetgw.toml /etc/fleetgw/fleetgw.toml",
                 f"{INSTALLED_FLEETGW} journal key new", f"{INSTALLED_FLEETGW} health"):
        assert step in steps, step
    assert "/opt/fleetgw/venv" not in install and "/opt/fleetgw/app" not in install


def test_stop_goes_to_the_run_process_and_waits_longer_than_its_orderly_stop():
    s = unit_settings()
    assert one(s, "KillMode") == "mixed"  # SIGTERM to the run process only, SIGKILL after
    assert "Service.KillSignal" not in s  # SIGTERM, systemd's default
    runner = Runner.__new__(Runner)
    runner.config = load_config(PRODUCTION_CONFIG)
    needed = runner.stop_timeout_s() + TEARDOWN_S
    assert seconds(one(s, "TimeoutStopSec")) > needed, \
        f"TimeoutStopSec must exceed {needed:.0f}s for {PRODUCTION_CONFIG.name}"


def test_unit_sandbox_keeps_privileges_off_and_what_the_gateway_needs_on():
    s = unit_settings()
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": "",
                       "AmbientCapabilities": "", "DevicePolicy": "closed",
                       "SystemCallFilter": "@system-service",
                       "SystemCallArchitectures": "native"}.items():
        assert one(s, key) == value, f"{key}={one(s, key)!r}, expected {value!r}"
    families = set(one(s, "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_CAN", "AF_NETLINK"}
    assert {v.split()[0] for v in s["Service.DeviceAllow"]} >= {"char-ttyACM", "char-ttyUSB"}
    # OpenVINO's JIT needs W+X memory; a private network would cut the uplink off.
    for absent in ("MemoryDenyWriteExecute", "PrivateNetwork", "PrivateDevices", "DynamicUser"):
        assert f"Service.{absent}" not in s, f"{absent}= breaks the gateway (see the unit)"
    assert seconds(one(s, "MemoryMax").rstrip("MG")) > 0 and one(s, "TasksMax").isdigit()


def test_sysusers_and_tmpfiles_make_the_user_and_secure_the_key_files(tmp_path):
    sysusers, tmpfiles = tool("systemd-sysusers"), tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to give files to another user")
    root = tmp_path / "root"
    (root / "etc" / "fleetgw").mkdir(parents=True)
    key = root / "etc" / "fleetgw" / "journal.key"
    key.write_text("copied in by root\n")
    key.chmod(0o644)
    subprocess.run([sysusers, f"--root={root}", str(DEPLOY / "fleetgw.sysusers")], check=True,
                   capture_output=True, timeout=60)
    entry = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                 if line.startswith("fleetgw:"))
    uid = int(entry[2])
    assert 0 < uid < 1000 and entry[5:] == ["/var/lib/fleetgw", "/usr/sbin/nologin"]
    result = subprocess.run([tmpfiles, f"--root={root}", "--create",
                             str(DEPLOY / "fleetgw.tmpfiles")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert (key.stat().st_uid, key.stat().st_mode & 0o777) == (uid, 0o600)
    keys = root / "etc" / "fleetgw" / "keys"
    assert (keys.stat().st_uid, keys.stat().st_mode & 0o777) == (uid, 0o700)
    assert (root / "run" / "fleetgw").is_dir()


# ---- the Dockerfile --------------------------------------------------------------------------

def instructions(path: Path = DOCKERFILE) -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuation lines joined."""
    result, stage, pending = [], -1, ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued RUN
        pending += " " + line.removesuffix("\\").strip()
        if line.endswith("\\"):
            continue
        word, _, rest = pending.strip().partition(" ")
        pending = ""
        if word.upper() == "FROM":
            stage += 1
        result.append((stage, word.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    parsed = instructions()
    last = max(stage for stage, _, _ in parsed)
    return [(word, rest) for stage, word, rest in parsed if stage == last]


def arg_defaults() -> dict[str, str]:
    return dict(rest.split("=", 1) for _, word, rest in instructions()
                if word == "ARG" and "=" in rest)


def test_dockerfile_has_no_hadolint_findings_at_level_warning():
    result = subprocess.run([venv_tool("hadolint"), "--format", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(f"line {f['line']}: {f['code']} {f['message']}"
                                  for f in serious)


def test_every_hadolint_ignore_says_why():
    lines = DOCKERFILE.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[n - 1].strip() if n else ""
            assert reason.startswith("#") and len(reason) > 20, \
                f"line {n + 1}: an ignore needs a reason in the comment above it"


def test_image_is_two_stages_from_a_pinned_python_slim_bookworm():
    froms = [rest for _, word, rest in instructions() if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS builder")
    base = arg_defaults()["PYTHON_IMAGE"]
    assert base == "python:3.11-slim-bookworm"
    assert all("--platform" not in f for f in froms)  # the target platform, for both arches
    runs = " ".join(rest for _, word, rest in instructions() if word == "RUN")
    assert not re.search(r"\b(curl|wget)\b|amd64|x86_64|aarch64|arm64", runs), \
        "no arch-specific downloads"
    assert not [rest for _, word, rest in instructions() if word == "ADD"]


def test_runtime_runs_fleetgw_under_tini_as_a_non_root_user_with_its_volume():
    final = final_stage()
    words = [w for w, _ in final]
    user = [rest for w, rest in final if w == "USER"][-1]
    defaults = arg_defaults()
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], user)
    assert resolved.split(":")[0] not in ("0", "root") and (
        resolved.split(":")[0].isdigit() or resolved.startswith("fleetgw")), resolved
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["/usr/bin/tini", "--", "fleetgw"]
    assert json.loads(dict(final)["CMD"]) == ["run", "--config", "/etc/fleetgw/fleetgw.toml",
                                             "--data-dir", "/var/lib/fleetgw"]
    assert json.loads(dict(final)["VOLUME"]) == ["/var/lib/fleetgw"]
    assert dict(final)["STOPSIGNAL"] == "SIGTERM"
    health = dict(final)["HEALTHCHECK"]
    assert re.search(r'CMD \["fleetgw", "health"', health) and "--timeout=" in health
    assert "EXPOSE" not in words  # metrics and the admin port stay on loopback
    apt = " ".join(rest for w, rest in final if w == "RUN" and "apt-get install" in rest)
    assert "mosquitto" in apt and "tini" in apt and "--no-install-recommends" in apt
    assert "rm -rf /var/lib/apt/lists/*" in apt


def test_image_carries_no_secret_no_data_and_no_test_or_central_extras():
    text = " ".join(rest for _, _, rest in instructions())  # instructions, not comments
    for _, word, rest in instructions():
        if word != "COPY":
            continue
        sources = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
        for source in sources:
            assert source not in (".", "./"), "the whole build context is never copied"
            assert not re.search(r"\.(key|pem|p12)$|(^|/)(data|keys|\.venv)(/|$)", source), \
                source
    assert "[test]" not in text and "[central]" not in text and "chdb" not in text
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if d.startswith(("chdb", "pytest", "hadolint"))]


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent directory) wins; ``!``
    re-includes; ``**`` spans directories (moby/patternmatcher)."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = re.escape(pattern.lstrip("!").rstrip("/"))
        rx = (rx.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
              .replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))
        if any(re.fullmatch(rx, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_data_venvs_and_keys_out_and_lets_every_copied_path_in():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in ("data/journal.db", ".venv/bin/python", "journal.key", "keys/veh-0001.key",
                 "actors/journal/test.key", "config/client.pem", ".git/config",
                 "tests/system/harness.py", "actors/__pycache__/base.cpython-311.pyc",
                 "deploy/fleetgw.service", "fleetgw.egg-info/PKG-INFO"):
        assert dockerignore_excludes(path, patterns), f"{path} would be in the build context"
    for _, word, rest in instructions():
        if word == "COPY" and "--from=" not in rest:
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                probe = source.rstrip("/") + ("/x.py" if (ROOT / source).is_dir() else "")
                assert not dockerignore_excludes(probe, patterns), \
                    f"COPY {source} is excluded by .dockerignore: the build would fail"
    assert not dockerignore_excludes("models/trusted_keys/fleetgw-release.pub", patterns)


# ---- the CI workflow template ----------------------------------------------------------------

def test_workflow_template_matches_githubs_schema_offline():
    # A dead proxy: any download would fail, so a pass means the vendored schema was used.
    offline = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY":
               "http://127.0.0.1:9", "NO_PROXY": ""}
    check = [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows"]
    result = subprocess.run([*check, str(WORKFLOW)], capture_output=True, text=True,
                            timeout=120, env=offline)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-24.04",
                                                   "runs_on: ubuntu-24.04", 1))
    check = [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows"]
    result = subprocess.run([*check, str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_workflow_template_passes_yamllint():
    config = "{extends: default, rules: {line-length: {max: 100}}}"
    result = subprocess.run([venv_tool("yamllint"), "-d", config, "--strict", str(WORKFLOW)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_tests_then_builds_both_arches_and_pushes_only_main_and_tags():
    flow = yaml.safe_load(WORKFLOW.read_text())
    jobs = flow["jobs"]
    assert ".ci/run" in jobs["test"]["steps"][-1]["run"]
    build = jobs["build"]
    assert build["needs"] == "test"
    steps = {s["uses"].split("@")[0]: s for s in build["steps"] if "uses" in s}
    for action in ("docker/setup-qemu-action", "docker/setup-buildx-action",
                   "docker/login-action", "docker/metadata-action",
                   "docker/build-push-action"):
        assert action in steps, action
    push = steps["docker/build-push-action"]["with"]
    assert push["platforms"] == "linux/amd64,linux/arm64"
    assert push["file"] == "deploy/Dockerfile" and push["context"] == "."
    assert push["push"] != "true" and "env.PUSH" in push["push"]
    assert "refs/heads/main" in build["env"]["PUSH"] and "refs/tags/v" in build["env"]["PUSH"]
    assert push["cache-from"] and push["cache-to"]
    login = steps["docker/login-action"]
    assert login["if"] == "env.PUSH == 'true'"
    assert "secrets." in login["with"]["password"]
    for job in jobs.values():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), \
                    f"{step['uses']} is not pinned to a commit"


# ---- the production example config -----------------------------------------------------------

def test_production_config_loads_validates_and_keeps_secrets_in_etc_and_listeners_local():
    from config.policy import load_policy
    from supervisors.spec import validate
    from supervisors.tree import gateway_tree

    config = load_config(PRODUCTION_CONFIG)  # validation does no I/O: absent keys are fine
    load_policy(config.router.policy_path)
    assert validate(gateway_tree(config)) == []
    assert config.journal.key_file == "/etc/fleetgw/journal.key"
    assert config.journal.key_path("/var/lib/fleetgw") == "/etc/fleetgw/journal.key"
    assert config.journal.synchronous == "FULL"
    uplink = config.uplink
    assert uplink.url.startswith("https://")
    for path in (uplink.keys_dir, uplink.tls_cert, uplink.tls_key, uplink.tls_ca):
        assert path.startswith("/etc/fleetgw/keys"), path
    assert config.metrics.loopback and config.broker.loopback
    assert not config.gateway.fault_injection
    assert {s.type for s in config.sensors} >= {"mqtt", "nmea"}
    nmea = next(s for s in config.sensors if s.type == "nmea")
    assert nmea.nmea.endpoint.path.startswith("/dev/ttyACM")  # the unit's DeviceAllow=
