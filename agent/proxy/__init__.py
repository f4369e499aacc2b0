"""The asyncio data plane: capture listeners (15001/15006/15008), tunnel pool and byte pump.

`dataplane` (the facade the node process runs: listeners, snapshot swaps, drain, config dump),
`outbound` / `inbound` (what happens to each captured connection), `pool` (pooled outbound HBONE
connections), `hbone_driver` (agent.hbone's sans-IO connections over asyncio TLS transports),
`relay` (the byte pump joining two connection ends), `sessions` (metrics, access log and policy
re-checks of live connections), `credentials` (the certificate seam and TLS context cache),
`sockets` (transparent listeners and marked upstream sockets), `tasks` (owned background tasks),
`config` (settings).
"""
