"""The fault-injection harness: a gateway and a central receiver on loopback, and real faults.

Where this sits: outside the gateway, used by the tests and by `fleetgw drill run`. A `Rig`
starts a real `fleetgw run` and a real receiver in a temporary directory on free loopback ports,
with the uplink going through a `LinkProxy`; it injects faults (signals, faults inside actors,
power cuts, link faults, a full disk, a clock jump, a corrupt model install, malformed input)
and reads back what happened.
"""
