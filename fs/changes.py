"""The Change record: the one unit of mutation, journaled, replayed and committed.

A Change handed to the store is an *intent*: "write this content to the file whose
identity is F", "rename whatever is at A onto B", "delete F". The store resolves it
against the state it owns (the newest head, including changes queued before it) into
a *concrete* Change: explicit contents, attributes and operation (e.g. a write of
content its process just copied out of ``@history`` becomes a restore). Only concrete Changes are journaled
and committed, so replay after a crash needs no resolution and is fully deterministic:
the same parent commit and Change always give the same commit id.

Everything a caller controls that reaches a commit, a log line or the commit index
(its command name above all) goes through ``safe_text`` first.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

# Operations (what the commit message says happened).
WRITE = "write"          # a state file got new content
DELETE = "delete"        # unlink of a state file
RENAME = "rename"        # rename between state names (content moves, source removed)
MKDIR = "mkdir"          # agent created
RMDIR = "rmdir"          # agent deleted
CHMOD = "chmod"          # mode change (agent dir or state file)
CHOWN = "chown"          # owner/group change
RESTORE = "restore"      # a past version copied back (restore verb, or cp out of @history; note = its commit)
EXCHANGE = "exchange"    # RENAME_EXCHANGE of two state files (contents and metadata swap)
TOUCH = "touch"          # user-set mtime/atime of a state file (utimensat: touch -d, rsync, tar)
MOVE = "move"            # agent renamed (mv M/a M/b): ``agent`` is the old id, ``move`` = (old, new)
OPS = (WRITE, DELETE, RENAME, MKDIR, RMDIR, CHMOD, CHOWN, RESTORE, EXCHANGE, TOUCH, MOVE)

PATCH = "patch"          # intent only: apply files[name] (a merge patch or JSON Patch) to the
                         # current content; resolved into a WRITE (note: the kind of patch)

ORPHAN = "orphan"        # store result: the write went to a file that no longer has a name

_UNSAFE = re.compile(r"[^\x20-\x3b\x3d\x3f-\x7e\u00a0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
COMM_MAX = 64


def safe_text(text: str, limit: int = 256) -> str:
    """``text`` with every control character, ``<`` and ``>`` escaped as ``\\xNN``.

    The result is one printable line: it cannot break a git identity (git refuses
    ``<``/``>``/newline there), forge a log line or a commit trailer, or end a record.
    """
    out = _UNSAFE.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 256
                      else "\\u%04x" % ord(m.group()), text)
    return out if len(out) <= limit else out[:limit] + "..."


@dataclass(frozen=True)
class Who:
    """The caller behind a change: recorded as git author and in the message.

    ``comm`` is always stored escaped (``safe_text``), whatever the caller named itself.
    """

    uid: int = 0
    gid: int = 0
    pid: int = 0
    comm: str = "?"

    def __post_init__(self):
        object.__setattr__(self, "comm", safe_text(str(self.comm), COMM_MAX) or "?")
        for name in ("uid", "gid", "pid"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @classmethod
    def from_pid(cls, uid: int, gid: int, pid: int) -> "Who":
        return cls(uid, gid, pid, command_name(pid))

    def to_json(self) -> dict:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid, "comm": self.comm}


def command_name(pid: int) -> str:
    """The caller's command name (``/proc/PID/comm``), ``?`` when it is gone."""
    if pid <= 0:
        return "?"
    try:
        fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return "?"
    try:
        raw = os.read(fd, 64)      # (a buffered open() cost ~80 µs per write-open)
    except OSError:
        return "?"
    finally:
        os.close(fd)
    # The kernel ends comm with one newline; anything else in it is the caller's.
    return raw.removesuffix(b"\n").decode("utf-8", "replace") or "?"


