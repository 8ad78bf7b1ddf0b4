"""The model store and its endpoints on the real receiver (loopback HTTP, embedded chdb): the
catalog lists exactly the signed-looking versions with each file's size and sha256 (hashed
once until the file changes); a file is served whole or from a single Range with its sha256 as
ETag; anything the catalog does not list — other versions, other files, ``..``, ``/``, symlinks
out of the store — is refused and never served; no store configured is a 404 with a reason;
``[models] directory`` is taken from the config file's directory and served by `fleetgw central
serve`. The helpers here (`make_lab`, `publish`, `running_receiver`) serve the gateway's OTA
tests too (tests/uplink/test_model_update.py)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")

from actors.model_runner.manifest import REPO_MODELS, sha256_file
from central import model_store
from central.config import ReceiverSettings, load_central_config
from central.devices import DeviceRegistry
from central.model_store import ModelStore, ModelStoreError, byte_range
from central.receiver import Receiver, ReceiverServer
from tests.model_runner.conftest import TRUSTED_KEYS, _signing_key, resign

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO_MODELS / (REPO_MODELS / "DEFAULT").read_text().strip()
NEWER = "2026.12.1"
SECRET = b"central-secret-not-a-model"


# ---- helpers (shared with tests/uplink/test_model_update.py) ------------------------------------
def make_lab(root: Path) -> Path:
    """A signing key in ``root`` (tests.model_runner's convention) and ``root/trusted_keys``
    holding its public key and the release keys that sign the shipped model."""
    _signing_key(root)
    for pub in (REPO_MODELS / "trusted_keys").glob("*.pub"):
        shutil.copy(pub, root / TRUSTED_KEYS / pub.name)
    return root / TRUSTED_KEYS


def publish(store: Path, version: str, keys_dir: Path) -> Path:
    """The shipped model as ``version`` in ``store``, signed by the key of ``keys_dir``."""
    model_dir = store / version
    shutil.copytree(SHIPPED, model_dir)
    resign(model_dir, keys_dir, lambda manifest: manifest.update(version=version))
    return model_dir


@contextlib.contextmanager
def running_receiver(backend, models: ModelStore | None, devices_dir: Path,
                     **settings: str) -> Iterator[ReceiverServer]:
    """A receiver on a free loopback port in this process, serving ``models``; ``settings``:
    more `ReceiverSettings` (TLS)."""
    settings = ReceiverSettings(port=0, devices_dir=str(devices_dir), **settings)
    receiver = Receiver(backend, DeviceRegistry(devices_dir), settings.max_raw_bytes)
    server = ReceiverServer(settings, receiver, models)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def fetch(server: ReceiverServer, path: str, headers: dict[str, str] | None = None
          ) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` exactly as given (no client-side normalisation of ``..``)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def signed(tmp_path_factory) -> Path:
    """A model directory signed as NEWER by a lab key (made once)."""
    root = tmp_path_factory.mktemp("lab")
    return publish(root / "signed", NEWER, make_lab(root))


@pytest.fixture
def store_dir(tmp_path, signed) -> Path:
    """A store holding NEWER, with a secret beside it and decoys in and around it."""
    store = tmp_path / "store"
    shutil.copytree(signed, store / NEWER)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (store / NEWER / ".hidden").write_bytes(SECRET)
    (store / NEWER / "notes").mkdir()
    os.symlink(tmp_path / "secret.txt", store / NEWER / "link.bin")
    os.symlink(tmp_path, store / "2027.1.1")  # a version that is a symlink out of the store
    shutil.copytree(signed, store / ".staging")  # not a version name
    unsigned = store / "2027.2.1"
    shutil.copytree(signed, unsigned)
    (unsigned / "manifest.sig").unlink()
    (store / "README").write_text("not a version\n")
    return store


@pytest.fixture
def server(chdb_backend, store_dir, tmp_path) -> Iterator[ReceiverServer]:
    with running_receiver(chdb_backend, ModelStore(store_dir), tmp_path / "devices") as srv:
        yield srv


def expected_files(model_dir: Path) -> dict[str, dict]:
    return {name: {"size": (model_dir / name).stat().st_size,
                   "sha256": sha256_file(model_dir / name)}
            for name in ("manifest.json", "manifest.sig", "model.bin", "model.xml")}


# ---- the store ----------------------------------------------------------------------------------
def test_the_catalog_lists_signed_versions_with_size_and_sha256_of_each_plain_file(store_dir):
    catalog = ModelStore(store_dir).catalog()
    assert catalog == {"format": "fleetgw.models/1", "versions": [
        {"version": NEWER, "files": expected_files(store_dir / NEWER)}]}
    json.dumps(catalog)  # JSON-able


def test_versions_are_listed_in_version_order_not_text_order(store_dir):
    shutil.copytree(store_dir / NEWER, store_dir / "2026.9.1")
    versions = [v["version"] for v in ModelStore(store_dir).catalog()["versions"]]
    assert versions == ["2026.9.1", NEWER]


def test_a_missing_store_directory_has_an_empty_catalog(tmp_path):
    assert ModelStore(tmp_path / "none").catalog()["versions"] == []


def test_each_file_is_hashed_once_until_it_changes(store_dir, monkeypatch):
    hashed = []
    real = model_store.file_sha256

    def counting(fh):
        hashed.append(fh.name)
        return real(fh)

    monkeypatch.setattr(model_store, "file_sha256", counting)
    store = ModelStore(store_dir)
    store.catalog()
    store.catalog()
    with store.open_file(NEWER, "model.bin"):
        pass
    assert len(hashed) == 4
    with open(store_dir / NEWER / "model.xml", "ab") as fh:
        fh.write(b"\n")
    files = store.catalog()["versions"][0]["files"]
    assert len(hashed) == 5
    assert files["model.xml"]["sha256"] == sha256_file(store_dir / NEWER / "model.xml")


@pytest.mark.parametrize(("version", "name", "status", "reason"), [
    ("2027.9.9", "model.bin", 404, "no model version 2027.9.9 in this store"),
    ("2027.2.1", "model.bin", 404, "no model version 2027.2.1"),  # no manifest.sig
    ("2027.1.1", "secret.txt", 404, "no model version 2027.1.1"),  # a symlinked directory
    (NEWER, "model.onnx", 404, "has no file 'model.onnx'"),
    (NEWER, "link.bin", 404, "has no file 'link.bin'"),  # a symlink out of the store
    (NEWER, "notes", 404, "has no file 'notes'"),  # a directory
    (NEWER, ".hidden", 400, "is not a plain file name"),
    (NEWER, "..", 400, "is not a plain file name"),
    (NEWER, "../../secret.txt", 400, "is not a plain file name"),
    (NEWER, "/etc/passwd", 400, "is not a plain file name"),
    ("..", "secret.txt", 400, "is not a model version"),
    (".staging", "model.bin", 400, "is not a model version"),
    ("/tmp", "secret.txt", 400, "is not a model version"),
])
def test_a_file_the_catalog_does_not_list_is_refused(store_dir, version, name, status, reason):
    with pytest.raises(ModelStoreError) as refused:
        ModelStore(store_dir).open_file(version, name)
    assert refused.value.status == status
    assert reason in refused.value.reason


@pytest.mark.parametrize(("header", "span"), [
    (None, None), ("", None), ("bytes=0-", (0, 999)), ("bytes=100-", (100, 999)),
    ("bytes=100-199", (100, 199)), ("bytes=990-5000", (990, 999)), ("bytes=-10", (990, 999)),
    ("bytes=-5000", (0, 999)), ("bytes=999-999", (999, 999)),
    ("bytes=0-1,5-9", None), ("items=0-1", None), ("bytes=9-1", None), ("bytes=-", None),
])
def test_a_single_byte_range_is_honoured_and_others_are_ignored(header, span):
    assert byte_range(header, 1000) == span


@pytest.mark.parametrize(("header", "size"), [("bytes=1000-", 1000), ("bytes=5000-6000", 1000),
                                              ("bytes=-0", 1000), ("bytes=0-", 0)])
def test_a_range_beyond_the_end_is_unsatisfiable(header, size):
    with pytest.raises(ModelStoreError) as refused:
        byte_range(header, size)
    assert refused.value.status == 416


# ---- over HTTP ----------------------------------------------------------------------------------
def test_the_receiver_serves_the_catalog(server, store_dir):
    status, headers, body = fetch(server, "/v1/models")
    assert (status, headers["content-type"]) == (200, "application/json")
    assert json.loads(body) == ModelStore(store_dir).catalog()


def test_a_file_is_served_whole_or_from_one_range_with_its_sha256_as_etag(server, store_dir,
                                                                         caplog):
    data = (store_dir / NEWER / "model.bin").read_bytes()
    path = f"/v1/models/{NEWER}/model.bin"
    with caplog.at_level("INFO", logger="fleetgw.central"):
        status, headers, body = fetch(server, path)
        assert (status, body, headers["content-length"]) == (200, data, str(len(data)))
        assert headers["etag"] == f'"{sha256_file(store_dir / NEWER / "model.bin")}"'
        status, headers, body = fetch(server, path, {"Range": "bytes=1000-"})
        assert (status, body) == (206, data[1000:])
        assert headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        status, headers, body = fetch(server, path, {"Range": "bytes=10-19"})
        assert (status, body, headers["content-length"]) == (206, data[10:20], "10")
        status, headers, body = fetch(server, path, {"Range": f"bytes={len(data)}-"})
        assert (status, headers["content-range"]) == (416, f"bytes */{len(data)}")
        assert "beyond the file" in json.loads(body)["reason"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all(f"path=/v1/models/{NEWER}/model.bin" in line
                                   for line in lines)
    assert f"status=200 result=ok bytes={len(data)}" in lines[0]
    assert "status=206 result=ok bytes=10 range=10-19" in lines[2]
    assert "status=416 result=refused" in lines[3]


TRAVERSALS = (
    "/v1/models/../secret.txt", f"/v1/models/{NEWER}/../../secret.txt",
    f"/v1/models/{NEWER}/..%2F..%2Fsecret.txt", "/v1/models/..%2F..%2Fsecret.txt/x",
    f"/v1/models/{NEWER}/link.bin", f"/v1/models/{NEWER}/.hidden", "/v1/models//secret.txt",
    f"/v1/models/{NEWER}/%2e%2e", "/v1/models/2027.1.1/secret.txt", f"/v1/models/{NEWER}",
    f"/v1/models/{NEWER}/", f"/v1/models/{NEWER}/notes/x", "/v1/models/", "/v1/modelsx",
    f"/v1/models/{NEWER}/model.bin/..", f"/v1/models/{NEWER}/model.bin?x=/../secret.txt",
)


def test_nothing_outside_the_catalog_is_served(server):
    for path in TRAVERSALS:
        status, _, body = fetch(server, path)
        assert status in (400, 404), path
        assert SECRET not in body and json.loads(body)["status"] == "refused", path


def test_a_receiver_without_a_store_answers_404_with_the_reason(chdb_backend, tmp_path):
    with running_receiver(chdb_backend, None, tmp_path / "devices") as server:
        for path in ("/v1/models", f"/v1/models/{NEWER}/model.bin"):
            status, _, body = fetch(server, path)
            assert status == 404
            assert "serves no models" in json.loads(body)["reason"]


# ---- the config and the command -----------------------------------------------------------------
def test_the_models_directory_is_taken_from_the_config_files_directory(tmp_path):
    assert load_central_config(REPO / "central" / "example.toml").models.directory == ""
    config = tmp_path / "central.toml"
    config.write_text('[models]\ndirectory = "published"\n')
    assert load_central_config(config).models.directory == str(tmp_path / "published")


def test_serve_offers_the_models_of_its_config(tmp_path, signed):
    shutil.copytree(signed, tmp_path / "published" / NEWER)
    config = tmp_path / "central.toml"
    config.write_text('[receiver]\nport = 0\n[backend]\npath = "store.chdb"\n'
                      '[models]\ndirectory = "published"\n')
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "central", "serve", "--config",
                             str(config)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()
        match = re.search(r"receiving on http://(127\.0\.0\.1):(\d+)/", first)
        assert match and f"models {tmp_path / 'published'}" in first, first
        conn = http.client.HTTPConnection(match.group(1), int(match.group(2)), timeout=30)
        conn.request("GET", "/v1/models")
        catalog = json.loads(conn.getresponse().read())
        conn.close()
        assert [v["version"] for v in catalog["versions"]] == [NEWER]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
