"""Command-line entry points: `dwsd` (the daemon) and `dwsctl` (its client)."""
