"""Open file handles: per-open write buffers with open-to-close consistency.

A state-file handle reads the version that was current when it was opened
(``snapshot``, shared with every other reader of that version) and writes into a
private ``buffer`` that exists only once it writes. ``gen`` counts writes, so a flush
can tell whether the buffer changed while it waited for its commit. ``fid`` is the
identity of the file it opened (or created): its writes go to that file wherever it
has been renamed, and nowhere once it has been unlinked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .changes import Who

WRITE_MODES = os.O_WRONLY | os.O_RDWR


@dataclass(eq=False)
class Handle:
    fh: int
    ino: int
    kind: str                      # "state" (durable), "runtime", "scratch", "history"
    agent: str = ""
    name: str = ""
    node: object = None            # ScratchNode for scratch handles
    flags: int = 0
    who: Who = Who()
    snapshot: bytes = b""          # committed content as of open (or of our last commit)
    blob: object = None            # the blob id behind ``snapshot`` (shared reader cache)
    buffer: bytearray | None = None
    dirty: bool = False
    gen: int = 0                   # write counter
    last_write: int = 0            # namespace-wide clock of this handle's latest write
    created: bool = False          # this handle created the (not yet committed) file
    fid: int | None = None         # identity of the durable file this handle is bound to
    rtfile: object = None          # the RuntimeFile this handle opened (runtime handles)
    orphan: bool = False           # the file lost its name: writes go nowhere (as on ext4)
    last_error: object = None      # FsError of the last failed commit attempt
    times: dict | None = None      # mtime_ns/atime_ns set through this descriptor, committed at close

    @property
    def writable(self) -> bool:
        return bool(self.flags & WRITE_MODES)

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)

    def content(self) -> bytes | bytearray:
        return self.buffer if self.buffer is not None else self.snapshot
