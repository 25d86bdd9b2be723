"""Issue 3's figures: restore (full, one subdirectory, after a 1% change) against cp -a, restic restore and borg extract."""
from __future__ import annotations

from harness import Bench, Result, step  # noqa: F401
