"""The control channel: `protocol` (JSON-lines framing), `encode` (results as JSON
values), `ops` (the operations, over the scheduler), `server` (the unix-socket server)
and `client` (the blocking client that `dwsctl` and `dwsd.api` use)."""
