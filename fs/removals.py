"""Parked removals: how a state file can be removed and written again as ONE commit.

Editors and installers save a file by taking the old one out of the way first:
vim and emacs rename ``config.json`` to a backup name (``config.json~``), ``install``
and ``tar -x`` unlink it, and then each writes the new content under the old name. As
two commits that is a "delete" (the file absent from history in between) plus a
"write"; and when the new content is refused the file would be gone.

So an ``unlink`` of a durable state file, or its ``rename`` to a scratch name of the
same agent, does not reach the store at once: the namespace *parks* a ``Removal``
here, owned by the calling process (its thread group id, watched through a pidfd),
and answers 0. While it is parked:

- the owner no longer sees the name (lookups answer ENOENT, so ``O_EXCL`` creation
  works), every other process still sees the committed version (no ENOENT in
  between for readers);
- if the owner writes the name again and the write commits, the removal is folded
  into that one "write" commit; if the new content is refused (the recreated file is
  closed without a valid commit), the removal is undone when it settles: the previous
  version is still there under its name, and no commit was made (until then the
  owner still sees the name as gone, so a ``chmod`` that ``install`` runs after its
  failed close changes nothing, and vim's rename of its backup onto the name makes
  no commit either: same content);
- otherwise it is committed as a "delete": once the window (``WINDOW`` seconds) has
  passed with no re-creation in progress, when the owner has exited and another
  process looks, on ``fsync`` of the directory, before ``rmdir`` of the agent, when
  the root's ``user.agentstatefs.head`` is read, and at unmount.

This module only keeps the records; the namespace decides (fs/namespace.py).
"""

from __future__ import annotations

import logging
import os
import select
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

WINDOW = 1.0    # seconds a parked removal waits for its file to be written again


def tgid_of(pid: int) -> int:
    """The process (thread group) a FUSE request's pid belongs to: FUSE reports the
    calling thread's id, and a save may well be done by two threads of one program."""
    if pid <= 0:
        return pid
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return pid


@dataclass(eq=False)
class Removal:
    agent: str
    name: str
    fid: int                 # identity of the file that was removed
    owner: int               # thread group id of the process that removed it
    deadline: float          # monotonic time after which it is committed
    pidfd: int = -1          # readable once the owner has exited (-1: not watched)
    who: object = None       # Who of the remover (author of the delete commit)
    refused: bool = False    # the remover's new content was refused: settles by undoing
    settling: object = None  # trio.Event while its delete is being committed
    time_ns: int = field(default_factory=time.time_ns)

    def owner_alive(self) -> bool:
        if self.pidfd < 0:
            return False
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return not p.poll(0)

    def close(self) -> None:
        if self.pidfd >= 0:
            try:
                os.close(self.pidfd)
            except OSError:
                pass
            self.pidfd = -1


class Removals:
    """The parked removals of the mount, by (agent, state file name)."""

    def __init__(self, window: float = WINDOW):
        self.window = window
        self._by_name: dict[tuple[str, str], Removal] = {}

    def __len__(self) -> int:
        return len(self._by_name)

    def park(self, agent: str, name: str, fid: int, pid: int, who) -> Removal:
        owner = tgid_of(pid)
        try:
            pidfd = os.pidfd_open(owner) if owner > 0 else -1
        except OSError:
            pidfd = -1      # already gone: the removal is committed at the next chance
        r = Removal(agent, name, fid, owner, time.monotonic() + self.window, pidfd, who)
        old = self._by_name.pop((agent, name), None)
        if old is not None:
            old.close()
        self._by_name[(agent, name)] = r
        return r

    def get(self, agent: str, name: str) -> Removal | None:
        return self._by_name.get((agent, name))

    def owned(self, agent: str, name: str, pid: int) -> Removal | None:
        """The removal of ``agent/name`` if the process behind ``pid`` made it."""
        r = self._by_name.get((agent, name))
        if r is not None and r.owner == tgid_of(pid):
            return r
        return None

    def pop(self, agent: str, name: str) -> Removal | None:
        r = self._by_name.pop((agent, name), None)
        if r is not None:
            r.close()
        return r

    def of_agent(self, agent: str) -> list[Removal]:
        return [r for (a, _), r in self._by_name.items() if a == agent]

    def all(self) -> list[Removal]:
        return list(self._by_name.values())

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self._by_name.values() if r.settling is None), default=None)
