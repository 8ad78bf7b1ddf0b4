"""A provisioned fleet in ``tmp_path``, made the way an operator makes one (tools.provisioning):
the fleet CA, the receiver's certificate, one device registered with the receiver; and a rogue
CA (same name, another key) that issued a certificate for the same device id."""

from __future__ import annotations

import attrs
import pytest

from tools.provisioning import Issued, create_ca, create_device, create_server

DEVICE = "veh-001"


@attrs.frozen
class Fleet:
    ca: Issued
    receiver: Issued
    device: Issued
    devices_dir: str
    rogue_ca: Issued
    rogue_device: Issued


@pytest.fixture
def fleet(tmp_path) -> Fleet:
    pki = tmp_path / "pki"
    ca = create_ca(pki / "ca")
    receiver = create_server(pki / "ca", pki / "receiver")
    devices_dir = str(tmp_path / "receiver-devices")
    device = create_device(pki / "ca", pki / "gateway", DEVICE, devices_dir)
    rogue_ca = create_ca(pki / "rogue-ca")  # the same name: only its key differs
    rogue_device = create_device(pki / "rogue-ca", pki / "rogue", DEVICE)
    return Fleet(ca, receiver, device, devices_dir, rogue_ca, rogue_device)
