"""The audit log (``-o audit=PATH``): one JSON line per write, delete, rename, restore,
mode/owner/ACL change and per denied attempt (``-o audit_reads``: opens for reading too).

Fields: ``time`` (UTC, ISO 8601 with microseconds), ``uid``, ``gid``, ``pid``,
``command`` (escaped, ``safe_text``), ``op``, ``path`` (relative to the mount,
escaped), ``result`` (``ok`` or ``denied``/``failed``) and ``errno`` (its symbolic
name, absent on success).

Never blocks a writer: ``record`` puts the line on a bounded queue and returns; a
thread writes the queue out. When the queue is full, or the file cannot be written
(disk full, removed directory), lines are dropped and counted, and one warning says
so (another when writing works again, with the count). ``reopen()`` (SIGHUP, after
logrotate moved the file) makes the thread open the path anew before its next line.
"""

from __future__ import annotations

import datetime
import errno as _errno
import json
import logging
import os
import queue
import threading

from .changes import safe_text

log = logging.getLogger("agentstatefs")

QUEUE_MAX = 10000
PATH_MAX = 4096


def _iso(time_ns: int) -> str:
    return datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    def __init__(self, path: str, reads: bool = False, queue_max: int = QUEUE_MAX):
        self.path = path
        self.reads = reads
        self.dropped = 0          # lines lost (queue full or write failed), in total
        self.written = 0
        self._q: queue.Queue = queue.Queue(queue_max)
        self._reopen = threading.Event()
        self._failing = False
        self._unreported = 0
        self._f = self._open()    # a bad path fails the mount, clearly, before serving
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()

    def _open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "ab", buffering=0)

    # -- producers (the trio thread) ----------------------------------------------------
    def record(self, who, op: str, path: str, err: int = 0, time_ns: int = 0, denied: bool = False,
               **extra) -> None:
        """Queue one line; never waits. ``who`` has uid, gid, pid and comm (a ``Who``)."""
        import time
        entry = {"time": _iso(time_ns or time.time_ns()), "uid": who.uid, "gid": who.gid, "pid": who.pid,
                 "command": safe_text(who.comm, 64), "op": op, "path": safe_text(path, PATH_MAX),
                 "result": "denied" if denied else ("failed" if err else "ok")}
        if err:
            entry["errno"] = _errno.errorcode.get(err, str(err))
        for k, v in extra.items():
            if v is not None:
                entry[k] = safe_text(v, 512) if isinstance(v, str) else v
        try:
            self._q.put_nowait(entry)
        except queue.Full:
            self.dropped += 1
            self._unreported += 1

    def reopen(self) -> None:
        self._reopen.set()
        try:
            self._q.put_nowait(None)     # wake the writer thread
        except queue.Full:
            pass

    def close(self, timeout: float = 5.0) -> None:
        """Write out what is queued (bounded wait) and stop the thread."""
        try:
            self._q.put(StopIteration, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    # -- the writer thread ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is StopIteration:
                self._write_batch([])
                break
            batch = [item] if item is not None else []
            while len(batch) < 512:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is StopIteration:
                    self._write_batch(batch)
                    batch = None
                    break
                if nxt is not None:
                    batch.append(nxt)
            if batch is None:
                break
            self._write_batch(batch)
        try:
            if self._f is not None:
                self._f.close()
        except OSError:
            pass

    def _write_batch(self, batch: list) -> None:
        if self._reopen.is_set():
            self._reopen.clear()
            try:
                new = self._open()
                old, self._f = self._f, new
                if old is not None:
                    old.close()
                log.info("audit log %s reopened", self.path)
            except OSError as exc:
                log.warning("audit log %s: cannot reopen: %s (still writing the old file)", self.path, exc.strerror)
        if not batch:
            return
        data = b"".join(json.dumps(e, ensure_ascii=True, separators=(",", ":")).encode() + b"\n" for e in batch)
        try:
            if self._f is None:
                self._f = self._open()
            view = memoryview(data)
            while view:
                n = self._f.write(view)
                view = view[n:]
            self.written += len(batch)
        except OSError as exc:
            self.dropped += len(batch)
            self._unreported += len(batch)
            if not self._failing:
                self._failing = True
                log.warning("audit log %s: %s; dropping audit lines until it can be written (counted)",
                            self.path, exc.strerror or exc)
            return
        if self._failing or self._unreported:
            log.warning("audit log %s: %d line(s) dropped (queue full or write failed); writing again",
                        self.path, self._unreported)
            self._failing = False
            self._unreported = 0
