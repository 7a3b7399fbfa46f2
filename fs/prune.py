"""Retention: rewrite ``main`` into a shorter chain that keeps what a policy promises.

Policy (``agentstatefs prune --keep-last N --keep-days D [ID]``): a commit is kept when
it is one of the newest N commits, or younger than D days (either rule keeps it; a rule
not given keeps nothing by itself). The newest commit is always kept.

- Without ID (the whole repository): the oldest kept commit becomes the root of the new
  chain, with its full tree (the state as of that commit); every commit before it is
  dropped, every commit after it is kept. (Should clock steps have made commit times
  go backwards, a commit between two kept ones is kept too: history stays a chain.)
- With ID (one agent): the rules apply to that agent's commits (its ``Agent:``
  trailer). The agent's commits older than its oldest kept one are dropped, and in every
  commit before that one the agent's directory is removed from the tree: in the
  rewritten history the agent starts at its oldest kept commit. Other agents' commits
  are all kept with their content unchanged; commits before the agent's first
  dropped one keep their ids.

Trees and blobs are shared by the two chains (except the rewritten trees of a
per-agent prune); commit objects are copied byte for byte except their parent line,
so authors, times and messages are unchanged. The newest tree is unchanged: the
current state is identical.

Crash safety: the new chain's objects are written as one fsynced pack, and the switch
is the atomic rename of ``agentstatefs/checkpoint`` naming the new head (recovery
resets ``main`` to the checkpointed commit and replays the journal after it), so a
crash before it recovers the old chain and one after it the new one; the ref and the
history index follow (both are repaired from the checkpoint and ``main`` on open).
See ``Store.finish_prune``; the state manager runs it in the committer (online).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

import pygit2
from pygit2.enums import FileMode, ObjectType

from . import mempack
from .errors import FsError
from .gitstore import _Tree
from .history import Entry
from .layout import fanout
from .names import check_agent_id

log = logging.getLogger(__name__)

DAY = 86400
PAUSE_ENV = "AGENTSTATEFS_PRUNE_PAUSE"   # tests only: seconds to sleep after each step
STEP_ENV = "AGENTSTATEFS_PRUNE_STEPS"    # tests only: a file each finished step is appended to


def pause(step: str) -> None:
    """Crash tests: report each finished step and stretch it, so a kill -9 lands there."""
    steps = os.environ.get(STEP_ENV)
    if steps:
        with open(steps, "a") as f:
            f.write(step + "\n")
    delay = os.environ.get(PAUSE_ENV)
    if delay:
        time.sleep(float(delay))


@dataclass
class Policy:
    keep_last: int | None = None
    keep_days: float | None = None
    agent: str | None = None

    def check(self) -> "Policy":
        if self.keep_last is None and self.keep_days is None:
            raise FsError(errno.EINVAL, "prune needs --keep-last N and/or --keep-days D")
        if self.keep_last is not None and (not isinstance(self.keep_last, int) or isinstance(self.keep_last, bool)
                                           or not 1 <= self.keep_last <= 10**12):
            raise FsError(errno.EINVAL, "--keep-last must be a whole number from 1")
        if self.keep_days is not None:
            if isinstance(self.keep_days, bool) or not isinstance(self.keep_days, (int, float)) \
                    or not 0 <= self.keep_days <= 10**6:
                raise FsError(errno.EINVAL, "--keep-days must be a number of days from 0 to 1000000")
        if self.agent is not None and (not isinstance(self.agent, str) or not _valid_agent(self.agent)):
            raise FsError(errno.EINVAL, "not a valid agent id")
        return self

    def to_json(self) -> dict:
        return {"keep_last": self.keep_last, "keep_days": self.keep_days, "agent": self.agent}

    @classmethod
    def from_json(cls, d: dict) -> "Policy":
        if not isinstance(d, dict) or set(d) - {"keep_last", "keep_days", "agent", "token"}:
            raise FsError(errno.EINVAL, "prune request: unknown fields")
        return cls(d.get("keep_last"), d.get("keep_days"), d.get("agent")).check()


def _valid_agent(agent: str) -> bool:
    try:
        return bool(check_agent_id(agent))
    except FsError:
        return False


def kept_from(times: list[int], policy: Policy, now: float) -> int:
    """Index of the oldest kept item of a list ordered oldest first (len-1 at most)."""
    n = len(times)
    first = n - 1
    if policy.keep_last is not None:
        first = min(first, max(0, n - policy.keep_last))
    if policy.keep_days is not None:
        cutoff = now - policy.keep_days * DAY
        young = next((i for i, t in enumerate(times) if t >= cutoff), n)
        first = min(first, young)
    return max(first, 0)


@dataclass
class Progress:
    phase: str = "planning"
    done: int = 0
    total: int = 0
    kept: int = 0
    dropped: int = 0


def _commit_with_parent(raw: bytes, tree: str | None, parent: str | None) -> bytes:
    """A commit's raw bytes with its parent line (and optionally its tree) replaced."""
    header, sep, message = raw.partition(b"\n\n")
    lines = []
    for line in header.split(b"\n"):
        if line.startswith(b"parent "):
            continue
        if line.startswith(b"tree "):
            lines.append(b"tree " + (tree.encode() if tree else line[5:]))
            if parent:
                lines.append(b"parent " + parent.encode())
            continue
        lines.append(line)
    return b"\n".join(lines) + sep + message


