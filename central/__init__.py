"""The central side: where signed batches from the gateways' uplinks land.

Where this sits on the data path: after step 6, off the vehicle. A gateway's uplink posts a
signed, compressed batch (`actors.uplink.envelope`) to the receiver (`receiver`, served by
``fleetgw central serve``); the receiver checks the device's key (`devices`), the signature and
the body (`actors.uplink.wire`), routes each record to its table by kind (`schema`) and inserts
the batch through a narrow backend contract (`backend`: embedded chdb by default, a ClickHouse
server or cluster over HTTP in production) with a dedup token made from the batch's identity,
so a replay is stored once (I5). The reply's ``acked_seq_hi`` lets the gateway delete what
central now holds. Settings live in `config` (see ``central/example.toml``).
"""
