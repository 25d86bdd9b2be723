"""Issue 4's figures: the FUSE view (root listing, metadata walk, cold and warm reads, RSS) beside restic mount and borg mount."""
from __future__ import annotations

from harness import Bench, Result, step  # noqa: F401
