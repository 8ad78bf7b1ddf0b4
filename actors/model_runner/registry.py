"""The registry: where installed models live and which one the model runner serves.

Where this sits: between a model directory (shipped in models/, or made by `fleetgw model
train`) and the model runner, which serves the active version and polls `active_version`.
Layout under ROOT (DATA_DIR/models by default):

    versions/<version>/  verified, self-tested copies: model.xml, model.bin, manifest.json,
                         manifest.sig (installed once, never modified)
    active               the served version's name (replaced atomically)
    history.json         the activations, oldest first: a stack that `rollback` pops
    installing/          staging of the install in progress (removed when it ends)
    .lock                flock held by install, activate and rollback

Nothing is installed or activated without a trusted signature, matching sha256 of every file
and a passing self-test in a child process (`actors.model_runner.selftest`); a refused
activation leaves the active version as it was. Errors are `RegistryError`s that say what was
refused, which version or path, why, and which `fleetgw model` command helps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import nacl.signing

from actors.durable import copy_durably, fsync_dir, write_atomic
from actors.model_runner.manifest import (
    DEFAULT_TRUSTED_KEYS,
    MANIFEST,
    MODEL_XML,
    SIGNATURE,
    VERSION_RE,
    ManifestError,
    model_sha256,
    trusted_keys,
    verify_model_dir,
)
from actors.model_runner.selftest import (
    DEFAULT_TIMEOUT_S,
    SelfTestResult,
    run_selftest_child,
)

VERSIONS = "versions"
ACTIVE = "active"
HISTORY = "history.json"
STAGING = "installing"
LOCK = ".lock"

Keys = Mapping[str, nacl.signing.VerifyKey]


class RegistryError(ValueError):
    """A refused registry operation; the message says what, which version or path, why, and
    a hint. ``bad_input``: the request itself is wrong (unknown version, not a model
    directory, no trusted keys) rather than a model refused."""

    def __init__(self, message: str, *, bad_input: bool = False) -> None:
        super().__init__(message)
        self.bad_input = bad_input


@attrs.frozen
class ActiveModel:
    """The served model: its verified manifest, and ``sha256`` (`model_sha256` of the
    manifest: the model's identity in inference records)."""

    version: str
    path: Path
    manifest: Mapping[str, Any]
    sha256: str

    @property
    def xml_path(self) -> Path:
        return self.path / MODEL_XML


@attrs.frozen
class InstallReport:
    """``already_installed``: the identical model was there (nothing done, no self-test)."""

    version: str
    path: Path
    sha256: str
    already_installed: bool
    selftest: SelfTestResult | None


@attrs.frozen
class ModelInfo:
    """One installed version as `list` sees it (signature and hashes checked, no self-test);
    ``problem`` is None exactly when ``ok``; threshold and metrics are None when not ok."""

    version: str
    active: bool
    ok: bool
    problem: str | None
    sha256: str | None
    threshold: float | None
    metrics: Mapping[str, Any] | None


@attrs.frozen
class CheckReport:
    """A full check (signature, hashes, self-test child) of a version or a directory."""

    version: str | None
    path: Path
    ok: bool
    problems: tuple[str, ...]
    details: Mapping[str, Any]


def version_key(version: str) -> list[Any]:
    """Natural order: 2026.9.1 before 2026.11.1."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


class ModelRegistry:
    """Installed model versions under ``root`` and the pointer to the active one."""

    def __init__(self, root: str | os.PathLike[str],
                 trusted_keys_dir: str | os.PathLike[str] | None = None,
                 selftest_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.root = Path(root)
        self.trusted_keys_dir = Path(trusted_keys_dir or DEFAULT_TRUSTED_KEYS).resolve()
        self.selftest_timeout_s = selftest_timeout_s
        self.versions = self.root / VERSIONS

    # ---- reading (no lock: the pointer and history are replaced atomically) --------------
    def active_version(self) -> str | None:
        """The active version's name, from the pointer alone (cheap: the runner polls it)."""
        try:
            return (self.root / ACTIVE).read_text().strip() or None
        except FileNotFoundError:
            return None

    def active(self) -> ActiveModel | None:
        """The active model, its signature and hashes verified; None when none is active."""
        version = self.active_version()
        if version is None:
            return None
        try:
            manifest = self._verify_installed(version, self._keys())
        except ManifestError as exc:
            raise RegistryError(f"the active model {version} does not verify: {exc}. Hint: "
                                "`fleetgw model rollback`, or `fleetgw model activate "
                                "VERSION` (`fleetgw model list` shows the installed ones)"
                                ) from exc
        return ActiveModel(version, self.versions / version, manifest, model_sha256(manifest))

    def installed(self) -> list[str]:
        """Installed versions, in natural version order."""
        if not self.versions.is_dir():
            return []
        names = [p.name for p in self.versions.iterdir()
                 if p.is_dir() and VERSION_RE.fullmatch(p.name)]
        return sorted(names, key=version_key)

    def history(self) -> list[str]:
        """The activations, oldest first."""
        path = self.root / HISTORY
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            data = None
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise RegistryError(f"{path}: unreadable or not a JSON list of versions. Hint: fix "
                                "or delete it (only `fleetgw model rollback` needs it)")
        return data

    def list(self) -> list[ModelInfo]:
        """Every installed version with its signature and hashes checked."""
        active, keys = self.active_version(), self._keys()
        infos = []
        for version in self.installed():
            try:
                manifest = self._verify_installed(version, keys)
            except ManifestError as exc:
                infos.append(ModelInfo(version, version == active, False, str(exc),
                                       None, None, None))
                continue
            infos.append(ModelInfo(version, version == active, True, None,
                                   model_sha256(manifest), float(manifest["threshold"]),
                                   manifest["metrics"]))
        return infos

    def verify(self, version: str | None = None) -> list[CheckReport]:
        """A full check (with the self-test child) of one installed version, or of all."""
        versions = self.installed() if version is None else [version]
        return [attrs.evolve(self.check_dir(self._installed_path(v)), version=v)
                for v in versions]

    def check_dir(self, path: str | os.PathLike[str]) -> CheckReport:
        """A full check of any model directory (signature, hashes, contract, self-test)."""
        path = Path(path)
        result = run_selftest_child(path, self.trusted_keys_dir, self.selftest_timeout_s)
        return CheckReport(result.details.get("version"), path, result.ok, result.problems,
                           result.details)

    # ---- changing (under the lock) -----------------------------------------------------
    def install(self, src_dir: str | os.PathLike[str]) -> InstallReport:
        """Verify ``src_dir``, copy it, verify and self-test the copy, then add it to
        versions/ (never activates). The identical model installed already is a no-op."""
        src = Path(src_dir)
        keys = self._keys()
        manifest = self._verify_source(src, keys)
        with self._locked():
            return self._install(src, manifest, keys)

    def activate(self, version: str) -> ActiveModel:
        """Serve ``version`` once it re-verifies and passes its self-test again."""
        with self._locked():
            model = self._checked(version, "activate")
            self._switch_to(version)
            return model

    def rollback(self) -> str:
        """Re-activate the version activated before the active one; returns it."""
        with self._locked():
            active, stack = self.active_version(), self.history()
            while stack and stack[-1] == active:
                stack.pop()
            if not stack:
                raise RegistryError(f"nothing to roll back to: {active or 'no model'} is "
                                    "active and the history holds no earlier version. Hint: "
                                    "`fleetgw model activate VERSION` (`fleetgw model list` "
                                    "shows the installed ones)")
            self._checked(stack[-1], "roll back to")
            # the shortened history goes first: after a crash in between, the pointer still
            # names the version being rolled back from, and the history's top is the target
            self._write(HISTORY, json.dumps(stack, indent=2) + "\n")
            self._write(ACTIVE, f"{stack[-1]}\n")
            return stack[-1]

    def ensure_default(self, shipped_dir: str | os.PathLike[str]) -> str:
        """The active version; when none is active, install and activate ``shipped_dir``."""
        with self._locked():
            current = self.active_version()
            if current is not None:
                return current
            keys = self._keys()
            report = self._install(Path(shipped_dir),
                                   self._verify_source(Path(shipped_dir), keys), keys)
            self._checked(report.version, "activate")
            self._switch_to(report.version)
            return report.version

    # ---- internals ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _keys(self) -> Keys:
        try:
            keys = trusted_keys(self.trusted_keys_dir)
        except ManifestError as exc:
            raise RegistryError(f"{exc}. Hint: fix or remove that file", bad_input=True) from exc
        if not keys:
            raise RegistryError(f"no trusted keys in {self.trusted_keys_dir} (no *.pub file). "
                                "Hint: put the model signer's public key there (`fleetgw "
                                "model keygen PATH` makes a key pair), or pass --trusted-keys",
                                bad_input=True)
        return keys

    def _verify_source(self, src: Path, keys: Keys) -> dict[str, Any]:
        if not (src / MANIFEST).is_file():
            raise RegistryError(f"cannot install {src}: no {MANIFEST} there (not a model "
                                "directory). Hint: `fleetgw model train --out DIR` makes one",
                                bad_input=True)
        try:
            manifest = verify_model_dir(src, keys)
        except ManifestError as exc:
            raise RegistryError(f"refused to install {src}: {exc}. Hint: check it with "
                                f"`fleetgw model verify --path {src}`") from exc
        if not VERSION_RE.fullmatch(str(manifest["version"])):
            raise RegistryError(f"refused to install {src}: its version "
                                f"{manifest['version']!r} is not a plain name "
                                f"({VERSION_RE.pattern})")
        return manifest

    def _verify_installed(self, version: str, keys: Keys) -> dict[str, Any]:
        manifest = verify_model_dir(self.versions / version, keys)
        if manifest["version"] != version:
            raise ManifestError(f"{self.versions / version}: holds version "
                                f"{manifest['version']!r} (moved by hand?)")
        return manifest

    def _installed_path(self, version: str) -> Path:
        if version not in self.installed():
            raise RegistryError(f"version {version!r} is not installed in {self.versions} "
                                f"(installed: {', '.join(self.installed()) or 'none'}). "
                                "Hint: `fleetgw model install PATH`", bad_input=True)
        return self.versions / version

    def _stays(self) -> str:
        active = self.active_version()
        return f"{active} stays active" if active else "no model is active"

    def _checked(self, version: str, action: str) -> ActiveModel:
        """``version`` re-verified and self-tested, or a RegistryError saying why not."""
        path = self._installed_path(version)
        try:
            manifest = self._verify_installed(version, self._keys())
        except ManifestError as exc:
            raise RegistryError(f"refused to {action} {version}: {exc}; {self._stays()}. "
                                "Hint: reinstall it with `fleetgw model install PATH`") from exc
        result = run_selftest_child(path, self.trusted_keys_dir, self.selftest_timeout_s)
        if not result.ok:
            raise RegistryError(f"refused to {action} {version}: self-test failed: "
                                f"{'; '.join(result.problems)}; {self._stays()}. Hint: "
                                f"`fleetgw model verify {version}`")
        return ActiveModel(version, path, manifest, model_sha256(manifest))

    def _write(self, name: str, text: str) -> None:
        write_atomic(self.root / name, text.encode())

    def _switch_to(self, version: str) -> None:
        """Point at ``version`` and push it on the history. The pointer goes first: after a
        crash in between, the history still names the version to roll back to."""
        history = self.history()
        self._write(ACTIVE, f"{version}\n")
        if history[-1:] != [version]:
            self._write(HISTORY, json.dumps([*history, version], indent=2) + "\n")

    def _install(self, src: Path, manifest: dict[str, Any], keys: Keys) -> InstallReport:
        version, sha = manifest["version"], model_sha256(manifest)
        dest = self.versions / version
        if dest.exists():
            try:
                installed = self._verify_installed(version, keys)
            except ManifestError:
                installed = None  # a damaged copy: replaced below by a good one
            if installed is not None and model_sha256(installed) != sha:
                raise RegistryError(
                    f"refused to install {src}: version {version} is installed with a "
                    f"different manifest sha256 ({model_sha256(installed)[:16]}…, this one "
                    f"{sha[:16]}…). Hint: give the new model its own version "
                    "(`fleetgw model train --version V`)")
            if installed is not None:
                return InstallReport(version, dest, sha, True, None)
        staging = self.root / STAGING
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted install
        staged = staging / version
        staged.mkdir(parents=True)
        self.versions.mkdir(parents=True, exist_ok=True)
        try:
            for name in (*manifest["files"], MANIFEST, SIGNATURE):
                copy_durably(src / name, staged / name)
            fsync_dir(staged)
            try:
                same = model_sha256(verify_model_dir(staged, keys)) == sha
            except ManifestError:
                same = False
            if not same:
                raise RegistryError(f"refused to install {src}: its copy differs from what was "
                                    "verified (changed while copying?). Hint: try again")
            result = run_selftest_child(staged, self.trusted_keys_dir, self.selftest_timeout_s)
            if not result.ok:
                raise RegistryError(f"refused to install {version} from {src}: self-test "
                                    f"failed: {'; '.join(result.problems)}. Hint: `fleetgw "
                                    f"model verify --path {src}` shows the same check")
            if dest.exists():  # the damaged copy of this same model
                os.rename(dest, staging / f"{version}.damaged")
            os.rename(staged, dest)
            fsync_dir(self.versions)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return InstallReport(version, dest, sha, False, result)
