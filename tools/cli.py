"""The `fleetgw` command line."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("fleetgw: not yet", file=sys.stderr)
    return 2
