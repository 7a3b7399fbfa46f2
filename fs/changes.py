"""The Change record: the one unit of mutation, journaled, replayed and committed.

A Change is fully deterministic: applying it to the same parent commit always
produces the same commit id (same tree, author, time, message). Crash recovery relies
on that to replay the journal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# Operations (what the commit message says happened).
WRITE = "write"          # a state file got new content
DELETE = "delete"        # unlink of a state file
RENAME = "rename"        # rename between state names (content moves, source removed)
MKDIR = "mkdir"          # agent created
RMDIR = "rmdir"          # agent deleted
CHMOD = "chmod"          # mode change (agent dir or state file)
CHOWN = "chown"          # owner/group change
RESTORE = "restore"      # a state file got content equal to a past version (note = that commit)
OPS = (WRITE, DELETE, RENAME, MKDIR, RMDIR, CHMOD, CHOWN, RESTORE)


@dataclass(frozen=True)
class Who:
    """The caller behind a change: recorded as git author and in the message."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    comm: str = "?"

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
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip().decode("utf-8", "replace") or "?"
    except OSError:
        return "?"


@dataclass
class Change:
    """One committed change to one agent.

    ``files`` maps a durable file name to its new content, or to None to remove it.
    ``attrs`` holds attribute updates: ``{"": {...}}`` for the agent directory itself
    and ``{"config.json": {...}}`` for a file (keys: mode, uid, gid).
    """

    op: str
    agent: str
    who: Who
    time_ns: int
    files: dict[str, bytes | None] = field(default_factory=dict)
    attrs: dict[str, dict] = field(default_factory=dict)
    note: str = ""  # free text appended to the message subject (e.g. "restore from 3f2a1c9")

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
                   files=files, attrs=h.get("attrs") or {}, note=h.get("note", ""))

    def subject(self) -> str:
        names = ", ".join(sorted(self.files)) or ", ".join(sorted(k for k in self.attrs if k)) or ""
        target = f"{self.agent}/{names}" if names else f"{self.agent}/"
        if self.op == RENAME:
            src = [n for n, v in self.files.items() if v is None]
            dst = [n for n, v in self.files.items() if v is not None]
            target = f"{self.agent}/{src[0] if src else '?'} -> {dst[0] if dst else '?'}"
        sizes = [len(v) for v in self.files.values() if v is not None]
        extra = f" ({sizes[0]} bytes)" if self.op in (WRITE, RESTORE) and len(sizes) == 1 else ""
        if self.op == RESTORE:
            return f"restore {target} from {self.note}{extra}"
        note = f", {self.note}" if self.note else ""
        return f"{self.op} {target}{extra}{note}"

    def message(self) -> str:
        w = self.who
        trailers = [
            f"Agent: {self.agent}",
            f"Files: {', '.join(sorted(self.files)) or '-'}",
            f"Op: {self.op}",
            f"Uid: {w.uid}",
            f"Gid: {w.gid}",
            f"Pid: {w.pid}",
            f"Command: {w.comm}",
        ]
        return self.subject() + "\n\n" + "\n".join(trailers) + "\n"
