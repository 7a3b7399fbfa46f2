"""Open file handles: per-open write buffers with open-to-close consistency."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..fs.changes import Who

WRITE_MODES = os.O_WRONLY | os.O_RDWR


@dataclass(eq=False)
class Handle:
    fh: int
    ino: int
    kind: str                      # "state" (durable), "runtime", "scratch"
    agent: str = ""
    name: str = ""
    node: object = None            # ScratchNode for scratch handles
    flags: int = 0
    who: Who = Who()
    snapshot: bytes = b""          # committed content as of open (or last commit by us)
    buffer: bytearray | None = None
    dirty: bool = False
    created: bool = False          # this handle created the (not yet committed) file
    last_error: object = None      # FsError of the last failed commit attempt

    @property
    def writable(self) -> bool:
        return bool(self.flags & WRITE_MODES)

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)

    def content(self) -> bytes | bytearray:
        return self.buffer if self.buffer is not None else self.snapshot

    def ensure_buffer(self) -> bytearray:
        if self.buffer is None:
            self.buffer = bytearray(self.snapshot)
        return self.buffer
