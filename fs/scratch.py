"""RAM-only scratch files and directories inside agent directories (tmpfs-like).

Editors' swap files, ``sed -i`` temp files and ``*.tmp`` files live here: never
versioned, capped in total size (ENOSPC past the cap), gone at unmount.

What counts against the cap: the bytes a file really stores, a fixed cost per node plus
its names, symlink targets, and xattr names and values; so neither many empty files nor
big xattrs escape it. Files are sparse, as on tmpfs: their data lives in chunks of
``CHUNK`` bytes (a dict, only the chunks written hold memory, and the last one only up
to its last byte written), so holes (``truncate -s 1T``, ``seek`` past the end) are not
charged. Past ``MAX_FILE_SIZE`` (ext4's largest file with 4 KiB blocks; tmpfs's limit,
2**63 - 1, cannot be reached through FUSE, whose kernel side refuses such offsets with
EINVAL first) a file cannot grow: EFBIG, where the old bytearray answered ENOSPC. As on tmpfs, a file's bytes live until its last name is gone *and*
its last open handle is closed (``unlink`` while open keeps the data readable and
writable); hard links share one node (``nlink``), symbolic links hold their target.
"""

from __future__ import annotations

import errno
import random
import stat
import time
from dataclasses import dataclass, field

from .errors import FsError

NODE_COST = 256          # bytes charged per node, on top of its name, data and xattrs
CHUNK = 64 << 10         # sparse file data: one bytearray per chunk written
MAX_FILE_SIZE = (2**32 - 1) * 4096   # ext4's largest file (4 KiB blocks, 16 TiB - 4 KiB): EFBIG past it


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
    size: int = 0
    chunks: dict = field(default_factory=dict)     # chunk index -> bytearray (<= CHUNK bytes)
    alloc: int = 0        # bytes held by ``chunks`` (what the cap is charged for data)
    children: dict = field(default_factory=dict)   # name -> ScratchNode, for directories
    target: bytes = b""   # symbolic links: where they point
    parent_ino: int = 0   # directories: the inode number of ".."
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    nlink: int = 1
    xattrs: dict = field(default_factory=dict)
    opens: int = 0        # open handles
    charged: int = 0      # bytes of the cap held for the node itself (cost, names, xattrs)
    freed: bool = False
    agent: str | None = None   # the agent directory it lives in (permission checks)
    user_times: bool = False   # mtime/atime set by the user (kept when renamed onto a state file)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def touch(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()

    def read(self, off: int, n: int) -> bytes:
        """Bytes ``off`` .. ``off + n`` (holes read as zeros, nothing past the end)."""
        end = min(off + n, self.size)
        if off >= end:
            return b""
        out = bytearray()
        pos = off
        while pos < end:
            i, lo = divmod(pos, CHUNK)
            hi = min(CHUNK, lo + end - pos)
            chunk = self.chunks.get(i)
            piece = chunk[lo:hi] if chunk is not None else b""
            out += piece
            if len(piece) < hi - lo:
                out += bytes(hi - lo - len(piece))
            pos += hi - lo
        return bytes(out)

    def content(self) -> bytes:
        return self.read(0, self.size)


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
                 charge: bool = True, target: bytes = b"", parent_ino: int = 0) -> ScratchNode:
        cost = NODE_COST + len(name.encode()) + len(target) if charge else 0
        self._charge(cost)
        now = time.time_ns()
        return ScratchNode(ino=ino, mode=mode, uid=uid, gid=gid, atime_ns=now, mtime_ns=now,
                           ctime_ns=now, nlink=2 if stat.S_ISDIR(mode) else 1, charged=cost,
                           target=bytes(target), size=len(target), parent_ino=parent_ino)

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
        """truncate/ftruncate: growing makes a hole (nothing charged), shrinking frees."""
        if size > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"{size} bytes is past the largest file size ({MAX_FILE_SIZE})")
        if size < node.size:
            last = size // CHUNK
            for i in [i for i in node.chunks if i >= last]:
                chunk = node.chunks[i]
                keep = max(0, size - i * CHUNK) if i == last else 0
                if keep < len(chunk):
                    self.used -= len(chunk) - keep
                    node.alloc -= len(chunk) - keep
                    if keep:
                        del chunk[keep:]
                    else:
                        del node.chunks[i]
        node.size = size
        node.touch()

    def write(self, node: ScratchNode, offset: int, buf: bytes) -> int:
        end = offset + len(buf)
        if end > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"write to {end} bytes is past the largest file size")
        # Charge what the write allocates before changing anything (ENOSPC leaves the file as it was).
        grow = 0
        pos = offset
        while pos < end:
            i, lo = divmod(pos, CHUNK)
            hi = min(CHUNK, lo + end - pos)
            have = len(node.chunks.get(i, b""))
            grow += max(0, hi - have)
            pos += hi - lo
        self._charge(grow)
        node.alloc += grow
        pos, src = offset, 0
        while pos < end:
            i, lo = divmod(pos, CHUNK)
            hi = min(CHUNK, lo + end - pos)
            chunk = node.chunks.get(i)
            if chunk is None:
                chunk = node.chunks[i] = bytearray()
            if len(chunk) < lo:
                chunk.extend(bytes(lo - len(chunk)))
            chunk[lo:hi] = buf[src:src + hi - lo]
            src += hi - lo
            pos += hi - lo
        if end > node.size:
            node.size = end
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
        self.used -= node.alloc + node.charged
        node.chunks = {}
        node.alloc = 0
        node.charged = 0
        node.xattrs = {}
