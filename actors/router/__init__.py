"""The router: the policy engine that gives every journal record its lane.

Where this sits on the data path (DESIGN.md step 4): a journal consumer with a durable cursor.
It reads records after its cursor, matches each against the routing policy (`config.policy`:
ordered rules, first match wins, a default lane), and assigns a lane — P1 safety (synced as soon
as any link exists, retried until acknowledged), P2 navigation (batched, deduplicated), P3
metrics (aggregated, compressed) or EPHEMERAL (kept locally for a TTL, never synced). Aggregates
of P3 windows go back to the journal as new records, committed together with the cursor and the
router's state (I4); the lanes decide what eviction may take first (I7).

- `predicates`: the `when` / `sample.while` condition language: parser, AST, `Predicate`
- `engine`: `PolicyEngine.match(record) -> Decision` and `explain` (stateless)
- `sampling`: `Sampler` (one record every N s while a condition holds), per stream
- `dedup`: `Deduplicator` (P2: drop repeats and records that barely moved), per stream
- `aggregate`: `Aggregator` (P3: tumbling windows, exact statistics) and `Aggregate`
- `router`: `Router`, the four steps in order, with one JSON-able state to persist
- `verdict`: `Verdict` (keep/drop, reason code), `StreamKey`, the state version

This package imports nothing eagerly: `config.policy` imports `predicates` from here, and the
engine imports `config.policy`.
"""
