"""The restore journal: `<store>/journal/restore.json` exists exactly while an in-place
restore is unfinished. It records what was asked, so the restore can be completed after a
crash (restore is idempotent: re-planning from the live files converges on the target)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from dwsd.errors import StoreError
from dwsd.store.fsutil import atomic_write, fsync_dir

_NAME = "restore.json"


@dataclass(frozen=True)
class RestoreJournal:
    snapshot: str                       # the snapshot id being restored
    resources: list[str]
    paths: dict[str, list[str]] | None  # resource -> paths (surrogate-escaped), or all
    pre_restore: str | None             # the undo snapshot's id


def write_journal(journal_dir: Path, entry: RestoreJournal) -> None:
    atomic_write(journal_dir / _NAME, json.dumps(asdict(entry)).encode())


def read_journal(journal_dir: Path) -> RestoreJournal | None:
    """The unfinished restore, or None. Raises StoreError when the journal is unreadable
    (it is written atomically, so only outside damage does that)."""
    path = journal_dir / _NAME
    try:
        return RestoreJournal(**json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise StoreError(f"restore journal {path} cannot be read: {exc}") from exc


def clear_journal(journal_dir: Path) -> None:
    try:
        os.unlink(journal_dir / _NAME)
    except FileNotFoundError:
        return
    fsync_dir(journal_dir)
