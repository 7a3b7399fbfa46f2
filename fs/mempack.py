"""Git objects written since the last checkpoint, in RAM, then written out as one pack.

A commit used to cost about seven loose-object files (blob, meta blob, agent tree, two
fan-out trees, root tree, commit). Durability never depended on them: the journal is
the durability point and replay rebuilds every object. So the writer's repository gets
an in-memory object backend (``MemoryObjects``, a libgit2 odb backend implemented in
Python) that takes every write; readers' repositories get a second backend over the
same dict, so they read new objects before they reach the disk. A checkpoint writes
everything in it as ONE pack file (``write_pack``: plain pack v2 + idx v2, zlib level 1 (trees stored),
no deltas), fsyncs it, and only then drops those objects from memory. Background
``git repack --geometric`` keeps the number of packs small.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib

import pygit2
from pygit2.enums import ObjectType

TYPE_NAMES = {ObjectType.COMMIT: b"commit", ObjectType.TREE: b"tree", ObjectType.BLOB: b"blob",
               ObjectType.TAG: b"tag"}


class MemoryObjects(pygit2.OdbBackend):
    """An odb backend over ``objects`` (Oid -> (type, bytes)), shared between repositories."""

    def __init__(self, objects: dict):
        super().__init__()
        self.objects = objects

    def read_cb(self, oid):
        t, data = self.objects[oid]      # KeyError -> GIT_ENOTFOUND: other backends are asked
        return t, data

    def read_header_cb(self, oid):
        t, data = self.objects[oid]
        return t, len(data)

    def _match(self, prefix: str):
        if len(prefix) == 40:                 # libgit2 asks with full ids too: no scan
            oid = pygit2.Oid(hex=prefix)
            if oid in self.objects:
                return oid
            raise KeyError(prefix)
        matches = [o for o in list(self.objects) if str(o).startswith(prefix)]
        if len(matches) != 1:
            raise KeyError(prefix) if not matches else ValueError(prefix)
        return matches[0]

    def read_prefix_cb(self, prefix):
        oid = self._match(prefix)
        t, data = self.objects[oid]
        return t, data, oid

    def exists_cb(self, oid):
        return oid in self.objects

    def exists_prefix_cb(self, prefix):
        return self._match(prefix)

    def write_cb(self, oid, data, t):
        self.objects[oid] = (t, bytes(data))

    def refresh_cb(self):
        pass

    def __iter__(self):
        return iter(list(self.objects))


# Above loose (1) and packed (2): the objects of the newest groups (the head's trees,
# the blob just written) are read right after they are made. Measured the other way
# round (packs first): 124 instead of 27 µs per lookup of an in-memory object on the
# write path, against 0.65 -> 0.58 s for the 65,536-lookup agent walk at 100,000 agents.
MEMORY_PRIORITY = 1000


def attach(repo: pygit2.Repository, objects: dict) -> MemoryObjects:
    backend = MemoryObjects(objects)
    repo.odb.add_backend(backend, MEMORY_PRIORITY)
    return backend


def _pack_header(t: int, size: int) -> bytes:
    out = bytearray()
    byte = (t << 4) | (size & 0x0F)
    size >>= 4
    while size:
        out.append(byte | 0x80)
        byte = size & 0x7F
        size >>= 7
    out.append(byte)
    return bytes(out)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pack(repo_dir: str, objects: dict, durable: bool = True) -> str | None:
    """Write ``objects`` (Oid -> (type, bytes)) as one durable pack in ``repo_dir``.

    Returns the pack's path (None when there was nothing to write). The pack and its
    index are fsynced and renamed into ``objects/pack`` (directory fsynced) before this
    returns, so the objects may be dropped from memory afterwards.
    """
    if not objects:
        return None
    pack_dir = os.path.join(repo_dir, "objects", "pack")
    if not os.path.isdir(pack_dir):
        os.makedirs(pack_dir, exist_ok=True)
    items = sorted(objects.items(), key=lambda kv: kv[0].raw)
    sha = hashlib.sha1()
    body = [struct.pack(">4sII", b"PACK", 2, len(items))]
    sha.update(body[0])
    offset = len(body[0])
    entries = []          # (raw oid, crc32, offset)
    for oid, (t, data) in items:
        # Trees (mostly ids: they hardly compress, and at 100,000 agents two of them per
        # commit are ~7.5 KB) are stored; the background repack keeps them as they are.
        chunk = _pack_header(int(t), len(data)) + zlib.compress(data, 0 if t == ObjectType.TREE else 1)
        entries.append((oid.raw, zlib.crc32(chunk) & 0xFFFFFFFF, offset))
        sha.update(chunk)
        body.append(chunk)
        offset += len(chunk)
    pack_sum = sha.digest()
    body.append(pack_sum)

    idx = [b"\xfftOc", struct.pack(">I", 2)]
    fanout = [0] * 256
    for raw, _, _ in entries:
        fanout[raw[0]] += 1
    total = 0
    for i in range(256):
        total += fanout[i]
        fanout[i] = total
    idx.append(struct.pack(">256I", *fanout))
    idx.extend(raw for raw, _, _ in entries)
    idx.append(struct.pack(f">{len(entries)}I", *(crc for _, crc, _ in entries)))
    large = []
    small = []
    for _, _, off in entries:
        if off < 0x80000000:
            small.append(off)
        else:
            small.append(0x80000000 | len(large))
            large.append(off)
    idx.append(struct.pack(f">{len(small)}I", *small))
    if large:
        idx.append(struct.pack(f">{len(large)}Q", *large))
    idx.append(pack_sum)
    idx_bytes = b"".join(idx)
    idx_bytes += hashlib.sha1(idx_bytes).digest()

    name = f"pack-{pack_sum.hex()}"
    final = os.path.join(pack_dir, name)
    for suffix, blob in ((".pack", b"".join(body)), (".idx", idx_bytes)):
        tmp = os.path.join(pack_dir, f"tmp_{name}{suffix}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o444)
        try:
            view = memoryview(blob)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final + suffix)     # .pack first: an .idx never names a missing pack
    if durable:
        _fsync_dir(pack_dir)
    return final + ".pack"
