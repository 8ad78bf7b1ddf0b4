"""`fleetgw provision ca|server|device`: the fleet's keys and certificates from the shell.

Where this sits: beside the data path, run by an operator before a gateway first syncs; a thin
layer over tools/provisioning.py (which documents the files written). `ca` makes the fleet CA,
`server` the central receiver's TLS certificate, `device` a device's Ed25519 key — its batch
signing key and TLS client key — with its client certificate, registering its public key in
the receiver's devices directory when given. Output names the files written, certificate
fingerprints and the device's public key: never private key material.
Exit status: 0 done, 1 refused (something would be overwritten, a key file is unusable),
2 bad usage or input; a failure is one line on stderr, ``fleetgw provision ACTION: ...``.
"""

from __future__ import annotations

import argparse
import sys

from actors.uplink.keys import KeyFileError
from tools.provisioning import (
    DEFAULT_HOSTS,
    Issued,
    ProvisionError,
    create_ca,
    create_device,
    create_server,
)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2


def _error(action: str, message: object, status: int) -> int:
    print(f"fleetgw provision {action}: {message}", file=sys.stderr)
    return status


def _certificate_line(issued: Issued, what: str) -> str:
    return (f"wrote {what} {issued.cert} (CN {issued.common_name}, valid until "
            f"{issued.not_after:%Y-%m-%d}, sha256 {issued.fingerprint})")


def ca_command(directory: str, force: bool) -> int:
    issued = create_ca(directory, force=force)
    print(f"wrote CA key {issued.key} (mode 0600: keep it offline; it signs every "
          "certificate of the fleet)")
    print(_certificate_line(issued, "CA certificate"))
    print(f"next: `fleetgw provision server --ca {directory} --out DIR` and `fleetgw provision "
          f"device --id ID --ca {directory} --out DIR`")
    return EXIT_OK


def server_command(ca_dir: str, out_dir: str, hosts: list[str] | None, force: bool) -> int:
    issued = create_server(ca_dir, out_dir, tuple(hosts) if hosts else DEFAULT_HOSTS,
                           force=force)
    print(f"wrote receiver key {issued.key} (mode 0600)")
    print(_certificate_line(issued, "receiver certificate"))
    print(f"wrote CA certificate {issued.ca_copy}")
    print(f"receiver config: [receiver] tls_cert = \"{issued.cert}\", tls_key = "
          f"\"{issued.key}\", tls_client_ca = \"{issued.ca_copy}\"")
    return EXIT_OK


def device_command(device_id: str, ca_dir: str, out_dir: str, devices_dir: str | None,
                   replace: bool) -> int:
    issued = create_device(ca_dir, out_dir, device_id, devices_dir, replace=replace)
    print(f"wrote device key {issued.key} (mode 0600; signs {device_id}'s batches and is the "
          "key of its client certificate)")
    print(_certificate_line(issued, "client certificate"))
    print(f"wrote CA certificate {issued.ca_copy}")
    print(f"public key: {issued.public_hex}")
    if issued.registered is not None:
        print(f"registered {device_id} with the receiver: {issued.registered}")
    else:
        print(f"not registered: on the receiver, put the public key line into "
              f"DEVICES_DIR/{device_id}.pub (or run this with --devices-dir there)")
    return EXIT_OK


def provision_command(args: argparse.Namespace) -> int:
    """Run ``fleetgw provision ACTION`` as parsed by tools/cli.py."""
    action = args.provision_command
    try:
        if action == "ca":
            return ca_command(args.dir, args.force)
        if action == "server":
            return server_command(args.ca, args.out, args.host, args.force)
        return device_command(args.id, args.ca, args.out, args.devices_dir, args.replace)
    except ProvisionError as exc:
        return _error(action, exc, EXIT_BAD_INPUT if exc.bad_input else EXIT_REFUSED)
    except KeyFileError as exc:
        return _error(action, exc, EXIT_REFUSED)
    except OSError as exc:
        return _error(action, exc, EXIT_REFUSED)
