"""The commit index: every commit on ``main`` with its agent, op and file blobs.

Kept in memory (oldest first) and appended to ``agentstatefs/history-index`` as
commits are made, so listing history, per-agent history, revision resolution and
"is this content a past version?" never walk git. On open the file is checked against
``main`` and repaired incrementally (only commits it lacks are read from git).

Revision specs: a full commit id, a unique prefix of at least 4 hex digits, ``HEAD``,
``HEAD~N``, or a time (the state as of that instant): ``YYYY-MM-DDTHH:MM:SSZ``, the
same without ``Z`` (UTC), with an offset ``+HH:MM``/``-HH:MM``, optionally with fractions
of a second or without seconds, or a date alone ``YYYY-MM-DD`` (the end of that day, UTC).
Within an agent's context (``M/<id>/@history``, ``log ID``, ``restore ID FILE REV``)
``HEAD~N`` counts that agent's commits, and a time picks that agent's last commit at or
before it.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import re
import threading
from calendar import timegm
from dataclasses import dataclass
from datetime import datetime, timezone

import pygit2

from .changes import safe_text
from .errors import FsError
from .layout import agent_path
from .names import DURABLE_FILES

log = logging.getLogger(__name__)

_HEAD_N = re.compile(r"HEAD(?:~(\d+))?")
_HEX = re.compile(r"[0-9a-f]{4,40}")
_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d{1,9})?)?"
                   r"(Z|[+-]\d{2}:?\d{2})?)?")
TIME_FORMS = ("YYYY-MM-DDTHH:MM:SSZ, the same without Z (UTC) or with +HH:MM, "
              "or a date YYYY-MM-DD (end of that day, UTC)")


@dataclass(frozen=True)
class Entry:
    commit: str          # hex id
    time: int            # commit time, seconds since the epoch (UTC)
    agent: str
    op: str
    files: tuple         # ((name, blob hex or "-"), ...) for durable files this commit touched


def parse_time(spec: str) -> int | None:
    """Seconds since the epoch (whole seconds, rounded down) of a time spec, or None.

    ``2026-11-25T10:00:00Z``, ``2026-11-25T10:00:00`` (UTC), ``2026-11-25T12:00:00+02:00``,
    ``2026-11-25T10:00`` and ``2026-11-25`` (the last second of that day, UTC)."""
    m = _TIME.fullmatch(spec)
    if not m:
        return None
    year, month, day, hh, mm, ss, zone = m.groups()
    try:
        if hh is None:
            dt = datetime(int(year), int(month), int(day), 23, 59, 59, tzinfo=timezone.utc)
        else:
            dt = datetime(int(year), int(month), int(day), int(hh), int(mm), int(ss or 0),
                          tzinfo=timezone.utc)
    except ValueError:
        return None
    t = timegm(dt.utctimetuple())
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        oh, om = int(digits[:2]), int(digits[2:])
        if oh > 23 or om > 59:
            return None
        t -= sign * (oh * 3600 + om * 60)
    return t


def iso(ts_seconds: float) -> str:
    return datetime.fromtimestamp(ts_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _trailers(message: str) -> dict:
    out = {}
    for line in message.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key in ("Agent", "Op", "Files", "From"):
            out[key] = value.strip()
    return out


class CommitIndex:
    """Index of ``main``'s (linear) history."""

    def __init__(self, repo: pygit2.Repository, path: str | None, writable: bool = True):
        self.repo = repo
        self.path = path
        self.writable = writable
        self._lock = threading.RLock()
        self.entries: list[Entry] = []
        self._pos: dict[str, int] = {}
        self._by_agent: dict[str, list[int]] = {}
        self._renames: dict[str, list[tuple[int, str]]] = {}     # agent -> [(pos of move, old id)]
        self._versions: dict[tuple[str, str, str], int] = {}   # (agent, file, blob) -> latest pos
        self._last: dict[tuple[str, str], int] = {}            # (agent, file) -> pos of last change
        self._sorted: list[str] | None = None
        self._file = None

    # -- building -------------------------------------------------------------------
    def _add(self, e: Entry) -> None:
        pos = len(self.entries)
        self.entries.append(e)
        self._pos[e.commit] = pos
        if e.op == "move" and e.files and e.files[0][0] == "@from":
            # mv M/a M/b: b's history is a's, followed by the move.
            src = e.files[0][1]
            self._by_agent[e.agent] = self._by_agent.pop(src, [])
            self._renames[e.agent] = self._renames.pop(src, []) + [(pos, src)]
            for key in [k for k in self._last if k[0] == src]:
                self._last[(e.agent, key[1])] = self._last.pop(key)
            for key in [k for k in self._versions if k[0] == src]:
                self._versions[(e.agent, key[1], key[2])] = self._versions.pop(key)
            self._by_agent[e.agent].append(pos)
            if self._sorted is not None:
                bisect.insort(self._sorted, e.commit)
            return
        self._by_agent.setdefault(e.agent, []).append(pos)
        for name, blob in e.files:
            self._last[(e.agent, name)] = pos
            if blob != "-":
                self._versions[(e.agent, name, blob)] = pos
        if self._sorted is not None:
            bisect.insort(self._sorted, e.commit)   # kept sorted: no re-sort per prefix lookup

    def _entry_from_commit(self, commit: pygit2.Commit) -> Entry:
        t = _trailers(commit.message)
        agent = t.get("Agent", "")
        op = t.get("Op", "?")
        names = [n.strip() for n in t.get("Files", "").split(",") if n.strip() in DURABLE_FILES]
        files = []
        if agent and names:
            base = agent_path(agent)
            for name in names:
                try:
                    blob = str(commit.tree[f"{base}/{name}"].id)
                except KeyError:
                    blob = "-"
                files.append((name, blob))
        if op == "move" and t.get("From"):
            files = [("@from", t["From"])]
        return Entry(str(commit.id), commit.commit_time, agent, op, tuple(files))

    @staticmethod
    def _encode(e: Entry) -> str:
        files = ",".join(f"{n}:{b}" for n, b in e.files) or "-"
        return f"{e.commit} {e.time} {e.agent or '-'} {e.op} {files}\n"

    @staticmethod
    def _decode(line: str) -> Entry:
        commit, t, agent, op, files = line.split(" ")
        fl = () if files.strip() == "-" else tuple(tuple(x.split(":", 1)) for x in files.strip().split(","))
        return Entry(commit, int(t), "" if agent == "-" else agent, op, fl)

    def load(self, head: pygit2.Oid | None) -> None:
        """Load the index file and make it match ``head`` (repairing only the difference)."""
        with self._lock:
            loaded: list[Entry] = []
            torn = False
            if self.path and os.path.exists(self.path):
                try:
                    with open(self.path) as f:
                        for line in f:
                            if line.endswith("\n"):
                                loaded.append(self._decode(line))
                            else:
                                torn = True  # crash mid-append: rewrite without the fragment
                except (OSError, ValueError) as exc:
                    log.warning("history index %s unreadable (%s); rebuilding", self.path, exc)
                    loaded = []
            known = {e.commit: i for i, e in enumerate(loaded)}
            missing: list[pygit2.Commit] = []
            keep = 0
            if head is not None:
                oid = head
                while True:
                    hexid = str(oid)
                    if hexid in known:
                        keep = known[hexid] + 1
                        break
                    commit = self.repo[oid]
                    missing.append(commit)
                    if not commit.parents:
                        keep = 0
                        break
                    oid = commit.parent_ids[0]
            rewrite = torn or keep != len(loaded) or (not loaded and bool(missing))
            self.entries, self._pos, self._by_agent, self._versions, self._last = [], {}, {}, {}, {}
            self._renames = {}
            self._sorted = None
            for e in loaded[:keep]:
                self._add(e)
            for commit in reversed(missing):
                self._add(self._entry_from_commit(commit))
            if missing:
                log.info("history index: %d commit(s) indexed from git", len(missing))
            if self.path and self.writable:
                if rewrite or keep != len(loaded):
                    tmp = self.path + ".tmp"
                    with open(tmp, "w") as f:
                        f.writelines(self._encode(e) for e in self.entries)
                    os.replace(tmp, self.path)
                elif missing:
                    with open(self.path, "a") as f:
                        f.writelines(self._encode(e) for e in self.entries[keep:])
                self._file = open(self.path, "a")

    def replace(self, entries: list[Entry]) -> None:
        """The whole index after a history rewrite (prune): in memory, and the file
        written anew (temporary file + rename; it is repaired from ``main`` on open
        anyway, so a crash on either side of the rename is harmless)."""
        with self._lock:
            self.entries, self._pos, self._by_agent, self._versions, self._last = [], {}, {}, {}, {}
            self._renames = {}
            self._sorted = None
            for e in entries:
                self._add(e)
            if self.path and self.writable:
                if self._file is not None:
                    self._file.close()
                tmp = self.path + ".tmp"
                with open(tmp, "w") as f:
                    f.writelines(self._encode(e) for e in self.entries)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                self._file = open(self.path, "a")

    def advance(self, head: pygit2.Oid) -> tuple[int, bool]:
        """Bring the index up to ``head`` (a replica's fetch moved ``main``): only the
        commits it lacks are read, outside the lock; a rewritten history (a prune on the
        writer) shares no commit with the index and is read anew. Returns how many
        commits were read, and whether entries were dropped (history rewritten)."""
        with self._lock:
            known = dict(self._pos)
        missing: list[pygit2.Commit] = []
        keep = 0
        oid = head
        while True:
            hexid = str(oid)
            if hexid in known:
                keep = known[hexid] + 1
                break
            commit = self.repo[oid]
            missing.append(commit)
            if not commit.parents:
                break
            oid = commit.parent_ids[0]
        new = [self._entry_from_commit(c) for c in reversed(missing)]
        with self._lock:
            rewritten = keep != len(self.entries)
            if rewritten:
                kept = self.entries[:keep]
                self.entries, self._pos, self._by_agent, self._versions, self._last = [], {}, {}, {}, {}
                self._sorted = None
                for e in kept:
                    self._add(e)
            for e in new:
                self._add(e)
        return len(new), rewritten

    def snapshot(self, upto: str | None = None) -> list[Entry]:
        """The entries up to commit ``upto`` (all when None), oldest first."""
        with self._lock:
            if upto is None:
                return list(self.entries)
            pos = self._pos.get(upto)
            return [] if pos is None else self.entries[:pos + 1]

    def append(self, commit: pygit2.Commit, agent: str, op: str, files: dict[str, str]) -> None:
        """Record a commit just made (files: durable name -> blob hex or "-")."""
        e = Entry(str(commit.id), commit.commit_time, agent, op,
                  tuple(sorted((n, b) for n, b in files.items() if n in DURABLE_FILES or n == "@from")))
        with self._lock:
            self._add(e)
            if self._file is not None:
                self._file.write(self._encode(e))

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- queries --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def agent_positions(self, agent: str) -> list[int]:
        return self._by_agent.get(agent, [])

    def name_at(self, agent: str, pos: int) -> str:
        """The id ``agent`` had at position ``pos`` (it may have been moved since)."""
        name = agent
        for mpos, old in reversed(self._renames.get(agent, [])):
            if pos < mpos:
                name = old
        return name

    def position(self, commit_hex: str) -> int | None:
        return self._pos.get(commit_hex)

    def time_ns(self, pos: int) -> int:
        """A commit's time for ``stat`` (mtime of its ``@history`` directory): its commit
        time in seconds, plus its rank among the commits made in that same second as
        nanoseconds, so ``ls -t`` lists commits newest first even within one second."""
        e = self.entries[pos]
        first = bisect.bisect_left(self.entries, e.time, hi=pos, key=lambda x: x.time)
        return e.time * 1_000_000_000 + min(max(pos - first, 0), 999_999_999)

    def newest_ns(self, agent: str | None = None) -> int:
        """Time (see ``time_ns``) of the newest commit, or of ``agent``'s newest; 0 if none."""
        positions = self.agent_positions(agent) if agent else range(len(self.entries))
        return self.time_ns(positions[-1]) if len(positions) else 0

    def past_version(self, agent: str, name: str, blob_hex: str) -> Entry | None:
        """The latest commit where ``agent/name`` had content ``blob_hex``, if any."""
        pos = self._versions.get((agent, name, blob_hex))
        return self.entries[pos] if pos is not None else None

    def last_change(self, agent: str, name: str) -> Entry | None:
        pos = self._last.get((agent, name))
        return self.entries[pos] if pos is not None else None

    def resolve(self, spec: str, agent: str | None = None) -> Entry:
        """Resolve a revision spec, within ``agent``'s commits when given.

        Raises FsError(ENOENT) when nothing matches, FsError(EINVAL) for an ambiguous
        prefix or a malformed spec.
        """
        with self._lock:
            positions = self.agent_positions(agent) if agent is not None else None
            count = len(positions) if positions is not None else len(self.entries)

            def at(i: int) -> Entry:
                return self.entries[positions[i] if positions is not None else i]

            m = _HEAD_N.fullmatch(spec)
            if m:
                n = int(m.group(1) or 0)
                if n >= count:
                    whose = f"agent {agent} has" if agent is not None else "history has"
                    raise FsError(errno.ENOENT, f"{spec}: {whose} only {count} commit(s)")
                return at(count - 1 - n)
            t = parse_time(spec)
            if t is not None:
                lo, hi = 0, count
                while lo < hi:  # last entry with time <= t (times are non-decreasing)
                    mid = (lo + hi) // 2
                    if at(mid).time <= t:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo == 0:
                    whose = f" changing agent {agent}" if agent is not None else ""
                    raise FsError(errno.ENOENT, f"{spec}: no commit{whose} at or before "
                                                f"{iso(t)}" + (f" (the first is {iso(at(0).time)})"
                                                               if count else ""))
                return at(lo - 1)
            if _HEX.fullmatch(spec):
                if len(spec) == 40:
                    pos = self._pos.get(spec)
                    matches = [pos] if pos is not None else []
                else:
                    if self._sorted is None:
                        self._sorted = sorted(self._pos)
                    i = bisect.bisect_left(self._sorted, spec)
                    matches = []
                    while i < len(self._sorted) and self._sorted[i].startswith(spec) and len(matches) < 3:
                        matches.append(self._pos[self._sorted[i]])
                        i += 1
                if positions is not None:
                    allowed = set(positions) if len(matches) else set()
                    matches = [p for p in matches if p in allowed]
                if not matches:
                    raise FsError(errno.ENOENT, f"{spec}: no such commit"
                                  + (f" changing agent {agent}" if agent else ""))
                if len(matches) > 1:
                    raise FsError(errno.EINVAL, f"{spec}: ambiguous commit prefix "
                                  f"({', '.join(self.entries[p].commit[:12] for p in matches)}...)")
                return self.entries[matches[0]]
            raise FsError(errno.ENOENT, f"{safe_text(spec, 80)!r} is not a revision: use a commit id or "
                          f"prefix (>= 4 hex digits), HEAD, HEAD~N or a time ({TIME_FORMS})")
