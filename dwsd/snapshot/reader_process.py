"""A reader process: the child's side of readers.ReaderProcesses.

    python -m dwsd.snapshot.reader_process <request socket fd> <reply pipe fd> <objects dir>

Requests come on a SOCK_SEQPACKET socket, one message a batch: an 8-byte batch number,
with the batch's open files attached (SCM_RIGHTS). Each file is read into a blob of the
objects directory (fileread.read_open_file), in order, and closed. The reply, on the
pipe, is one frame a batch: a 4-byte length, then the pickled `Reply`. The process ends
when the request socket reaches its end: its parent stopped it (its capture is over
and nothing keeps it for the next, or the workspace that kept it closed), or died.

It writes blob files only: the tree database is opened read-only and never touched.
It is started with SIGINT, SIGTERM and SIGHUP blocked (see readers._Child): it ends
when the parent closes the socket, or dies.
"""
from __future__ import annotations

import os
import pickle
import socket
import struct
import sys
from pathlib import Path
from typing import NamedTuple, Union

from dwsd.snapshot.fileread import ReadOutcome, read_open_file
from dwsd.store.ids import ObjectId
from dwsd.store.objects import ObjectStore

BATCH_HEADER = struct.Struct("!Q")
FRAME_HEADER = struct.Struct("!I")
MAX_BATCH_FILES = 64  # below SCM_MAX_FD (253): the files one request may carry


class Reply(NamedTuple):
    """The outcome of each file of batch `batch`, in order (an exception: the store
    failed, say it is full), and the blobs this batch published (id, length): the
    parent's write log takes them over, to count, make durable or roll back."""

    batch: int
    outcomes: list[Union[ReadOutcome, Exception]]
    published: list[tuple[ObjectId, int]]


def serve(requests: socket.socket, replies: int, objects: ObjectStore) -> None:
    """Answer batches until the request socket ends."""
    while True:
        header, fds, flags, _ = socket.recv_fds(requests, BATCH_HEADER.size,
                                                MAX_BATCH_FILES)
        if not header:
            for fd in fds:
                os.close(fd)
            return
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            for fd in fds:
                os.close(fd)
            raise RuntimeError("a request came truncated")
        (batch,) = BATCH_HEADER.unpack(header)
        log = objects.start_log()
        outcomes: list[Union[ReadOutcome, Exception]] = []
        for fd in fds:
            try:
                outcomes.append(read_open_file(objects, fd))
            except Exception as exc:  # StoreError: the parent's capture raises it
                outcomes.append(exc)
        published = [(oid, length) for (_, oid), length in log.written.items()]
        objects.forget_unsynced()  # the parent makes them durable; kept, this process
        # would otherwise hold the name of every blob it ever wrote
        frame = pickle.dumps(Reply(batch, outcomes, published), pickle.HIGHEST_PROTOCOL)
        _write_all(replies, FRAME_HEADER.pack(len(frame)) + frame)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main(argv: list[str]) -> int:
    request_fd, reply_fd, objects_dir = int(argv[1]), int(argv[2]), Path(argv[3])
    requests = socket.socket(fileno=request_fd)
    objects = ObjectStore(objects_dir, readonly=True)  # read-only: the tree database
    try:
        serve(requests, reply_fd, objects)
    except BrokenPipeError:  # the parent is gone: nobody wants the rest
        return 1
    finally:
        objects.close()
    return 0


if __name__ == "__main__":
    # Run from the module imported by its name, so `Reply` pickles as
    # dwsd.snapshot.reader_process.Reply, not __main__.Reply.
    from dwsd.snapshot import reader_process
    sys.exit(reader_process.main(sys.argv))
