"""Model updates over the air: newer signed models from the receiver into the model registry.

Where this sits: beside the data path, on the uplink's link (step 6, the other way). The
receiver offers a catalog of signed model versions (`central.model_store`, ``GET /v1/models``:
each version's files with size and sha256). A `ModelUpdater` picks the newest version newer
than the registry's active one (and not installed already, so a rollback sticks), downloads its
files resumably in chunks paid from the link budget (lane P3 by default: after safety events
and metrics), checks each file against the catalog's sha256, and hands the directory to
`ModelRegistry.install`, which trusts nothing it downloaded — signature, hashes and the
self-test child decide — then activates it; the model runner notices by itself.

Driving it: call `ModelUpdater.step(now)` from a worker thread (everything blocks), again after
the returned `UpdateStep.wait_s`. One call does one thing: a catalog check when due, one chunk
(one HTTP request), or the install (seconds: a self-test child). `check`, `download` and
`install` are the same steps one at a time.

On disk: DOWNLOAD_DIR/<version>/<name>.part while a file arrives — its size is the resume
offset: each chunk is a ``Range: bytes=<offset>-<last>`` request, appended and fsynced — renamed
to <name> once its sha256 matches the catalog; ``.offer`` records which catalog entry the files
belong to, so parts of other bytes are never spliced together. The version's directory goes
after it was installed or refused. A refusal (sha256 mismatch, bad or untrusted signature,
failed self-test) is remembered in memory with the digest of the catalog entry: the same bytes
are not fetched again until the gateway restarts or the receiver offers other bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pycurl

from actors.durable import fsync_dir, write_atomic
from actors.model_runner.manifest import MANIFEST, VERSION_RE, sha256_file
from actors.model_runner.registry import ModelRegistry, RegistryError, version_key
from actors.uplink.client import DEFAULT_CONNECT_TIMEOUT_S, GetResult, get, new_handle, tls_files
from actors.uplink.link import LinkBudget

#: The receiver's catalog; a file is ``MODELS_PATH/<version>/<name>``.
MODELS_PATH = "/v1/models"
CATALOG_FORMAT = "fleetgw.models/1"
#: A file name the receiver may serve and a gateway may write: plain, no leading dot.
FILE_NAME_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,127}")
PART = ".part"
OFFER = ".offer"
DEFAULT_TOTAL_TIMEOUT_S = 300.0
DEFAULT_CHUNK_BYTES = 256 << 10
DEFAULT_CHECK_S = 3600.0
#: Seconds before trying again after a failure (no answer, 5xx, a file changed meanwhile).
DEFAULT_RETRY_S = 60.0
#: Seconds before asking again when the link class does not carry the lane at all.
LINK_CLOSED_WAIT_S = 60.0
#: A catalog larger than this is refused (it lists a few files per version).
MAX_CATALOG_BYTES = 1 << 20

# UpdateStep.action
IDLE = "idle"                # nothing to do before wait_s (no newer version, next check)
FOUND = "found"              # a newer version is offered: call again at once
DOWNLOADING = "downloading"  # chunks arrived, more to come: call again at once
DOWNLOADED = "downloaded"    # every file is in place and matches: call again to install
WAIT = "wait"                # the link budget (or link class) holds the next chunk
INSTALLED = "installed"      # installed and activated
REFUSED = "refused"          # refused for good (remembered); reason says why
FAILED = "failed"            # transient (link, receiver, disk): kept, retried after wait_s


class UpdateError(Exception):
    """A transient failure (no answer, an unexpected status, a catalog that cannot be read)."""


@attrs.frozen(slots=True)
class UpdateStep:
    """What one call did and when the next is useful: ``action`` (IDLE, FOUND, DOWNLOADING,
    DOWNLOADED, WAIT, INSTALLED, REFUSED, FAILED), the ``version`` concerned (None: none
    offered), ``wait_s`` (0: call again at once), ``reason`` for the log, ``nbytes`` received."""

    action: str
    version: str | None
    wait_s: float
    reason: str
    nbytes: int = 0


@attrs.frozen(slots=True)
class RemoteFile:
    """One file of an offered version, as the catalog describes it."""

    name: str
    size: int
    sha256: str


@attrs.frozen(slots=True)
class Offer:
    """A version in the catalog; ``digest`` (sha256 of its file list) names exactly its bytes."""

    version: str
    files: tuple[RemoteFile, ...]
    digest: str


def parse_catalog(data: Any) -> list[Offer]:
    """The well-formed versions of a catalog, in ascending version order. A version with a
    name that is not plain, a file name that could leave its directory, or a bad size or
    sha256 is left out (never written anywhere); UpdateError when it is no catalog at all."""
    if not isinstance(data, Mapping) or data.get("format") != CATALOG_FORMAT \
            or not isinstance(data.get("versions"), list):
        raise UpdateError(f"the receiver's catalog is not {CATALOG_FORMAT}")
    offers = []
    for entry in data["versions"]:
        try:
            version, files = entry["version"], entry["files"]
            remote = tuple(RemoteFile(name, int(f["size"]), str(f["sha256"]))
                           for name, f in sorted(files.items()))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version) or not remote \
                or not all(FILE_NAME_RE.fullmatch(f.name) and not f.name.endswith(PART)
                           and f.size >= 0 and re.fullmatch(r"[0-9a-f]{64}", f.sha256)
                           for f in remote):
            continue
        digest = hashlib.sha256(json.dumps([attrs.astuple(f) for f in remote]).encode())
        offers.append(Offer(version, remote, digest.hexdigest()))
    return sorted(offers, key=lambda o: version_key(o.version))


def _etag(value: str | None) -> str:
    return (value or "").removeprefix("W/").strip('"')


class ModelUpdater:
    """Finds, fetches and installs newer models; one `step` at a time. Not thread-safe: one
    worker thread calls it. ``link_class`` may be changed between steps when the link does."""

    def __init__(self, base_url: str, registry: ModelRegistry,
                 download_dir: str | os.PathLike[str], *, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_ca: str | None = None,
                 budget: LinkBudget | None = None, link_class: str = "", lane: str = "P3",
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 total_timeout_s: float = DEFAULT_TOTAL_TIMEOUT_S,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, check_s: float = DEFAULT_CHECK_S,
                 retry_s: float = DEFAULT_RETRY_S) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0 (got {chunk_bytes})")
        self.base_url = base_url.rstrip("/")
        self.registry = registry
        self.download_dir = Path(download_dir)
        self.budget, self.link_class, self.lane = budget, link_class, lane
        self.chunk_bytes, self.check_s, self.retry_s = chunk_bytes, check_s, retry_s
        self._tls = tls_files(tls_cert, tls_key, tls_ca)
        self._timeouts_ms = (int(connect_timeout_s * 1000), int(total_timeout_s * 1000))
        self._curl: pycurl.Curl | None = None
        #: The version being fetched (None: none newer, or not checked yet).
        self.offer: Offer | None = None
        #: (version, digest) -> why it was refused; never fetched again while remembered.
        self.refused: dict[tuple[str, str], str] = {}
        #: Body bytes received (catalogs and chunks): exactly what was spent from the budget.
        self.received_bytes = 0
        self._verified: set[str] = set()  # files of the offer in place and matching
        self._next_check = float("-inf")

    def __repr__(self) -> str:  # paths only, never key material
        return f"ModelUpdater({self.base_url!r}, mtls={self._tls is not None})"

    # ---- the one entry point --------------------------------------------------------------
    def step(self, now: float) -> UpdateStep:
        """Advance by one thing: install a complete download, fetch one chunk, or check the
        catalog when ``check_s`` has passed since the last check (``now``: monotonic s)."""
        try:
            return self._step(now)
        except OSError as exc:  # the download directory (full? removed?): check again later;
            # the parts stay and are resumed when the same bytes are offered
            version = self.offer.version if self.offer else None
            self.offer, self._verified = None, set()
            self._next_check = now + self.retry_s
            return UpdateStep(FAILED, version, self.retry_s, f"{self.download_dir}: {exc}")

    def _step(self, now: float) -> UpdateStep:
        if self.offer is None:
            if now < self._next_check:
                return UpdateStep(IDLE, None, self._next_check - now, "next catalog check")
            if closed := self._closed():
                return UpdateStep(WAIT, None, LINK_CLOSED_WAIT_S, closed)
            self._next_check = now + self.check_s
            try:
                version = self.check()
            except UpdateError as exc:
                self._next_check = now + min(self.retry_s, self.check_s)
                return UpdateStep(FAILED, None, self._next_check - now, str(exc))
            if version is None:
                return UpdateStep(IDLE, None, self.check_s,
                                  f"no model newer than {self.registry.active_version()}")
            return UpdateStep(FOUND, version, 0.0, f"{self.base_url}{MODELS_PATH} offers "
                                                   f"{version}")
        if self._missing() is None:
            return self.install(self.offer.version)
        return self.download(self.offer.version, max_chunks=1)

    # ---- one thing at a time --------------------------------------------------------------
    def check(self) -> str | None:
        """Fetch the catalog; the newest version newer than the active one, not installed
        and not refused, becomes the offer (returned), or None. Raises UpdateError."""
        closed = self._closed()
        if closed:
            raise UpdateError(closed)
        fetched = self._get(MODELS_PATH, [], MAX_CATALOG_BYTES)
        if fetched.status != 200:
            raise UpdateError(f"GET {MODELS_PATH}: {fetched.error or fetched.status}")
        try:
            offers = parse_catalog(json.loads(fetched.body))
        except ValueError as exc:
            raise UpdateError(f"GET {MODELS_PATH}: not JSON ({exc})") from None
        active, installed = self.registry.active_version(), set(self.registry.installed())
        newer = [o for o in offers if o.version not in installed
                 and (o.version, o.digest) not in self.refused
                 and (active is None or version_key(o.version) > version_key(active))]
        self._start(newer[-1] if newer else None)
        return self.offer.version if self.offer else None

    def download(self, version: str, max_chunks: int | None = None) -> UpdateStep:
        """Fetch the offer's files, chunk by chunk (at most ``max_chunks``), until all are in
        place (DOWNLOADED), the budget says wait (WAIT), or a failure (FAILED, REFUSED)."""
        offer = self._offer(version)
        nbytes, chunks = 0, 0
        while (entry := self._missing()) is not None:
            if max_chunks is not None and chunks >= max_chunks:
                return UpdateStep(DOWNLOADING, version, 0.0, f"fetching {entry.name}", nbytes)
            step = self._chunk(offer, entry)
            nbytes += step.nbytes
            if step.action != DOWNLOADING:
                return attrs.evolve(step, nbytes=nbytes)
            chunks += 1
        return UpdateStep(DOWNLOADED, version, 0.0,
                          f"{len(offer.files)} files match the catalog", nbytes)

    def install(self, version: str) -> UpdateStep:
        """Install the downloaded ``version`` into the registry and activate it; a refusal
        is remembered. The download goes either way."""
        offer = self._offer(version)
        if (entry := self._missing()) is not None:
            raise ValueError(f"{version} is not downloaded yet ({entry.name} is missing)")
        path = self.download_dir / version
        try:
            signed = json.loads((path / MANIFEST).read_bytes()).get("version")
        except (OSError, ValueError, AttributeError):
            signed = None
        if signed != version:
            return self._refuse(offer, f"the receiver offers {version}, its {MANIFEST} says "
                                       f"{signed!r}")
        previous = self.registry.active_version()
        if previous is not None and version_key(previous) >= version_key(version):
            self._drop()  # activated by hand meanwhile: never downgrade
            return UpdateStep(IDLE, version, 0.0, f"{previous} was activated meanwhile; "
                                                  f"{version} is not newer: not installed")
        try:
            self.registry.install(path)
            self.registry.activate(version)
        except RegistryError as exc:
            return self._refuse(offer, str(exc))
        except OSError as exc:
            return UpdateStep(FAILED, version, self.retry_s, f"installing {path}: {exc}")
        self._drop()
        return UpdateStep(INSTALLED, version, 0.0, f"{version} is active (was {previous})")

    def close(self) -> None:
        """Drop the connection (the next request opens a new one)."""
        if self._curl is not None:
            self._curl.close()
            self._curl = None

    # ---- internals ----------------------------------------------------------------------
    def _offer(self, version: str) -> Offer:
        if self.offer is None or self.offer.version != version:
            raise ValueError(f"{version} is not on offer (call check first; offered: "
                             f"{self.offer.version if self.offer else 'nothing'})")
        return self.offer

    def _start(self, offer: Offer | None) -> None:
        """Make ``offer`` current; downloads of anything else go, and so do its parts when
        they were of other bytes."""
        self.offer, self._verified = offer, set()
        if self.download_dir.is_dir():
            for stale in self.download_dir.iterdir():
                if offer is None or stale.name != offer.version:
                    _remove(stale)
        if offer is None:
            return
        path = self.download_dir / offer.version
        try:
            same = (path / OFFER).read_text() == offer.digest
        except OSError:
            same = False
        if not same:
            _remove(path)
            path.mkdir(parents=True)
            fsync_dir(path.parent)
            write_atomic(path / OFFER, offer.digest.encode())

    def _drop(self) -> None:
        assert self.offer is not None
        _remove(self.download_dir / self.offer.version)
        self.offer, self._verified = None, set()

    def _refuse(self, offer: Offer, reason: str) -> UpdateStep:
        self.refused[(offer.version, offer.digest)] = reason
        self._drop()
        return UpdateStep(REFUSED, offer.version, 0.0, reason)

    def _missing(self) -> RemoteFile | None:
        """The offer's first file not yet in place (a complete file is checked once)."""
        assert self.offer is not None
        path = self.download_dir / self.offer.version
        for entry in self.offer.files:
            if entry.name in self._verified:
                continue
            final = path / entry.name
            if final.is_file() and sha256_file(final) == entry.sha256:
                self._verified.add(entry.name)
                continue
            final.unlink(missing_ok=True)
            return entry
        return None

    def _closed(self) -> str | None:
        return None if self.budget is None else self.budget.allowed(self.link_class, self.lane)

    def _chunk(self, offer: Offer, entry: RemoteFile) -> UpdateStep:
        """One request for the next bytes of ``entry`` (or its check, once all arrived)."""
        part = self.download_dir / offer.version / f"{entry.name}{PART}"
        offset = part.stat().st_size if part.exists() else 0
        if offset > entry.size:
            part.unlink()
            offset = 0
        if offset == entry.size:  # complete (an empty file: nothing to fetch)
            part.touch()
            return self._finish(offer, entry, part)
        n = min(self.chunk_bytes, entry.size - offset)
        if closed := self._closed():
            return UpdateStep(WAIT, offer.version, LINK_CLOSED_WAIT_S, closed)
        if self.budget is not None and \
                (wait_s := self.budget.wait_s(self.link_class, self.lane, n)) > 0:
            return UpdateStep(WAIT, offer.version, wait_s, f"{self.lane} link budget")
        url_path = f"{MODELS_PATH}/{offer.version}/{entry.name}"
        fetched = self._get(url_path, [f"Range: bytes={offset}-{offset + n - 1}"], n)
        got, etag = len(fetched.body), fetched.headers.get("etag")
        # the receiver's file must still be the catalog's, and these bytes the ones asked for
        if fetched.status in (404, 416) or (fetched.status in (200, 206) and etag is not None
                                            and _etag(etag) != entry.sha256):
            self._drop()
            self._next_check = float("-inf")
            return UpdateStep(FAILED, offer.version, self.retry_s,
                              f"GET {url_path}: status {fetched.status}, ETag {etag}: the "
                              "receiver no longer serves the catalog's bytes; checking the "
                              "catalog again", got)
        whole = fetched.status == 200 and offset == 0 and got == entry.size
        expected = f"bytes {offset}-{offset + n - 1}/{entry.size}"
        if not whole and (fetched.status != 206 or got != n
                          or fetched.headers.get("content-range") != expected):
            why = fetched.error or f"status {fetched.status}, {got} bytes"
            return UpdateStep(FAILED, offer.version, self.retry_s,
                              f"GET {url_path} ({expected}): {why}", got)
        with open(part, "ab") as fh:
            fh.write(fetched.body)
            fh.flush()
            os.fsync(fh.fileno())
        if offset == 0:
            fsync_dir(part.parent)
        if offset + n == entry.size:
            return attrs.evolve(self._finish(offer, entry, part), nbytes=got)
        return UpdateStep(DOWNLOADING, offer.version, 0.0, f"{entry.name}: {offset + n} of "
                                                           f"{entry.size} bytes", got)

    def _finish(self, offer: Offer, entry: RemoteFile, part: Path) -> UpdateStep:
        """A complete part: in place when it matches the catalog, else the version is
        refused (the receiver serves other bytes than it lists)."""
        actual = sha256_file(part)
        if actual != entry.sha256:
            return self._refuse(offer, f"{entry.name} of {offer.version} from "
                                       f"{self.base_url}: sha256 {actual[:16]}… does not "
                                       f"match the catalog's {entry.sha256[:16]}…")
        os.rename(part, part.with_name(entry.name))
        fsync_dir(part.parent)
        self._verified.add(entry.name)
        return UpdateStep(DOWNLOADING, offer.version, 0.0, f"{entry.name} complete")

    def _get(self, path: str, headers: list[str], limit: int) -> GetResult:
        """GET ``path`` (at most ``limit`` body bytes); what arrives is spent from the budget."""
        if self._curl is None:
            self._curl = new_handle(self._tls, *self._timeouts_ms)
        result = get(self._curl, self.base_url + path, headers, limit)
        if result.status is None:
            self.close()
        self.received_bytes += len(result.body)
        if self.budget is not None and result.body:
            self.budget.spend(self.link_class, self.lane, len(result.body))
        return result


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
