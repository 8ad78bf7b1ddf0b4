"""mTLS end to end with provisioned credentials, all real: the receiver (`ReceiverServer`,
HTTPS on loopback, embedded chdb) with the certificate `provision server` made, the uplink's
pycurl client (`UplinkClient`) with the certificate and key `provision device` made, and a
batch signed with that same key read back by `load_signing_key`. Ed25519 throughout: the
handshakes below are the measurement that Python's ssl and libcurl both do Ed25519 TLS.

A client without a certificate, or with one from another CA, gets no HTTP answer and nothing
is stored — the same batch then arrives as new ("ok", not "duplicate") over a good
connection, so it was the handshake that refused it; a client that does not trust the
receiver's CA stops at verification."""

from __future__ import annotations

import pytest

pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")
pycurl = pytest.importorskip("pycurl")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402

from actors.uplink.client import PostResult, UplinkClient  # noqa: E402
from actors.uplink.keys import load_signing_key  # noqa: E402
from central.devices import DeviceRegistry  # noqa: E402
from tests.central import test_receiver as receiver_tests  # noqa: E402
from tests.central.test_receiver import make_batch, nothing_stored, post, table_counts  # noqa: E402
from tests.provision.conftest import DEVICE, Fleet  # noqa: E402
from tools.provisioning import create_device  # noqa: E402

#: The receiver tests' fixtures: ``backend`` (embedded chdb in tmp_path) and ``serve`` (a
#: receiver on a free loopback port, stopped after the test; it asks for ``registry``).
backend, serve = receiver_tests.backend, receiver_tests.serve

#: libcurl: CURLE_PEER_FAILED_VERIFICATION.
CURL_PEER_NOT_VERIFIED = 60


@pytest.fixture
def registry(fleet) -> DeviceRegistry:
    """The receiver's registry: the one `provision device --devices-dir` wrote to (this
    overrides the fixture `serve` asks for)."""
    return DeviceRegistry(fleet.devices_dir)


@pytest.fixture
def receiver(serve, fleet):
    return serve(tls_cert=str(fleet.receiver.cert), tls_key=str(fleet.receiver.key),
                 tls_client_ca=str(fleet.receiver.ca_copy))


def uplink(url: str, device, ca=None) -> UplinkClient:
    """The gateway's client with a provisioned device's certificate and key."""
    return UplinkClient(url, tls_cert=str(device.cert), tls_key=str(device.key),
                        tls_ca=str(ca or device.ca_copy), connect_timeout_s=10)


def post_once(client: UplinkClient, batch) -> PostResult:
    try:
        return client.post(batch)
    finally:
        client.close()


def test_a_provisioned_device_posts_a_batch_over_ed25519_mtls_and_it_is_stored(
        receiver, fleet, backend, caplog):
    for issued in (fleet.receiver, fleet.device):
        cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
        assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    assert receiver.url.startswith("https://127.0.0.1:")
    batch = make_batch(range(1, 21), key=load_signing_key(fleet.device.key), device=DEVICE)
    with caplog.at_level("INFO", logger="fleetgw.central"):
        result = post_once(uplink(receiver.url, fleet.device), batch)
    assert (result.status, result.error) == (200, None)
    assert result.body == {"status": "ok", "device_id": DEVICE, "lane": "P2",
                           "acked_seq_hi": 20, "watermark": 20}
    assert f"cert={DEVICE}" in caplog.records[-1].getMessage()  # the verified client's CN
    assert table_counts(backend)["batches"] == (1,)
    # By name too: the certificate's DNS name "localhost" is verified like its IP address.
    port = receiver.server_address[1]
    again = post_once(uplink(f"https://localhost:{port}", fleet.device),
                      make_batch(range(21, 31), key=load_signing_key(fleet.device.key),
                                 device=DEVICE))
    assert (again.status, again.body["status"]) == (200, "ok")


def _no_certificate(url: str, fleet: Fleet, batch) -> tuple[int | None, str]:
    """A client that trusts the receiver but has no certificate (pycurl: CAINFO only)."""
    try:
        status, _ = post(url, batch, tls={"CAINFO": str(fleet.device.ca_copy)})
    except pycurl.error as exc:
        return None, f"curl error {exc.args[0]}: {exc.args[1]}"
    return status, ""


def _rogue_certificate(url: str, fleet: Fleet, batch) -> tuple[int | None, str]:
    """A certificate for the same device id and CA name, but from another CA's key."""
    result = post_once(uplink(url, fleet.rogue_device, ca=fleet.device.ca_copy), batch)
    return result.status, result.error or ""


def _distrusting_client(url: str, fleet: Fleet, batch) -> tuple[int | None, str]:
    """A good certificate, but the client trusts another CA to have signed the receiver's."""
    result = post_once(uplink(url, fleet.device, ca=fleet.rogue_ca.cert), batch)
    return result.status, result.error or ""


REFUSED = {"no client certificate": _no_certificate,
           "certificate from another CA": _rogue_certificate,
           "receiver not trusted": _distrusting_client}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_connection_the_handshake_refuses_gets_no_answer_and_stores_nothing(
        case, receiver, fleet, backend):
    batch = make_batch(range(1, 21), key=load_signing_key(fleet.device.key), device=DEVICE)
    status, error = REFUSED[case](receiver.url, fleet, batch)
    assert status is None and error.startswith("curl error "), (status, error)
    if case == "receiver not trusted":
        assert error.startswith(f"curl error {CURL_PEER_NOT_VERIFIED}:"), error
    assert nothing_stored(backend)
    # The batch itself was fine: over the provisioned connection it is new, not a duplicate.
    result = post_once(uplink(receiver.url, fleet.device), batch)
    assert (result.status, result.body["status"]) == (200, "ok")


def test_a_re_keyed_device_old_key_passes_tls_but_its_batches_are_refused(
        receiver, fleet, backend):
    old_key = load_signing_key(fleet.device.key)
    old = fleet.device.key.parent
    renewed = create_device(fleet.ca.key.parent, old.parent / "gateway-2", DEVICE,
                            fleet.devices_dir, replace=True)
    # The old certificate still chains to the CA (no revocation list): the registry decides.
    stale = post_once(uplink(receiver.url, fleet.device),
                      make_batch(range(1, 11), key=old_key, device=DEVICE))
    assert stale.status == 401 and stale.body["status"] == "refused"
    assert nothing_stored(backend)
    fresh = post_once(uplink(receiver.url, renewed),
                      make_batch(range(1, 11), key=load_signing_key(renewed.key),
                                 device=DEVICE))
    assert (fresh.status, fresh.body["status"]) == (200, "ok")
