"""Model updates over the air against the real receiver (loopback HTTP, embedded chdb) and a
real registry (signatures, self-test child): a newer signed version is found, fetched within
the link budget (every byte received is spent, none twice), installed and activated, and a
rollback sticks; an interrupted download resumes where its part file ends; bytes that changed
on the receiver mid-download are fetched again, never spliced; a tampered file or an untrusted
signature is refused once, the active model stays and the same bytes are not fetched again;
no newer version, a closed link or an unreachable receiver do nothing but say when to ask
again. The steps are driven with a fake clock: no sleeps."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")

from actors.model_runner.manifest import sha256_file
from actors.model_runner.registry import ModelRegistry
from actors.uplink.link import LinkBudget, LinkClass
from actors.uplink.model_update import (
    DOWNLOADED,
    DOWNLOADING,
    FAILED,
    FOUND,
    IDLE,
    INSTALLED,
    REFUSED,
    WAIT,
    ModelUpdater,
    UpdateError,
    UpdateStep,
    parse_catalog,
)
from central.model_store import ModelStore
from central.receiver import ReceiverServer
from tests.central import test_receiver
from tests.central.test_model_store import (
    NEWER,
    SHIPPED,
    make_lab,
    publish,
    running_receiver,
)
from tests.model_runner.conftest import resign

ACTIVE = SHIPPED.name
UNTRUSTED = "2027.1.1"
CHECK_S = 3600.0
MAX_STEPS = 500
FILE_REQUEST = re.compile(r"path=/v1/models/(\S+)/(\S+) status=(\d+) result=\w+ bytes=(\d+)"
                          r"(?: range=(\d+)-(\d+))?")


#: The fleet CA, the receiver's and a gateway's certificates, and a rogue one (a fixture).
pki = test_receiver.pki


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MeteredBudget(LinkBudget):
    """A real budget that also counts what was spent."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spent = 0

    def spend(self, link: str, lane: str, nbytes: int) -> None:
        self.spent += nbytes
        super().spend(link, lane, nbytes)


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> dict[str, Path]:
    """NEWER signed by a trusted lab key; UNTRUSTED signed by a key no gateway trusts."""
    root = tmp_path_factory.mktemp("lab")
    keys = make_lab(root)
    rogue = tmp_path_factory.mktemp("rogue")
    return {"keys": keys, NEWER: publish(root / "signed", NEWER, keys),
            UNTRUSTED: publish(rogue / "signed", UNTRUSTED, make_lab(rogue))}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, lab) -> Path:
    """A registry serving the shipped model (installed and self-tested once per module)."""
    root = tmp_path_factory.mktemp("baseline") / "models"
    assert ModelRegistry(root, lab["keys"]).ensure_default(SHIPPED) == ACTIVE
    return root


@pytest.fixture
def registry(tmp_path, baseline, lab) -> ModelRegistry:
    shutil.copytree(baseline, tmp_path / "registry")
    return ModelRegistry(tmp_path / "registry", lab["keys"])


@pytest.fixture
def store(tmp_path) -> Path:
    (tmp_path / "store").mkdir()
    return tmp_path / "store"


@pytest.fixture
def server(chdb_backend, store, tmp_path, caplog) -> Iterator[ReceiverServer]:
    caplog.set_level("INFO", logger="fleetgw.central")
    with running_receiver(chdb_backend, ModelStore(store), tmp_path / "devices") as srv:
        yield srv


@pytest.fixture
def updater(server, registry, tmp_path):
    """``updater(**options)``: a ModelUpdater of ``registry`` fetching from ``server``."""
    made = []

    def make(**options) -> ModelUpdater:
        made.append(ModelUpdater(server.url, registry, tmp_path / "downloads",
                                 **{"check_s": CHECK_S, **options}))
        return made[-1]

    yield make
    for each in made:
        each.close()


