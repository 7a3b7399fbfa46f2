"""The change stream ``M/@events``: every open is a subscription.

Each published change (a commit, a runtime.json version) and each refused write
becomes one JSON line ``{seq, time, agent, file, op, commit, version, uid, pid}``
(``rejected`` lines carry ``reason`` and ``errno``; renames ``from``; patches and
restores ``note``), appended to every subscription's queue. ``read`` returns whole
lines and blocks while the queue is empty (``O_NONBLOCK``: ``EAGAIN``); ``poll`` says
when there is something to read.

A slow reader never slows writers down: a queue holds at most ``MAX_EVENTS`` lines
and ``MAX_BYTES``; past that the oldest lines are dropped and the reader gets one
``{"op": "lost", "count": N}`` line where they were. ``seq`` counts every event of
the mount (from 1 at mount time), so a reader can also see gaps itself.

A blocked read occupies one of the FUSE loop's request tasks, so at most
``MAX_BLOCKED`` reads wait at once (the next one gets ``EAGAIN``); subscriptions are
capped at ``MAX_SUBSCRIBERS`` (``EMFILE``).
"""

from __future__ import annotations

import errno
import json
import select
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

import trio

from .errors import FsError

MAX_EVENTS = 2048
MAX_BYTES = 256 << 10
MAX_SUBSCRIBERS = 256
MAX_BLOCKED = 32


def iso_ns(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns / 1e9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(eq=False)
class Subscription:
    nonblock: bool = False
    queue: deque = field(default_factory=deque)
    size: int = 0              # bytes queued
    lost: int = 0              # lines dropped since the last read
    partial: bytes = b""       # the rest of a line a short read cut
    wake: trio.Event = field(default_factory=trio.Event)
    closed: bool = False
    poll_handle: object = None

    def ready(self) -> bool:
        return bool(self.queue or self.lost or self.partial or self.closed)

    def push(self, line: bytes) -> None:
        self.queue.append(line)
        self.size += len(line)
        while len(self.queue) > MAX_EVENTS or self.size > MAX_BYTES:
            self.size -= len(self.queue.popleft())
            self.lost += 1
        self.notify()

    def notify(self) -> None:
        self.wake.set()
        ph, self.poll_handle = self.poll_handle, None
        if ph is not None:
            try:
                ph.notify()
            except Exception:
                pass


class EventHub:
    def __init__(self):
        self.seq = 0
        self.subs: set[Subscription] = set()
        self.blocked = 0
        self.stopped = False

    def subscribe(self, nonblock: bool = False) -> Subscription:
        if len(self.subs) >= MAX_SUBSCRIBERS:
            raise FsError(errno.EMFILE, f"too many @events subscriptions (at most {MAX_SUBSCRIBERS})")
        sub = Subscription(nonblock=nonblock)
        if self.stopped:
            sub.closed = True
        self.subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subs.discard(sub)
        sub.closed = True
        sub.queue.clear()
        sub.notify()

    def stop(self) -> None:
        """The daemon is stopping: every blocked read returns (end of file)."""
        self.stopped = True
        for sub in list(self.subs):
            sub.closed = True
            sub.notify()

    def emit(self, op: str, agent: str | None, file: str | None, *, time_ns: int | None = None,
             commit=None, version=None, uid=None, pid=None, **extra) -> None:
        self.seq += 1
        if not self.subs:
            return
        ev = {"seq": self.seq, "time": iso_ns(time_ns or time.time_ns()), "agent": agent, "file": file,
              "op": op, "commit": str(commit) if commit is not None else None, "version": version,
              "uid": uid, "pid": pid}
        ev.update({k: v for k, v in extra.items() if v is not None})
        line = json.dumps(ev, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"
        for sub in self.subs:
            sub.push(line)

    async def read(self, sub: Subscription, size: int) -> bytes:
        while not sub.ready():
            if sub.nonblock:
                raise FsError(errno.EAGAIN, "no events yet")
            if self.blocked >= MAX_BLOCKED:
                raise FsError(errno.EAGAIN, f"too many blocked @events reads (at most {MAX_BLOCKED})")
            sub.wake = trio.Event()
            self.blocked += 1
            try:
                await sub.wake.wait()
            finally:
                self.blocked -= 1
        out = bytearray(sub.partial)
        sub.partial = b""
        if sub.lost:
            out += json.dumps({"seq": None, "time": iso_ns(time.time_ns()), "op": "lost",
                               "count": sub.lost}).encode() + b"\n"
            sub.lost = 0
        while sub.queue and len(out) + len(sub.queue[0]) <= size:
            line = sub.queue.popleft()
            sub.size -= len(line)
            out += line
        if not out and sub.queue:          # one line longer than the caller's buffer
            line = sub.queue.popleft()
            sub.size -= len(line)
            out += line
        if len(out) > size:
            sub.partial = bytes(out[size:])
            del out[size:]
        return bytes(out)

    def poll(self, sub: Subscription, handle) -> int:
        if sub.ready():
            return select.POLLIN | select.POLLRDNORM
        sub.poll_handle = handle
        return 0
