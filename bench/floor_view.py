"""The floor of a pyfuse3 view on this machine: a server that holds a copy of a
directory tree's metadata in memory and does nothing for a request but reply.

    floor_view.py SOURCE MOUNTPOINT     (serves until unmounted; root)

It answers what dwsd's view needs for a `scandir` + `lstat` walk (lookup, getattr,
opendir, readdir, releasedir) with attributes built once at start, with the same mount
options and timeouts as `dwsd mount`. A walk through it costs what pyfuse3, trio, the
kernel and the round trips cost, and nothing of dwsd's: bench/floor_walk.sh puts it
beside a walk of the source and of dwsd's view, so the share of the view's time that
is dwsd's own work is measured, not guessed.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Sequence

import pyfuse3
import trio

from dwsd.fuse.mount import mount_options
from dwsd.fuse.ops import SNAPSHOT_TIMEOUT, fuse_attributes

ROOT = pyfuse3.ROOT_INODE


class FloorView(pyfuse3.Operations):
    """A copy of `source`'s names and attributes (hard links count as separate files)."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.listings: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self._next = ROOT + 1
        self.attrs[ROOT] = self._attributes(os.lstat(source), ROOT)
        pending = [(os.fsencode(source), ROOT)]
        while pending:
            path, inode = pending.pop()
            listing = self.listings[inode] = []
            for name in sorted(os.listdir(path)):
                child = os.path.join(path, name)
                st = os.lstat(child)
                attrs = self.attrs[self._next] = self._attributes(st, self._next)
                listing.append((name, attrs))
                if stat.S_ISDIR(st.st_mode):
                    pending.append((child, self._next))
                self._next += 1

    @staticmethod
    def _attributes(st: os.stat_result, inode: int) -> pyfuse3.EntryAttributes:
        return fuse_attributes(inode, st.st_mode, 1, st.st_uid, st.st_gid, st.st_rdev,
                               st.st_size, st.st_mtime_ns, SNAPSHOT_TIMEOUT)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self.attrs[inode]

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        for entry_name, attrs in self.listings.get(parent_inode, ()):
            if entry_name == name:
                return attrs
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.listings[fh]
        for i in range(start_id, len(listing)):
            name, attrs = listing[i]
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass


def main(argv: list[str]) -> None:
    source, mountpoint = argv
    pyfuse3.init(FloorView(source), mountpoint, mount_options(allow_other=False))
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main(sys.argv[1:])
