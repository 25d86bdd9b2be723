"""Issue 5's figures: the running daemon (idle CPU and RSS, write-to-visible delay, checkpoint cost, manual snapshot cost against tree size)."""
from __future__ import annotations

from harness import Bench, Result, step  # noqa: F401
