"""RAM-only scratch files and directories inside agent directories (tmpfs-like).

Editors' swap files, ``sed -i`` temp files and ``*.tmp`` files live here: never
versioned, capped in total size (ENOSPC past the cap), gone at unmount.
"""

from __future__ import annotations

import errno
import stat
import time
from dataclasses import dataclass, field

from .errors import FsError


@dataclass(eq=False)
class ScratchNode:
    ino: int
    mode: int             # full st_mode, including the file type bits
    uid: int
    gid: int
    data: bytearray = field(default_factory=bytearray)
    children: dict = field(default_factory=dict)   # name -> ScratchNode, for directories
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    nlink: int = 1
    xattrs: dict = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def touch(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()


class ScratchSpace:
    """Accounting for all scratch bytes of one mount."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def new_node(self, ino: int, mode: int, uid: int, gid: int) -> ScratchNode:
        now = time.time_ns()
        return ScratchNode(ino=ino, mode=mode, uid=uid, gid=gid, atime_ns=now, mtime_ns=now,
                           ctime_ns=now, nlink=2 if stat.S_ISDIR(mode) else 1)

    def resize(self, node: ScratchNode, size: int) -> None:
        grow = size - len(node.data)
        if grow > 0 and self.used + grow > self.limit:
            raise FsError(errno.ENOSPC, f"scratch space full ({self.used} of {self.limit} bytes used)")
        if grow > 0:
            node.data.extend(b"\0" * grow)
        else:
            del node.data[size:]
        self.used += grow
        node.touch()

    def write(self, node: ScratchNode, offset: int, buf: bytes) -> int:
        end = offset + len(buf)
        if end > len(node.data):
            self.resize(node, end)
        node.data[offset:end] = buf
        node.touch()
        return len(buf)

    def release(self, node: ScratchNode) -> None:
        """Forget a removed node's bytes (recursively for directories)."""
        self.used -= len(node.data)
        node.data = bytearray()
        for child in node.children.values():
            self.release(child)
