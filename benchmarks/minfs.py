"""Minimal pyfuse3 filesystem: one constant file, the baseline for read and stat.

Run as ``python benchmarks/minfs.py MOUNTPOINT``; serves ``MOUNTPOINT/const.json``
(the same ~1.5 KB JSON the agentstatefs scenarios use). Written like pyfuse3's own
``examples/hello.py``: default FileInfo (page cache allowed), default attribute
timeouts, no flush handler. Exits cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

NAME = b"const.json"
FILE_INO = pyfuse3.ROOT_INODE + 1


def payload() -> bytes:
    import json
    doc = {"agent": "const", "facts": [f"fact number {i} about the world" for i in range(40)]}
    return json.dumps(doc, indent=1).encode()[:1500].rsplit(b",", 1)[0] + b"]}\n"


class ConstFS(pyfuse3.Operations):
    def __init__(self, data: bytes):
        super().__init__()
        self.data = data

    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_size = 0
        elif inode == FILE_INO:
            e.st_mode = stat.S_IFREG | 0o644
            e.st_size = len(self.data)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e.st_ino = inode
        e.st_nlink = 1
        e.st_uid, e.st_gid = os.getuid(), os.getgid()
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = 0
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INO)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, await self.getattr(FILE_INO), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EACCES)
        return pyfuse3.FileInfo(fh=inode)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    async def read(self, fh, off, size):
        return self.data[off:off + size]


def main() -> None:
    mountpoint = sys.argv[1]
    fs = ConstFS(payload())
    pyfuse3.init(fs, mountpoint, {"fsname=benchminfs", "subtype=benchminfs", "default_permissions"})

    async def serve():
        async with trio.open_nursery() as nursery:
            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        pyfuse3.terminate()
                        return
            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    except BaseException:
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close()


if __name__ == "__main__":
    main()