@dataclass
class Change:
    """One committed change to one agent.

    ``files`` maps a durable file name to its new content, or to None to remove it.
    ``attrs`` holds attribute updates: ``{"": {...}}`` for the agent directory itself
    and ``{"config.json": {...}}`` for a file (keys: mode, uid, gid, fid, mtime_ns, atime_ns;
    on a WRITE, mtime_ns/atime_ns are times the caller set, kept instead of the commit time).

    Intent-only fields, resolved by the store (``Store.resolve``):
    ``fids`` names the file identity a write or delete is meant for (the inode the
    caller opened; 0 = "a file I am creating"): if the name now holds another file,
    the write went to an unlinked inode and is dropped, as on ext4. ``move`` is
    ``(source, target)`` for RENAME/EXCHANGE: the store moves whatever content and
    metadata the source has at that point. ``expect_version`` is compare-and-swap.
    ``limit`` caps the size of content a PATCH produces (the mount's max_size).
    """

    op: str
    agent: str
    who: Who
    time_ns: int
    files: dict[str, bytes | None] = field(default_factory=dict)
    attrs: dict[str, dict] = field(default_factory=dict)
    note: str = ""  # free text appended to the message subject (e.g. "restore from 3f2a1c9")
    fids: dict[str, int] = field(default_factory=dict)
    move: tuple[str, str] | None = None
    expect_version: dict[str, int] = field(default_factory=dict)
    create: bool = False    # the caller created the file it writes (absent is fine)
    replace: bool = False   # rename onto the name: the file gets identity fids[name]
    limit: int = 0          # PATCH: most bytes the patched file may have (0: no cap)
    sources: dict[str, str] = field(default_factory=dict)   # WRITE: blob hex -> commit of a
                            # version the writing process just read from @history (a copy
                            # out of history: the write is labelled a restore if it matches)

    def header(self) -> dict:
        """JSON-able description; file bodies are carried separately."""
        return {
            "op": self.op,
            "agent": self.agent,
            "who": self.who.to_json(),
            "time_ns": self.time_ns,
            "files": {k: (None if v is None else len(v)) for k, v in sorted(self.files.items())},
            "attrs": self.attrs,
            "note": self.note,
            "move": list(self.move) if self.move else None,
        }

    def body(self) -> bytes:
        return b"".join(v for _, v in sorted(self.files.items()) if v is not None)

    def encode(self) -> bytes:
        """Serialize as ``header-json \\n body`` for the journal."""
        return json.dumps(self.header(), sort_keys=True).encode() + b"\n" + self.body()

    @classmethod
    def decode(cls, raw: bytes) -> "Change":
        head, _, body = raw.partition(b"\n")
        h = json.loads(head)
        files: dict[str, bytes | None] = {}
        pos = 0
        for name, length in sorted(h["files"].items()):
            if length is None:
                files[name] = None
            else:
                files[name] = bytes(body[pos:pos + length])
                pos += length
        return cls(op=h["op"], agent=h["agent"], who=Who(**h["who"]), time_ns=h["time_ns"],
                   files=files, attrs=h.get("attrs") or {}, note=h.get("note", ""),
                   move=tuple(h["move"]) if h.get("move") else None)

    def subject(self) -> str:
        names = ", ".join(sorted(self.files)) or ", ".join(sorted(k for k in self.attrs if k)) or ""
        target = f"{self.agent}/{names}" if names else f"{self.agent}/"
        if self.op == RENAME and self.move:
            target = f"{self.agent}/{self.move[0]} -> {self.move[1]}"
        elif self.op == RENAME:
            src = [n for n, v in self.files.items() if v is None]
            dst = [n for n, v in self.files.items() if v is not None]
            target = f"{self.agent}/{src[0] if src else '?'} -> {dst[0] if dst else '?'}"
        elif self.op == MOVE and self.move:
            target = f"{self.move[0]}/ -> {self.move[1]}/"
        elif self.op == EXCHANGE and self.move:
            target = f"{self.agent}/{self.move[0]} <-> {self.move[1]}"
        sizes = [len(v) for v in self.files.values() if v is not None]
        extra = f" ({sizes[0]} bytes)" if self.op in (WRITE, RESTORE) and len(sizes) == 1 else ""
        if self.op == RESTORE:
            return f"restore {target} from {safe_text(self.note)}{extra}"
        note = f", {safe_text(self.note)}" if self.note else ""
        return f"{self.op} {target}{extra}{note}"

    def message(self) -> str:
        w = self.who
        trailers = [
            # A moved agent's history continues under its new id (``From`` is the old one).
            f"Agent: {self.move[1] if self.op == MOVE and self.move else self.agent}",
            *([f"From: {self.move[0]}"] if self.op == MOVE and self.move else []),
            f"Files: {', '.join(sorted(self.files)) or '-'}",
            f"Op: {self.op}",
            f"Uid: {w.uid}",
            f"Gid: {w.gid}",
            f"Pid: {w.pid}",
            f"Command: {w.comm}",
        ]
        return self.subject() + "\n\n" + "\n".join(trailers) + "\n"