def served(caplog) -> list[tuple[str, str, int, int, tuple[int, int] | None]]:
    """The receiver's file requests: (version, name, status, bytes, range)."""
    out = []
    for record in caplog.records:
        if match := FILE_REQUEST.search(record.getMessage()):
            version, name, status, nbytes, first, last = match.groups()
            out.append((version, name, int(status), int(nbytes),
                        (int(first), int(last)) if first else None))
    return out


def catalog_bytes(store: Path) -> int:
    return len(json.dumps(ModelStore(store).catalog(), separators=(",", ":")))


def model_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir())


def run(updater: ModelUpdater, clock: Clock, until: tuple[str, ...]) -> list[UpdateStep]:
    """Step as an actor would — again after each ``wait_s`` — until an ``until`` action."""
    steps = []
    for _ in range(MAX_STEPS):
        steps.append(updater.step(clock()))
        if steps[-1].action in until:
            return steps
        clock.now += steps[-1].wait_s
    raise AssertionError(f"no {until} after {MAX_STEPS} steps: {steps[-5:]}")


def flip_byte(path: Path, offset: int = 100, *, keep_mtime: bool = False) -> None:
    """Change one byte in place (same inode and size; the same mtime when asked)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    with open(path, "r+b") as fh:
        fh.write(data)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


# ---- finding, fetching, installing --------------------------------------------------------------
def test_a_newer_version_is_fetched_within_the_budget_installed_activated_and_a_rollback_sticks(
        server, store, lab, registry, updater, caplog, tmp_path):
    shutil.copytree(lab[NEWER], store / NEWER)
    clock = Clock()
    budget = MeteredBudget([LinkClass("wifi", 16 << 10, 16 << 10)], 0, 0, clock=clock)
    ota = updater(budget=budget, link_class="wifi", chunk_bytes=8 << 10)
    steps = run(ota, clock, until=(INSTALLED, REFUSED, FAILED))
    assert [s.action for s in steps][0] == FOUND and steps[-1].action == INSTALLED, steps
    assert steps[-1].reason == f"{NEWER} is active (was {ACTIVE})"
    assert registry.active().version == NEWER and registry.active_version() == NEWER
    # the budget paced it, and paid for every byte received, each byte once
    waits = [s for s in steps if s.action == WAIT]
    assert waits and all(s.reason == "P3 link budget" and s.wait_s > 0 for s in waits)
    total = model_bytes(lab[NEWER])
    assert sum(s.nbytes for s in steps) == total
    assert budget.spent == ota.received_bytes == total + catalog_bytes(store)
    requests = served(caplog)
    assert sum(r[3] for r in requests) == total
    assert all(status == 206 and nbytes <= 8 << 10 for _, _, status, nbytes, _ in requests)
    assert list((tmp_path / "downloads").iterdir()) == []
    # nothing newer now; and after a rollback the rolled-back version is not fetched again
    assert ota.step(clock()).action == IDLE
    assert registry.rollback() == ACTIVE
    clock.now += CHECK_S
    step = ota.step(clock())
    assert (step.action, step.wait_s) == (IDLE, CHECK_S)
    assert registry.active_version() == ACTIVE and len(served(caplog)) == len(requests)


def test_only_a_version_newer_than_the_active_one_is_offered(server, store, lab, updater,
                                                             caplog, tmp_path):
    ota = updater()
    assert ota.check() is None  # an empty store
    shutil.copytree(SHIPPED, store / ACTIVE)
    shutil.copytree(SHIPPED, store / "2026.9.1")  # older, though "2026.9.1" > "2026.11.1"
    assert ota.check() is None
    step = ota.step(Clock()())
    assert (step.action, step.version, step.wait_s) == (IDLE, None, CHECK_S)
    assert step.reason == f"no model newer than {ACTIVE}"
    shutil.copytree(lab[NEWER], store / NEWER)
    shutil.copytree(lab[NEWER], store / "2026.10.1")
    assert ota.check() == NEWER
    assert served(caplog) == [] and not (tmp_path / "downloads" / "2026.10.1").exists()


def test_an_interrupted_download_resumes_where_its_part_file_ends(server, store, lab, updater,
                                                                  caplog, tmp_path):
    shutil.copytree(lab[NEWER], store / NEWER)
    first = updater(chunk_bytes=4096)
    assert first.check() == NEWER
    step = first.download(NEWER, max_chunks=3)
    assert (step.action, step.nbytes) == (DOWNLOADING, 3 * 4096)
    part = tmp_path / "downloads" / NEWER / "manifest.json.part"
    assert part.stat().st_size == 3 * 4096
    os.truncate(part, 10_000)  # a power cut took the tail of the last chunk
    before = len(served(caplog))
    second = updater(chunk_bytes=4096)  # the gateway restarted
    assert second.check() == NEWER
    assert second.download(NEWER).action == DOWNLOADED
    resumed = served(caplog)[before:]
    assert resumed[0][:3] == (NEWER, "manifest.json", 206)
    assert resumed[0][4] == (10_000, 10_000 + 4095)
    total = model_bytes(lab[NEWER])
    assert second.received_bytes - catalog_bytes(store) == total - 10_000
    assert {p.name: sha256_file(p) for p in part.parent.iterdir() if p.name != ".offer"} == \
           {p.name: sha256_file(p) for p in lab[NEWER].iterdir()}


def test_bytes_that_changed_on_the_receiver_mid_download_are_fetched_again_not_spliced(
        server, store, lab, updater, tmp_path):
    shutil.copytree(lab[NEWER], store / NEWER)
    ota = updater(chunk_bytes=4096)
    clock = Clock()
    assert ota.step(clock()).action == FOUND
    assert ota.step(clock()).action == DOWNLOADING
    # republished meanwhile: the same version under another (signed) manifest
    resign(store / NEWER, lab["keys"], lambda manifest: manifest.update(name="republished"))
    step = ota.step(clock())
    assert step.action == FAILED and "no longer serves the catalog's bytes" in step.reason
    assert not (tmp_path / "downloads" / NEWER).exists()
    clock.now += step.wait_s
    steps = run(ota, clock, until=(DOWNLOADED, REFUSED, FAILED))
    assert steps[0].action == FOUND and steps[-1].action == DOWNLOADED
    downloaded = tmp_path / "downloads" / NEWER
    assert {p.name: sha256_file(p) for p in downloaded.iterdir() if p.name != ".offer"} == \
           {p.name: sha256_file(p) for p in (store / NEWER).iterdir()}


def test_a_download_overtaken_by_a_newer_active_model_is_not_installed(server, store, lab,
                                                                       registry, updater,
                                                                       tmp_path):
    shutil.copytree(lab[NEWER], store / NEWER)
    ota = updater()
    assert ota.check() == NEWER
    assert ota.download(NEWER).action == DOWNLOADED
    (registry.root / "active").write_text("2099.1.1\n")  # an operator activated it meanwhile
    step = ota.install(NEWER)
    assert (step.action, step.reason) == (IDLE, f"2099.1.1 was activated meanwhile; {NEWER} "
                                                "is not newer: not installed")
    assert registry.installed() == [ACTIVE] and ota.offer is None
    assert list((tmp_path / "downloads").iterdir()) == []


# ---- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "why"), [
    ("tampered on the receiver", "does not match the manifest's"),
    ("tampered after the catalog", "does not match the catalog's"),
    ("untrusted signer", "which is not trusted"),
])
def test_a_refused_version_is_not_installed_the_active_stays_and_it_is_not_fetched_again(
        server, store, lab, registry, updater, caplog, tmp_path, case, why):
    version = UNTRUSTED if case == "untrusted signer" else NEWER
    shutil.copytree(lab[version], store / version)
    if case == "tampered on the receiver":
        flip_byte(store / version / "model.bin")
    ota = updater()
    clock = Clock()
    assert ota.step(clock()).action == FOUND
    if case == "tampered after the catalog":  # same size and mtime: the receiver's cache lies
        flip_byte(store / version / "model.bin", keep_mtime=True)
    step = run(ota, clock, until=(INSTALLED, REFUSED, FAILED))[-1]
    assert (step.action, step.version) == (REFUSED, version)
    assert why in step.reason
    assert registry.active_version() == ACTIVE and registry.installed() == [ACTIVE]
    assert list((tmp_path / "downloads").iterdir()) == []
    fetched = len(served(caplog))
    for _ in range(3):
        clock.now += CHECK_S
        assert ota.step(clock()).action == IDLE
    assert len(served(caplog)) == fetched
    assert [v for v, _digest in ota.refused] == [version]


# ---- the link and the catalog -------------------------------------------------------------------
def test_models_come_over_https_only_to_a_gateway_with_a_fleet_certificate(
        chdb_backend, store, lab, registry, pki, tmp_path):
    shutil.copytree(lab[NEWER], store / NEWER)
    tls = {"tls_cert": pki["receiver"][0], "tls_key": pki["receiver"][1],
           "tls_client_ca": pki["fleet-ca"][0]}
    with running_receiver(chdb_backend, ModelStore(store), tmp_path / "devices",
                          **tls) as server:
        assert server.url.startswith("https://")
        gateway, intruder = (
            ModelUpdater(server.url, registry, tmp_path / name, tls_cert=pki[name][0],
                         tls_key=pki[name][1], tls_ca=pki["fleet-ca"][0])
            for name in ("gateway", "intruder"))
        try:
            with pytest.raises(UpdateError, match="curl error"):
                intruder.check()
            assert gateway.check() == NEWER
            assert gateway.download(NEWER).action == DOWNLOADED
        finally:
            gateway.close()
            intruder.close()
    with pytest.raises(ValueError, match="missing tls_key, tls_ca"):
        ModelUpdater(server.url, registry, tmp_path, tls_cert=pki["gateway"][0])


def test_a_link_that_does_not_carry_the_lane_is_waited_for_without_a_request(registry,
                                                                             tmp_path):
    budget = LinkBudget([LinkClass("cellular", 1000, 1000, metered=True)], 0, 0)
    ota = ModelUpdater("http://127.0.0.1:9", registry, tmp_path / "downloads", budget=budget,
                       link_class="cellular")
    step = ota.step(0.0)
    assert (step.action, step.reason) == (WAIT, "P3 does not use metered link cellular")
    assert ota.received_bytes == 0
    with pytest.raises(UpdateError, match="metered"):
        ota.check()


def test_an_unreachable_receiver_is_a_failure_asked_again_after_retry_s(registry, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    ota = ModelUpdater(f"http://127.0.0.1:{port}", registry, tmp_path / "downloads",
                       retry_s=60, check_s=CHECK_S)
    step = ota.step(0.0)
    assert (step.action, step.wait_s) == (FAILED, 60) and "curl error 7" in step.reason
    assert ota.step(30.0) == UpdateStep(IDLE, None, 30.0, "next catalog check")
    assert ota.step(60.0).action == FAILED


def test_catalog_entries_that_could_write_outside_the_download_directory_are_ignored():
    good = {"size": 1, "sha256": "a" * 64}
    catalog = {"format": "fleetgw.models/1", "versions": [
        {"version": "../../etc", "files": {"model.bin": good}},
        {"version": "2027.1.1", "files": {"../../etc/passwd": good}},
        {"version": "2027.1.2", "files": {"/etc/passwd": good}},
        {"version": "2027.1.3", "files": {".bashrc": good}},
        {"version": "2027.1.4", "files": {"model.bin.part": good}},
        {"version": "2027.1.5", "files": {"model.bin": {"size": -1, "sha256": "a" * 64}}},
        {"version": "2027.1.6", "files": {"model.bin": {"size": 1, "sha256": "xyz"}}},
        {"version": "2027.1.7", "files": {}},
        {"version": "2027.1.8"},
        "2027.1.9",
        {"version": "2026.12.1", "files": {"model.bin": good}},
    ]}
    assert [o.version for o in parse_catalog(catalog)] == ["2026.12.1"]
    for bad in ([], {"versions": []}, {"format": "other", "versions": []}):
        with pytest.raises(UpdateError, match="not fleetgw.models/1"):
            parse_catalog(bad)
