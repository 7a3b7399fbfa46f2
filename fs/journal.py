"""Write-ahead journal: the durability point for committed changes.

Each acknowledged change is one record appended to the current segment file; one
``fdatasync`` makes a whole group of records durable (group commit). Segments are
named by the sequence number of their first record. A checkpoint (see ``store.py``)
makes the git objects durable and then drops segments it covers.

Record: magic ``ASJ1`` | u32 payload length | u64 sequence | u64 xxh64(payload) | payload.
A torn or corrupt tail (crash mid-append) ends reading: those records were never
acknowledged, because the acknowledgement waits for the fdatasync.
"""

from __future__ import annotations

import logging
import os
import struct

import xxhash

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<4sIQQ")
_MAGIC = b"ASJ1"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Append-only segmented log of encoded Changes."""

    def __init__(self, directory: str):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self._fd: int | None = None
        self.next_seq = 1
        self.bytes_since_checkpoint = 0

    def segments(self) -> list[tuple[int, str]]:
        out = []
        for name in os.listdir(self.dir):
            if name.endswith(".log") and name[:-4].isdigit():
                out.append((int(name[:-4]), os.path.join(self.dir, name)))
        return sorted(out)

    def read_after(self, seq: int):
        """Yield ``(seq, payload)`` for every intact record with a sequence > ``seq``."""
        expected = None
        for start, path in self.segments():
            with open(path, "rb") as f:
                data = f.read()
            pos = 0
            while pos + _HEAD.size <= len(data):
                magic, length, rseq, digest = _HEAD.unpack_from(data, pos)
                end = pos + _HEAD.size + length
                if magic != _MAGIC or end > len(data):
                    break
                payload = data[pos + _HEAD.size:end]
                if xxhash.xxh64_intdigest(payload) != digest:
                    log.warning("journal %s: corrupt record at offset %d, ignoring the rest", path, pos)
                    break
                if expected is not None and rseq != expected:
                    log.warning("journal %s: sequence gap (%d after %d), stopping", path, rseq, expected - 1)
                    return
                expected = rseq + 1
                if rseq > seq:
                    yield rseq, payload
                pos = end
            if pos != len(data):
                # A torn tail can only be the last thing ever written; stop here.
                log.info("journal %s: %d bytes of torn tail ignored", path, len(data) - pos)
                self.next_seq = max(self.next_seq, expected or start)
                return
        if expected is not None:
            self.next_seq = max(self.next_seq, expected)

    def open_new_segment(self) -> None:
        """Start writing a fresh segment (its directory entry made durable first)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        path = os.path.join(self.dir, f"{self.next_seq:020d}.log")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fsync_dir(self.dir)

    def append(self, payloads: list[bytes]) -> list[int]:
        """Append records (not yet durable; call ``sync``). Returns their sequence numbers."""
        if self._fd is None:
            self.open_new_segment()
        seqs, parts = [], []
        for p in payloads:
            seq = self.next_seq
            self.next_seq += 1
            parts.append(_HEAD.pack(_MAGIC, len(p), seq, xxhash.xxh64_intdigest(p)))
            parts.append(p)
            seqs.append(seq)
        buf = b"".join(parts)
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(buf)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            # Leave no partial record behind (e.g. ENOSPC): later appends must stay readable.
            os.ftruncate(self._fd, start)
            self.next_seq = seqs[0]
            raise
        self.bytes_since_checkpoint += len(buf)
        return seqs

    def sync(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)

    def drop_through(self, seq: int) -> None:
        """Delete segments whose records all have sequence numbers <= ``seq``."""
        segs = self.segments()
        for i, (start, path) in enumerate(segs):
            nxt = segs[i + 1][0] if i + 1 < len(segs) else self.next_seq
            if nxt - 1 <= seq and (self._fd is None or i + 1 < len(segs)):
                os.unlink(path)
        fsync_dir(self.dir)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
