"""Field chaos drills: `fleetgw drill run FILE.toml`.

Where this sits: outside the gateway, on top of the fault-injection harness (tools/harness). A
drill file names a gateway config, an optional MQTT load, a timeline of faults and the
invariants of DESIGN.md to check. `spec` is the file's format, `loader` reads it and checks
it against the gateway it names, `timeline` expands its faults into steps; `runner` starts a
`Rig`, plays the timeline (`sockets` watches I9 meanwhile), finishes and gathers the
`evidence`; `checks` turns the evidence into pass/fail per invariant (pure functions);
`report` prints the result as text or JSON. The drills themselves live in drills/.
"""