def _hash(kind: int, data: bytes) -> pygit2.Oid:
    header = b"%s %d\x00" % (mempack.TYPE_NAMES[kind], len(data))
    return pygit2.Oid(raw=hashlib.sha1(header + data).digest())


class PruneJob:
    """Builds the new chain for ``policy`` from a snapshot of the commit index.

    ``build(entries)`` may run without any lock (it only reads immutable objects and
    writes new ones to memory); ``extend(entries)`` continues with commits made since,
    under the commit lock. ``objects`` are the new objects, ``entries`` the new index."""

    def __init__(self, repo: pygit2.Repository, policy: Policy, now: float | None = None,
                 on_progress=None):
        self.repo = repo
        self.policy = policy
        self.now = time.time() if now is None else now
        self.progress = Progress()
        self.on_progress = on_progress or (lambda p: None)
        self.objects: dict = {}
        self.entries: list[Entry] = []      # the new index, oldest first
        self.old_head: str | None = None
        self.new_head: str | None = None
        self._parent: str | None = None
        self._cut_pos: int | None = None    # chain position of the oldest kept commit (or the agent's)
        self._pos = 0                       # next chain position to process
        self._rewriting = False             # past the unchanged prefix
        self._root_map: dict[str, str] = {}
        self.noop = False

    # -- planning ------------------------------------------------------------------
    def _plan(self, entries: list[Entry]) -> None:
        p = self.policy
        if p.agent is None:
            self._cut_pos = kept_from([e.time for e in entries], p, self.now) if entries else 0
            self.noop = self._cut_pos == 0
        else:
            mine = [i for i, e in enumerate(entries) if e.agent == p.agent]
            if not mine:
                raise FsError(errno.ENOENT, f"agent {p.agent} has no commits")
            k = kept_from([entries[i].time for i in mine], p, self.now)
            self._cut_pos = mine[k]
            self.noop = k == 0
        self.progress.dropped = (self._cut_pos if p.agent is None
                                 else sum(1 for e in entries[:self._cut_pos] if e.agent == p.agent))

    # -- rewriting -----------------------------------------------------------------
    def _tree_without_agent(self, root_hex: str) -> str | None:
        """The root tree ``root_hex`` without the policy's agent (new objects in memory)."""
        done = self._root_map.get(root_hex)
        if done is not None:
            return done or None
        agent = self.policy.agent
        a, b = fanout(agent)
        root = self.repo[root_hex]
        info0 = {e.name: (int(e.filemode), e.id.raw) for e in root}
        new_root = root_hex
        if a in info0 and info0[a][0] == FileMode.TREE:
            l1 = self.repo[pygit2.Oid(raw=info0[a][1])]
            info1 = {e.name: (int(e.filemode), e.id.raw) for e in l1}
            if b in info1 and info1[b][0] == FileMode.TREE:
                l2 = self.repo[pygit2.Oid(raw=info1[b][1])]
                info2 = {e.name: (int(e.filemode), e.id.raw) for e in l2}
                if agent in info2:
                    t2 = _Tree.build(info2).with_entry(agent, None)
                    t1 = _Tree.build(info1).with_entry(b, self._write_tree(t2))
                    t0 = _Tree.build(info0).with_entry(a, self._write_tree(t1))
                    new_root = str(self._put(ObjectType.TREE, t0.encode()))
        self._root_map[root_hex] = new_root
        return new_root

    def _write_tree(self, tree: _Tree) -> tuple | None:
        if not tree.info:
            return None
        return (int(FileMode.TREE), self._put(ObjectType.TREE, tree.encode()).raw)

    def _put(self, kind: int, data: bytes) -> pygit2.Oid:
        oid = _hash(kind, data)
        self.objects.setdefault(oid, (kind, data))
        return oid

    def _step(self, e: Entry) -> None:
        pos = self._pos
        self._pos += 1
        agent = self.policy.agent
        if agent is None:
            if pos < self._cut_pos:
                return                                   # dropped
            rewrite_tree = False
        else:
            if pos < self._cut_pos and e.agent == agent:
                self._rewriting = True
                return                                   # one of the agent's old versions: dropped
            rewrite_tree = pos < self._cut_pos
            if not self._rewriting:                      # before the first dropped commit: unchanged
                self.entries.append(e)
                self._parent = e.commit
                self.progress.kept += 1
                return
        kind, raw = self.repo.odb.read(pygit2.Oid(hex=e.commit))
        if kind != ObjectType.COMMIT:
            raise FsError(errno.EIO, f"{e.commit} on main is not a commit")
        tree = None
        if rewrite_tree:
            tree = self._tree_without_agent(str(self.repo[e.commit].tree_id))
        new = str(self._put(ObjectType.COMMIT, _commit_with_parent(raw, tree, self._parent)))
        self.entries.append(Entry(new, e.time, e.agent, e.op, e.files))
        self._parent = new
        self.progress.kept += 1

    def _run(self, entries: list[Entry]) -> None:
        last = time.monotonic()
        for e in entries:
            self._step(e)
            self.progress.done += 1
            if time.monotonic() - last > 0.2:
                last = time.monotonic()
                self.on_progress(self.progress)
        self.new_head = self._parent
        if entries:
            self.old_head = entries[-1].commit

    def build(self, entries: list[Entry]) -> None:
        """The new chain for the commits ``entries`` (the whole index up to some head)."""
        self._plan(entries)
        self.progress.phase = "rewriting"
        self.progress.total = len(entries)
        self.on_progress(self.progress)
        if not self.noop:
            self._run(entries)

    def extend(self, entries: list[Entry]) -> None:
        """Commits made after the snapshot ``build`` saw (all kept, trees unchanged)."""
        if self.noop or not entries:
            return
        self.progress.total += len(entries)
        self._run(entries)

    def write_objects(self) -> None:
        """The new objects as one fsynced pack (before the switch)."""
        self.progress.phase = "writing"
        self.on_progress(self.progress)
        mempack.write_pack(self.repo.path, self.objects, durable=True)

    def summary(self) -> dict:
        return {"kept": self.progress.kept, "dropped": self.progress.dropped,
                "old_head": self.old_head, "new_head": self.new_head, "noop": self.noop,
                "policy": self.policy.to_json()}


def record_path(repo_dir: str) -> str:
    return os.path.join(repo_dir, "agentstatefs", "pruned.json")


def write_record(repo_dir: str, summary: dict) -> None:
    """``agentstatefs/pruned.json``: the last prune (old and new head), read by the
    replicator to force-push with lease over the head it had pushed."""
    path = record_path(repo_dir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**summary, "time": time.time()}, f)
    os.replace(tmp, path)


def read_record(repo_dir: str) -> dict | None:
    try:
        with open(record_path(repo_dir)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
