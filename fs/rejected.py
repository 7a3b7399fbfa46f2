"""Refused writes made visible: ``M/<id>/@rejected/<state>.json`` (RAM only).

When a state file's new content is refused (invalid JSON, too large), the content is
kept here, one entry per state file (the newest refusal), together with why, when and
who: ``user.agentstatefs.last-error`` on the state file (and on the entry) says so in
one escaped line. Entries are charged to the scratch cap (bytes, reason and a fixed
cost per entry); when it is full the oldest other entries are dropped first, and as a
last resort only the reason is kept. Gone at unmount and when the agent is removed.

A refusal at ``close()`` is *provisional* until the handle is released: a shell's
``echo '{...}' > f`` closes a dup'ed descriptor with an empty buffer first (refused),
then the real one (committed). A later successful commit through the same handle
takes its provisional entry back (the previous entry returns); at release a refusal
that still stands becomes final.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field

from .changes import Who, safe_text
from .errors import FsError
from .history import iso
from .scratch import NODE_COST, ScratchSpace

REJECTED_DIR = "@rejected"
LAST_ERROR = "user.agentstatefs.last-error"

_JSON_ERR = re.compile(r"invalid JSON: (?P<msg>.*?): line (?P<line>\d+) column (?P<col>\d+) \(char \d+\)$")


def describe(agent: str, name: str, exc: FsError) -> str:
    """The reason of a refusal, without the path, line and column first:
    ``line 1 column 2: Expecting property name enclosed in double quotes``."""
    reason = exc.reason.removeprefix(f"{agent}/{name}: ")
    m = _JSON_ERR.match(reason)
    if m:
        reason = f"line {m['line']} column {m['col']}: {m['msg']}"
    return safe_text(reason, 512)


@dataclass(eq=False)
class Rejected:
    data: bytes
    reason: str
    errno: int
    time_ns: int
    who: Who
    fh: int | None = None            # the handle whose close made it (provisional until release)
    prev: "Rejected | None" = None   # the final entry it replaced (returns if this one is taken back)
    charged: int = 0
    truncated: bool = False

    @property
    def provisional(self) -> bool:
        return self.fh is not None

    def last_error(self) -> bytes:
        """One escaped line: reason, errno, time, pid and command, uid."""
        w = self.who
        kept = "; content not kept: scratch space full" if self.truncated else ""
        return (f"{self.reason} ({errno.errorcode.get(self.errno, self.errno)}; {iso(self.time_ns / 1e9)}; "
                f"pid {w.pid} {w.comm}; uid {w.uid}{kept})").encode()


@dataclass
class Rejections:
    space: ScratchSpace
    max_size: int
    entries: dict = field(default_factory=dict)     # (agent, name) -> Rejected, oldest first

    def get(self, agent: str, name: str) -> Rejected | None:
        return self.entries.get((agent, name))

    def names(self, agent: str) -> list[str]:
        return sorted(n for a, n in self.entries if a == agent)

    def _uncharge(self, e: Rejected | None) -> None:
        if e is not None and e.charged:
            self.space.used -= e.charged
            e.charged = 0

    def _charge(self, e: Rejected, keep: tuple) -> None:
        cost = NODE_COST + len(e.data) + len(e.reason)
        while True:
            try:
                self.space._charge(cost)
                e.charged = cost
                return
            except FsError:
                victim = next((k for k, v in self.entries.items()
                               if v not in keep and not v.provisional), None)
                if victim is None:
                    break
                self._drop(victim)
        e.data, e.truncated = b"", True
        cost = NODE_COST + len(e.reason)
        self.space.used += cost          # the reason alone: never refused
        e.charged = cost

    def _drop(self, key) -> None:
        e = self.entries.pop(key, None)
        if e is not None:
            self._uncharge(e)
            self._uncharge(e.prev)

    def record(self, agent: str, name: str, data: bytes, exc: FsError, who: Who, time_ns: int,
               fh: int | None = None) -> Rejected:
        """Keep refused ``data`` of ``agent/name``; provisional when ``fh`` is given."""
        key = (agent, name)
        cur = self.entries.get(key)
        base = cur.prev if cur is not None and cur.provisional else cur     # the last final entry
        if cur is not None and cur is not base:
            self._uncharge(cur)
        e = Rejected(bytes(data[:self.max_size]), describe(agent, name, exc), exc.errno, time_ns, who, fh=fh)
        if fh is not None:
            e.prev = base
        else:
            self._uncharge(base)
        self.entries.pop(key, None)
        self._charge(e, keep=(e, base))
        self.entries[key] = e
        return e

    def settle(self, agent: str, name: str, fh: int, committed: bool) -> Rejected | None:
        """The handle ``fh`` committed after all (its refusal is taken back) or was released
        with its refusal standing (it becomes final: returned)."""
        key = (agent, name)
        cur = self.entries.get(key)
        if cur is None or cur.fh != fh:
            return None
        if committed:
            del self.entries[key]
            self._uncharge(cur)
            if cur.prev is not None:
                self.entries[key] = cur.prev
            return None
        self._uncharge(cur.prev)
        cur.prev, cur.fh = None, None
        return cur

    def drop_agent(self, agent: str) -> None:
        for key in [k for k in self.entries if k[0] == agent]:
            self._drop(key)
