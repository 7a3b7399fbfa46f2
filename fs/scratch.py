"""RAM-only scratch files and directories inside agent directories (tmpfs-like).

Editors' swap files, ``sed -i`` temp files and ``*.tmp`` files live here: never
versioned, capped in total size (ENOSPC past the cap), gone at unmount.

What counts against the cap: file bytes, a fixed cost per node plus its name, and
xattr names and values; so neither many empty files nor big xattrs escape it. As on
tmpfs, a file's bytes live until its last name is gone *and* its last open handle is
closed (``unlink`` while open keeps the data readable and writable).
"""

from __future__ import annotations

import errno
import random
import stat
import time
from dataclasses import dataclass, field

from .errors import FsError

NODE_COST = 256          # bytes charged per node, on top of its name, data and xattrs


def new_ino(taken) -> int:
    """A random inode number not in ``taken`` (numbers are never derived from a
    per-mount counter: one may become a durable file's identity on rename)."""
    while True:
        ino = random.getrandbits(63)
        if ino > 1 << 32 and ino not in taken:
            return ino


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
    opens: int = 0        # open handles
    charged: int = 0      # bytes of the cap held for the node itself (cost, names, xattrs)
    freed: bool = False

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

    def _charge(self, n: int) -> None:
        if n > 0 and self.used + n > self.limit:
            raise FsError(errno.ENOSPC, f"scratch space full ({self.used} of {self.limit} bytes used)")
        self.used += n

    def new_node(self, ino: int, mode: int, uid: int, gid: int, name: str = "",
                 charge: bool = True) -> ScratchNode:
        cost = NODE_COST + len(name.encode()) if charge else 0
        self._charge(cost)
        now = time.time_ns()
        return ScratchNode(ino=ino, mode=mode, uid=uid, gid=gid, atime_ns=now, mtime_ns=now,
                           ctime_ns=now, nlink=2 if stat.S_ISDIR(mode) else 1, charged=cost)

    def charge_name(self, node: ScratchNode, name: str) -> None:
        """A further name for ``node`` (rename to a longer name, or a hard link)."""
        n = len(name.encode())
        self._charge(n)
        node.charged += n

    def set_xattr(self, node: ScratchNode, name: str, value: bytes) -> None:
        old = node.xattrs.get(name)
        grow = len(name) + len(value) - (len(name) + len(old) if old is not None else 0)
        self._charge(grow)
        node.charged += grow
        node.xattrs[name] = value

    def remove_xattr(self, node: ScratchNode, name: str) -> bool:
        old = node.xattrs.pop(name, None)
        if old is None:
            return False
        n = len(name) + len(old)
        node.charged -= n
        self.used -= n
        return True

    def resize(self, node: ScratchNode, size: int) -> None:
        grow = size - len(node.data)
        self._charge(grow)
        if grow > 0:
            node.data.extend(bytes(grow))
        elif grow < 0:
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

    # -- lifetime -------------------------------------------------------------------------
    def opened(self, node: ScratchNode) -> None:
        node.opens += 1

    def closed(self, node: ScratchNode) -> None:
        node.opens = max(0, node.opens - 1)
        if node.nlink == 0 and node.opens == 0:
            self._free(node)

    def unlinked(self, node: ScratchNode) -> None:
        """One name of ``node`` is gone; its bytes go when no name and no handle is left."""
        node.nlink = 0 if node.is_dir else max(0, node.nlink - 1)
        node.ctime_ns = time.time_ns()
        if node.nlink == 0 and node.opens == 0:
            self._free(node)

    def release_tree(self, node: ScratchNode) -> None:
        """Forget a whole directory tree (its agent was removed)."""
        for child in list(node.children.values()):
            self.release_tree(child)
        node.children.clear()
        node.nlink = 0
        if node.opens == 0:
            self._free(node)

    def _free(self, node: ScratchNode) -> None:
        if node.freed:
            return
        node.freed = True
        self.used -= len(node.data) + node.charged
        node.data = bytearray()
        node.charged = 0
        node.xattrs = {}
