"""The namespace: every path of the mount and what each operation does to it, without FUSE.

Typed nodes, named by inode keys (see inodes.py): the root, agent directories, state
files (durable config/memory, RAM-only runtime.json), scratch nodes and the read-only
history views (historyview.py). Each operation takes a ``Caller`` and plain values
and returns plain ``Attr`` records; ``daemon/operations.py`` only translates to and
from pyfuse3. Tests drive this class in-process, with trio interleavings.

Ownership rules (docs/architecture.md):
- The trio thread owns this object: handles, scratch, runtime, pending creations, the
  inode table and the readers' head. Nothing here takes a lock.
- The committer thread owns the writer's head. Durable changes reach it only as
  intents through ``StateManager.commit``; it resolves them (by file identity, not by
  name) and hands back a durable group that ``publish`` applies here before any
  waiting handler resumes.
- Every ``await`` is a point where any other request may run: state read before an
  ``await`` is re-checked after it (a node may have been unlinked, renamed or
  replaced meanwhile). Each such place says so in a comment ("re-check").
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import trio
import xxhash

from . import changes as ch
from . import heap
from .access import (ACL_XATTR, ACL_XATTRS, DEFAULT_ACL_XATTR, R, W, X, Access, encode_acl, full_acl,
                     inherit, parse_acl, split_acl)
from .changes import Change, Who, safe_text
from .errors import FsError
from .handles import Handle
from .history import iso as history_iso
from .historyview import HistoryView
from .inodes import ROOT, InodeTable
from .names import (DURABLE_FILES, HISTORY_DIR, RUNTIME_FILE, check_agent_id, is_durable,
                    is_reserved, is_state)
from .events import EventHub
from .metrics import metrics
from .monitor import Monitor
from .patch import apply_patch
from .rejected import LAST_ERROR, REJECTED_DIR, Rejections
from .removals import WINDOW, Removal, Removals, tgid_of
from .runtime import RuntimeLayer
from .scratch import ScratchNode, ScratchSpace, new_ino
from .validate import check_json, check_size

log = logging.getLogger("agentstatefs")

LIVE_TIMEOUT = 1.0
RELATIME_NS = 24 * 3600 * 10**9
# Entries a listing may give the kernel without a node when it does not hold them yet
# (``Namespace.listing_without_lookup``): the kinds of which one directory can hold
# 100,000 (agents, and agents at a past commit). All directories: the adapter lists
# them with one directory entry (AgentFS._bare_reply).
NODELESS_KINDS = ("agent", "hist-agent")
INO_MASK = (1 << 63) - 1       # gitstore.hash_ino's
BIG_LISTING = 10_000           # entries: closing such a listing gives its memory back (fs/heap.py)
LINK_MAX = 65000              # hard links per scratch file (ext4's EXT4_LINK_MAX)
HISTORY_READ_PIDS = 1024      # processes remembered as having read @history versions
HISTORY_READS_PER_PID = 64    # versions remembered per process
HISTORY_READ_TTL_NS = 600 * 10**9
OFFLOAD_BYTES = 64 << 10     # validate/read larger contents in a worker thread
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65536
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
IF_VERSION = "user.agentstatefs.if-version"    # compare-and-swap condition on a scratch file
PATCH_DIR = "@patch"                            # M/<id>/@patch/<state>.json: write-only patches
EVENTS_FILE = "@events"                         # M/@events: the change stream
PRUNE_XATTR = "user.agentstatefs.prune"         # set on the root: start a prune (JSON policy)
GC_XATTR = "user.agentstatefs.gc"               # set on the root: start a gc
MAINTENANCE_XATTR = "user.agentstatefs.maintenance"   # the running/last prune or gc (JSON)
REPLICATION_XATTR = "user.agentstatefs.replication"   # replicate=/--replica: lag, errors (JSON)
STATS_FILE = "@stats"                           # M/@stats: metrics as JSON (fs/monitor.py)
METRICS_FILE = "@metrics"                       # M/@metrics: Prometheus text exposition
REPORT_FILES = (STATS_FILE, METRICS_FILE)


def parse_if_version(value: bytes) -> int:
    """The version a compare-and-swap expects: a decimal counter, 0 = "must not exist"."""
    text = bytes(value).strip().decode("ascii", "replace")
    if not text.isdigit() or len(text) > 18:
        raise FsError(errno.EINVAL, f"{IF_VERSION} must be a version number (0 = the file must not "
                                    f"exist yet), not {safe_text(text, 40)!r}")
    return int(text)


@dataclass
class Caller:
    """Who is asking: from the FUSE request context (or a test)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022

    def who(self) -> Who:
        return Who.from_pid(self.uid, self.gid, self.pid)


@dataclass(eq=False)
class Attr:
    """What stat shows, plus how long the kernel may cache it."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int | None = None
    atime_ns: int | None = None
    timeout: float = LIVE_TIMEOUT
    entry_timeout: float | None = None
    generation: int = 0
    blocks: int | None = None     # 512-byte blocks allocated (None: derived from the size)
    shared: bool = False    # one object reused for many listing entries (only ino/generation change)
    listed_only: bool = False   # a listing entry the kernel gets without a node (no lookup reference)
    blob: object = None        # orphans: the version the file had when it lost its name


@dataclass
class PendingFile:
    """A state file created by an open handle and not yet committed (or written)."""

    fid: int
    mode: int
    uid: int
    gid: int
    time_ns: int
    creators: int = 0
    acl: list | None = None
    replace: bool = False   # written again by the process whose removal of the name is parked
    times: dict = field(default_factory=dict)   # mtime_ns/atime_ns set before the first close


class Kernel:
    """Notifications to the kernel's caches; the FUSE adapter supplies the real ones."""

    def invalidate_attr(self, ino: int) -> None:
        pass

    def invalidate_entry(self, parent: int, name: str) -> None:
        pass


@dataclass
class _Dir:
    count: int
    item: object          # i -> (name, key or ino)
    keys: bool = False    # items carry keys (history) rather than inode numbers
    dots: tuple = ()      # inode numbers of "." and "..": listed first, as on ext4
    agents: list | None = None   # root listing: sorted agent ids, entries first_agent.. on
    first_agent: int = 0
    agent: str | None = None   # the agent directory listed (fsyncdir settles its removals)


@dataclass
class _Shared:
    data: bytes
    refs: int = 0


class Namespace:
    def __init__(self, store, statemgr, options, kernel: Kernel | None = None,
                 root_owner: tuple[int, int] | None = None):
        self.store = store
        self.git = store.reader
        self.sm = statemgr
        self.opts = options
        self.kernel = kernel or Kernel()
        self.inodes = InodeTable()
        # Set by the FUSE adapter when its readdir replies can carry entries without a
        # node (Attr.listed_only): listing them then registers nothing.
        self.listing_without_lookup = False
        self.runtime = RuntimeLayer(options.runtime_versions)
        self.scratch = ScratchSpace(options.scratch_max)
        self.rejected = Rejections(self.scratch, options.max_size)
        self.events = EventHub()
        self.monitor = Monitor(self, scan_interval=getattr(options, "stats_interval", 60.0),
                               replication_lag_warn=getattr(options, "replication_lag_warn", 300.0))
        self.buffer_max = getattr(options, "buffer_max", 256 << 20)
        self.buffer_bytes = 0
        self.agent_scratch: dict[str, ScratchNode] = {}
        self.removals = Removals(getattr(options, "removal_window", WINDOW))
        self._removal_wakeup = trio.Event()
        self.pending: dict[tuple[str, str], PendingFile] = {}
        self.handles: dict[int, Handle] = {}
        self.by_ino: dict[int, set[Handle]] = {}
        self.dirs: dict[int, _Dir] = {}
        self.shared: dict[object, _Shared] = {}
        self._next_fh = 0
        self._write_clock = 0
        self.mount_ns = time.time_ns()
        # pid -> {blob hex: (commit, time_ns)}: versions a process opened in @history,
        # so its write of the same bytes is recorded as a restore (a copy out of history).
        self.history_reads: OrderedDict[int, OrderedDict] = OrderedDict()
        self.uid, self.gid = root_owner or (os.getuid(), os.getgid())
        self.root_mode = getattr(options, "root_mode", 0o755)
        self.access = Access(getattr(options, "admin_gid", None))
        self.audit = None        # an AuditLog (fs/audit.py) when mounted with -o audit=PATH
        self.history = HistoryView(store, self.inodes, self.runtime, self._hist_entry, (self.uid, self.gid))
        statemgr.on_publish = self.publish
        statemgr.on_rewrite = self.rewrite

    # -- publishing (committer -> readers) ----------------------------------------------
    def publish(self, group) -> None:
        """Make a durable group visible: readers' head, inode numbers, kernel caches.

        Runs on the trio thread before any handler waiting for this group resumes."""
        before = {}
        for agent in group.views:
            old_view = self.git.agent(agent)
            for name in DURABLE_FILES:
                ino = self.inodes.peek(("state", agent, name))
                if ino is not None:
                    before[ino] = self._orphan_attr(ino, False)
                    if old_view is not None and name in old_view.files:
                        # A reader that looked the name up just before it was replaced
                        # may still open it: it gets this version, as on ext4.
                        before[ino].blob = (old_view.files[name], agent, name)
        self.git.publish(group.head, group.views, group.root)
        moves = {c.move[0]: c.move[1] for _, c, _ in group.made if c.op == ch.MOVE and c.move}
        for agent, view in group.views.items():
            self._rebind_agent(agent, view, before)
            ino = self.inodes.peek(("agent", agent))
            if view is None and agent in moves:
                self._moved_agent(agent, moves[agent], ino)
            elif view is None:
                if ino is not None:
                    self.inodes.retire(ino, ("orphan", self._orphan_attr(ino, True)))
                    self.kernel.invalidate_entry(ROOT, agent)
                s = self.agent_scratch.pop(agent, None)
                if s is not None:
                    self.scratch.release_tree(s)
                self.rejected.drop_agent(agent)
            elif ino is not None:
                self.kernel.invalidate_attr(ino)
        for oid, change, versions in group.made:
            self._emit_commit(oid, change, versions)
            if self.audit is not None:
                self._audit_change(oid, change)

    def _audit_change(self, oid, change: Change) -> None:
        op = change.op
        if op == ch.CHMOD and any(k in a for a in change.attrs.values() for k in ("acl", "default_acl")):
            op = "setfacl"
        common = {"time_ns": change.time_ns, "commit": str(oid) if oid else None,
                  "note": change.note or None}
        if op in (ch.RENAME, ch.EXCHANGE) and change.move:
            src, dst = change.move
            self.audit.record(change.who, op, f"/{change.agent}/{src}", to=f"/{change.agent}/{dst}", **common)
            return
        names = list(change.files) or [k for k in change.attrs if k] or [""]
        for f in names:
            self.audit.record(change.who, op, f"/{change.agent}/{f}" if f else f"/{change.agent}", **common)

    def rewrite(self, summary: dict) -> None:
        """History was rewritten (prune, run in the committer): the readers' head moves
        to the new chain's head (same tree, so every cached agent and file stays valid),
        and kernel entries of ``@history`` names whose commit is gone are dropped (full
        ids are cached for an hour otherwise)."""
        import pygit2
        self.git.move_head(pygit2.Oid(hex=summary["new_head"]))
        index = self.store.history
        for key, _ in self.inodes.keys_of_kind("hist-commit"):
            if index.position(key[3]) is None:
                parent = self.inodes.peek(("hist-root", key[1]))
                if parent is not None:
                    self.kernel.invalidate_entry(parent, key[2])

    def _moved_agent(self, old: str, new: str, ino: int | None) -> None:
        """mv M/old M/new was published: the directory keeps its inode number (the
        kernel moved its dentry), and its RAM parts (scratch, runtime.json) move along,
        as a directory rename takes its whole subtree on ext4."""
        if ino is not None:
            self.inodes.bind(ino, ("agent", new))
            self.kernel.invalidate_entry(ROOT, old)
        s = self.agent_scratch.pop(old, None)
        if s is not None:
            self.agent_scratch[new] = s
        self.runtime.move(old, new)
        rt = self.inodes.peek(("state", old, RUNTIME_FILE))
        if rt is not None:
            self.inodes.bind(rt, ("state", new, RUNTIME_FILE))
        for h in self.handles.values():
            if h.agent == old and h.kind in ("runtime", "patch"):
                h.agent = new
        self.rejected.drop_agent(old)

    def _emit_commit(self, oid, change: Change, versions: dict) -> None:
        w = change.who
        common = {"time_ns": change.time_ns, "commit": oid, "uid": w.uid, "pid": w.pid,
                  "note": change.note or None}
        if change.op in (ch.RENAME, ch.EXCHANGE) and change.move:
            src, dst = change.move
            self.events.emit(change.op, change.agent, dst, version=versions.get(dst), **{"from": src}, **common)
            return
        for f in list(change.files) or [k for k in change.attrs if k] or [None]:
            self.events.emit(change.op, change.agent, f, version=versions.get(f) if f else None, **common)

    def _rebind_agent(self, agent: str, view, before: dict) -> None:
        """Point the agent's state-file names at the files the new head has there.

        A file keeps its number wherever it moved (rename); a number whose file lost
        its name becomes an orphan, and handles on it write nowhere from now on."""
        new = {}
        for n in DURABLE_FILES:
            fid = view.fid(agent, n) if view is not None else None
            p = self.pending.get((agent, n))
            if fid is None and p is not None and view is not None:
                fid = p.fid          # still being created by an open handle: keeps its name
            new[n] = fid
        old = {n: self.inodes.peek(("state", agent, n)) for n in DURABLE_FILES}
        moved = set()
        for name, fid in new.items():
            if fid is not None and old[name] != fid and (self.inodes.has(fid) or fid in self.by_ino):
                self.inodes.bind(fid, ("state", agent, name))
                for h in self.by_ino.get(fid, ()):
                    h.agent, h.name, h.orphan = agent, name, False
                moved.add(fid)
        for name, cur in old.items():
            if cur is not None and cur != new[name] and cur not in moved:
                for h in self.by_ino.get(cur, ()):
                    if h.kind == "state":
                        h.orphan = True
                self.inodes.retire(cur, ("orphan", before.get(cur) or self._orphan_attr(cur, False)))
        agent_ino = self.inodes.peek(("agent", agent))
        for name in DURABLE_FILES:
            if old[name] != new[name] and agent_ino is not None:
                self.kernel.invalidate_entry(agent_ino, name)
            if new[name] is not None:
                self.kernel.invalidate_attr(new[name])

    def _orphan_attr(self, ino: int, is_dir: bool) -> Attr:
        try:
            a = self._attr(ino)
        except FsError:
            a = Attr(ino, (stat.S_IFDIR | 0o755) if is_dir else (stat.S_IFREG | 0o644), 1, 0, 0, 0, 0)
        a.nlink = 0
        return a

    # -- helpers --------------------------------------------------------------------------
    def _fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    def _agent_view(self, agent: str):
        view = self.git.agent(agent)
        if view is None:
            raise FsError(errno.ENOENT, f"agent {agent} does not exist")
        return view

    def _scratch_dir(self, agent: str) -> ScratchNode:
        node = self.agent_scratch.get(agent)
        if node is None:
            node = self.agent_scratch[agent] = self.scratch.new_node(0, stat.S_IFDIR | 0o755, 0, 0, charge=False)
            node.agent = agent
        return node

    def _state_ino(self, agent: str, name: str) -> int | None:
        """The inode number the name ``agent/name`` means now (registered), or None."""
        key = ("state", agent, name)
        if name == RUNTIME_FILE:
            if self.runtime.get(agent) is None and (agent, name) not in self.pending:
                return None
            return self.inodes.stable(key)
        p = self.pending.get((agent, name))
        view = self.git.agent(agent)
        fid = view.fid(agent, name) if view is not None else None
        if fid is None and p is not None:
            fid = p.fid
        if fid is None:
            return None
        if self.inodes.peek(key) != fid:
            self.inodes.bind(fid, key)
        return fid

    def _exists_state(self, agent: str, name: str) -> bool:
        if (agent, name) in self.pending:
            return True
        if name == RUNTIME_FILE:
            return self.runtime.get(agent) is not None
        view = self.git.agent(agent)
        return view is not None and name in view.files

    def _hist_entry(self, ino, mode, nlink, uid, gid, size, mtime_ns, ctime_ns=None, timeout=LIVE_TIMEOUT):
        return Attr(ino, mode, nlink, uid, gid, size, mtime_ns, ctime_ns, timeout=timeout)

    def _writer_size(self, ino: int) -> int | None:
        """Size of the newest write buffer on ``ino``: the writer's view of st_size (so
        ftruncate/append offsets computed by the kernel match its buffer, as on ext4)."""
        best, size = -1, None
        for h in self.by_ino.get(ino, ()):
            if h.buffer is not None and h.dirty and h.gen and h.last_write > best:
                best, size = h.last_write, len(h.buffer)
        return size

    def _attr(self, ino: int) -> Attr:
        key = self.inodes.key(ino)
        kind = key[0]
        gen = self.inodes.generation(ino)
        if kind.startswith("hist-"):
            return self.history.attr(ino, key)
        if kind == "orphan-pending":
            raise FsError(errno.ENOENT, "file was removed")
        if kind in ("patch-dir", "patch"):
            m = self._agent_view(key[1]).meta
            if kind == "patch-dir":
                return Attr(ino, stat.S_IFDIR | (m.get("mode", 0o755) & 0o333 | 0o100), 2, m.get("uid", 0),
                            m.get("gid", 0), 0, self.mount_ns, generation=gen)
            view = self.git.agent(key[1])
            fm = view.file_meta(key[2]) if view is not None and key[2] in view.files else None
            if key[2] == RUNTIME_FILE and self.runtime.get(key[1]) is not None:
                rf = self.runtime.get(key[1])
                fm = {"mode": rf.mode, "uid": rf.uid, "gid": rf.gid}
            src = fm or {"mode": m.get("mode", 0o755), "uid": m.get("uid", 0), "gid": m.get("gid", 0)}
            return Attr(ino, stat.S_IFREG | (src["mode"] & 0o222), 1, src["uid"], src["gid"], 0, self.mount_ns,
                        generation=gen)
        if kind == "rejected-dir":
            m = self._agent_view(key[1]).meta
            return Attr(ino, stat.S_IFDIR | (m.get("mode", 0o755) & 0o555), 2, m.get("uid", 0), m.get("gid", 0),
                        0, self.mount_ns, generation=gen)
        if kind == "rejected":
            e = self.rejected.get(key[1], key[2])
            if e is None:
                raise FsError(errno.ENOENT, f"{key[1]}/{REJECTED_DIR}/{key[2]}: no refused write")
            return Attr(ino, stat.S_IFREG | 0o440, 1, e.who.uid, e.who.gid, len(e.data), e.time_ns,
                        generation=gen)
        if kind == "orphan":
            if key[1] is None:
                raise FsError(errno.ENOENT, "file was removed")
            return key[1]
        if kind == "root":
            return Attr(ROOT, stat.S_IFDIR | self.root_mode, 2, self.uid, self.gid, 0, self.mount_ns)
        if kind == "events":
            return Attr(ino, stat.S_IFREG | 0o444, 1, self.uid, self.gid, 0, self.mount_ns)
        if kind == "report":
            # The size of the newest snapshot (each open generates its own; direct_io).
            return Attr(ino, stat.S_IFREG | 0o444, 1, self.uid, self.gid, self.monitor.report_size(key[1]),
                        time.time_ns(), timeout=0)
        if kind == "agent":
            m = self._agent_view(key[1]).meta
            mtime = max([f.get("mtime_ns", 0) for f in m.get("files", {}).values()] + [m.get("created_ns", 0)])
            return Attr(ino, stat.S_IFDIR | m.get("mode", 0o755), 2, m.get("uid", 0), m.get("gid", 0), 0,
                        mtime, generation=gen)
        if kind == "state":
            agent, name = key[1], key[2]
            a = None
            if name == RUNTIME_FILE:
                rf = self.runtime.get(agent)
                if rf is not None:
                    v = rf.current
                    a = Attr(ino, stat.S_IFREG | rf.mode, 1, rf.uid, rf.gid, len(v.data), v.time_ns)
            else:
                view = self.git.agent(agent)
                fm = view.file_meta(name) if view is not None and name in view.files else None
                if fm is not None:
                    a = Attr(ino, stat.S_IFREG | fm["mode"], 1, fm["uid"], fm["gid"], fm["size"], fm["mtime_ns"],
                             atime_ns=fm.get("atime_ns"))
            if a is None:
                p = self.pending.get((agent, name))
                if p is None:
                    raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
                a = Attr(ino, stat.S_IFREG | p.mode, 1, p.uid, p.gid, 0, p.times.get("mtime_ns", p.time_ns),
                         atime_ns=p.times.get("atime_ns"))
            size = self._writer_size(ino)
            if size is not None:
                a.size = size
            a.generation = gen
            return a
        if kind == "state-new":
            p = self.pending.get((key[1], key[2]))
            if p is None or p.fid != ino:
                raise FsError(errno.ENOENT, f"{key[1]}/{key[2]} does not exist")
            a = Attr(ino, stat.S_IFREG | p.mode, 1, p.uid, p.gid, 0, p.times.get("mtime_ns", p.time_ns),
                     atime_ns=p.times.get("atime_ns"), timeout=0, generation=gen)
            size = self._writer_size(ino)
            if size is not None:
                a.size = size
            return a
        if kind == "scratch":
            n: ScratchNode = key[1]
            return Attr(ino, n.mode, n.nlink, n.uid, n.gid, n.size, n.mtime_ns, n.ctime_ns, n.atime_ns,
                        generation=gen, blocks=(n.alloc + 511) // 512)
        raise FsError(errno.ENOENT, f"unknown inode {ino}")

    def _listing_attr(self, ino: int) -> Attr:
        """Attributes for readdir. An agent not in the cache (or an agent at a past
        commit) is not loaded just to be listed (``ls`` of 100,000 agents): it gets
        directory attributes the kernel must not cache (timeouts 0), so ``stat``/``ls -l``
        still ask getattr for the truth."""
        key = self.inodes.key(ino)
        if (key[0] == "agent" and self.git.cached_agent(key[1]) is None) or key[0] == "hist-agent":
            # Listing every agent at a past commit would otherwise read each one's tree
            # and meta.json (100,000 agents: minutes).
            return Attr(ino, stat.S_IFDIR | 0o755, 2, 0, 0, 0, self.mount_ns, timeout=0)
        return self._attr(ino)

    def _child(self, parent: int, name: str) -> tuple[int, float | None]:
        """Inode of ``name`` in directory ``parent`` (registered, lookup count untouched)
        and the entry timeout to use when it differs from the inode's attribute timeout."""
        key = self.inodes.key(parent)
        kind = key[0]
        if kind.startswith("hist-"):
            return self.history.child(key, name)
        if kind == "rejected-dir":
            if not is_state(name) or self.rejected.get(key[1], name) is None:
                raise FsError(errno.ENOENT, f"{key[1]}/{REJECTED_DIR}/{name}: no refused write")
            return self.inodes.stable(("rejected", key[1], name)), None
        if kind == "patch-dir":
            self._agent_view(key[1])
            if not is_state(name):
                raise FsError(errno.ENOENT, f"{key[1]}/{PATCH_DIR}/{name}: only state files take patches")
            return self.inodes.stable(("patch", key[1], name)), None
        if name == PATCH_DIR and kind == "agent":
            self._agent_view(key[1])
            return self.inodes.stable(("patch-dir", key[1])), None
        if name == REJECTED_DIR and kind == "agent":
            self._agent_view(key[1])
            return self.inodes.stable(("rejected-dir", key[1])), None
        if name == HISTORY_DIR and kind in ("root", "agent"):
            if kind == "agent":
                self._agent_view(key[1])
            return self.inodes.stable(("hist-root", key[1] if kind == "agent" else "")), None
        if kind == "root" and name == EVENTS_FILE:
            return self.inodes.stable(("events",)), None
        if kind == "root" and name in REPORT_FILES:
            return self.inodes.stable(("report", name)), None
        if kind == "root":
            if is_reserved(name) or self.git.agent(name) is None:
                raise FsError(errno.ENOENT, f"agent {name} does not exist")
            return self.inodes.stable(("agent", name)), None
        if kind == "agent":
            agent = key[1]
            self._agent_view(agent)
            if is_state(name):
                ino = self._state_ino(agent, name)
                if ino is None:
                    raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
                return ino, None
            node = self._scratch_dir(agent).children.get(name)
        elif kind == "scratch" and key[1].is_dir:
            node = key[1].children.get(name)
        else:
            raise FsError(errno.ENOTDIR, "not a directory")
        if node is None:
            raise FsError(errno.ENOENT, f"{name} does not exist")
        self.inodes.bind(node.ino, ("scratch", node))
        return node.ino, None

    def _parent_dir(self, parent: int) -> tuple[str, str | None, ScratchNode | None]:
        """Classify a parent directory: ("root"|"agent"|"scratch", agent, scratch dir node)."""
        key = self.inodes.key(parent)
        if key[0].startswith("hist-"):
            raise FsError(errno.EROFS, "history is read-only")
        if key[0] == "rejected-dir":
            raise FsError(errno.EROFS, f"{REJECTED_DIR} is read-only")
        if key[0] == "patch-dir":
            raise FsError(errno.EPERM, f"{PATCH_DIR} takes patches of config.json, memory.json and runtime.json only")
        if key[0] == "root":
            return "root", None, None
        if key[0] == "agent":
            self._agent_view(key[1])
            return "agent", key[1], self._scratch_dir(key[1])
        if key[0] == "scratch" and key[1].is_dir:
            if key[1].nlink == 0:
                raise FsError(errno.ENOENT, "directory was removed")
            return "scratch", None, key[1]
        if key[0] == "orphan":
            raise FsError(errno.ENOENT, "directory was removed")
        raise FsError(errno.ENOTDIR, "not a directory")

    async def _commit(self, change: Change):
        return await self.sm.commit(change)

    async def _validate(self, agent: str, name: str, data: bytes) -> None:
        check_size(len(data), self.opts.max_size)
        try:
            if len(data) > OFFLOAD_BYTES:
                await trio.to_thread.run_sync(check_json, data)
            else:
                check_json(data)
        except FsError as exc:
            raise FsError(exc.errno, f"{agent}/{name}: {exc.reason}") from None

    async def _save(self, agent: str, name: str, data: bytes, who: Who, *, attrs: dict | None = None,
                    fid: int | None = None, create: bool = False, replace: bool = False,
                    rtfile=None, expect: int | None = None, origin: int | None = None):
        """Validate and store new content of a state file (durable: an intent for the
        committer; runtime: RAM). Returns the store's result (ORPHAN: went nowhere).

        ``expect`` is compare-and-swap: ESTALE unless the file's version is that number
        (0: it must not exist), checked by the store atomically with the commit.
        Refused content is kept in ``@rejected`` (provisionally when ``origin``, the
        handle whose close this is, may still commit later)."""
        try:
            await self._validate(agent, name, data)
        except FsError as exc:
            self._reject(agent, name, data, who, exc, origin)
            raise
        # re-check: the agent may have been removed while we validated.
        self._agent_view(agent)
        if name == RUNTIME_FILE:
            cur = self.runtime.get(agent)
            if rtfile is not None and cur is not rtfile:
                return ch.ORPHAN       # runtime.json was removed after this handle opened it
            if expect is not None:
                # No await between this check and the put: atomic on the trio thread.
                have = cur.current.version if cur is not None else 0
                if have != expect:
                    raise FsError(errno.ESTALE, f"{agent}/{name} is at version {have}, not {expect}")
            fresh = cur is None
            self._store_runtime(agent, data, who, (attrs or {}).get("mode", 0o644))
            if fresh and (attrs or {}).get("acl") and self.runtime.get(agent) is not None:
                self.runtime.get(agent).acl = attrs["acl"]
            return None
        change = Change(ch.WRITE, agent, who, time.time_ns(), files={name: data},
                        attrs={name: attrs} if attrs else {},
                        fids={name: fid} if fid is not None else {}, create=create, replace=replace,
                        expect_version={name: expect} if expect is not None else {},
                        sources=self._history_sources(who.pid))
        return await self._commit(change)

    def _note_history_read(self, pid: int, key: tuple) -> None:
        """Remember that ``pid`` opened a past version (bounded: pids and versions LRU)."""
        src = self.history.source(key)
        if src is None or pid <= 0:
            return
        blob, commit = src
        reads = self.history_reads.pop(pid, None) or OrderedDict()
        self.history_reads[pid] = reads
        reads.pop(blob, None)
        reads[blob] = (commit, time.monotonic_ns())
        while len(reads) > HISTORY_READS_PER_PID:
            reads.popitem(last=False)
        while len(self.history_reads) > HISTORY_READ_PIDS:
            self.history_reads.popitem(last=False)

    def _history_sources(self, pid: int) -> dict[str, str]:
        """Versions ``pid`` read from @history in the last minutes: blob hex -> commit."""
        reads = self.history_reads.get(pid)
        if not reads:
            return {}
        now = time.monotonic_ns()
        return {b: c for b, (c, t) in reads.items() if now - t < HISTORY_READ_TTL_NS}

    def _store_runtime(self, agent: str, data: bytes, who: Who, mode: int) -> None:
        now = time.time_ns()
        v = self.runtime.put(agent, data, who, now, mode=mode)
        ino = self.inodes.stable(("state", agent, RUNTIME_FILE))
        self.kernel.invalidate_attr(ino)
        if v is not None:
            self.events.emit(ch.WRITE, agent, RUNTIME_FILE, time_ns=now, version=v.version, uid=who.uid,
                             pid=who.pid)
            if self.audit is not None:
                self.audit.record(who, ch.WRITE, f"/{agent}/{RUNTIME_FILE}", time_ns=now)

    def _reject(self, agent: str, name: str, data: bytes, who: Who, exc: FsError, origin: int | None) -> None:
        """A refused write of ``agent/name``: keep it in ``@rejected`` (RAM)."""
        self.rejected.record(agent, name, data, exc, who, time.time_ns(), fh=origin)
        ino = self.inodes.peek(("rejected", agent, name))
        if ino is not None:
            self.kernel.invalidate_attr(ino)
        if origin is None:
            self._rejected_final(agent, name, self.rejected.get(agent, name))

    def _rejected_final(self, agent: str, name: str, e) -> None:
        """A refusal that stands: on the change stream."""
        if e is not None:
            metrics.refused_writes.labels(errno=errno.errorcode.get(e.errno, str(e.errno))).inc()
            self.events.emit("rejected", agent, name, time_ns=e.time_ns, uid=e.who.uid, pid=e.who.pid,
                             reason=e.reason, errno=errno.errorcode.get(e.errno, str(e.errno)))
            if self.audit is not None:
                self.audit.record(e.who, ch.WRITE, f"/{agent}/{name}", e.errno, time_ns=e.time_ns, reason=e.reason)

    # -- parked removals (fs/removals.py) --------------------------------------------------
    def _hidden(self, agent: str | None, name: str, caller: Caller | None) -> bool:
        """Has ``caller``'s process a parked removal of ``agent/name`` (so, to it, the name is gone)?"""
        return (caller is not None and agent is not None and len(self.removals) > 0
                and self.removals.owned(agent, name, caller.pid) is not None)

    def _park_removal(self, agent: str, name: str, fid: int, caller: Caller) -> Removal:
        """Unlink (or rename away) of a durable state file: parked, not committed yet.

        Handles open on the file now write nowhere, as after an unlink on ext4; the
        committed version stays visible to every other process."""
        for h in self.by_ino.get(fid, ()):
            if h.kind == "state":
                h.orphan = True
        r = self.removals.park(agent, name, fid, caller.pid, caller.who())
        self._removal_wakeup.set()
        return r

    async def _settle_removal(self, r: Removal) -> None:
        """Commit a parked removal as a "delete" (if it is still parked)."""
        if self.removals.get(r.agent, r.name) is not r:
            return
        if r.settling is not None:
            await r.settling.wait()      # another request is committing it
            return
        if r.refused:
            self._undo_removal(r.agent, r.name)
            return
        # It stays parked (the name still gone for its remover) until the delete is published.
        r.settling = trio.Event()
        try:
            await self._commit(Change(ch.DELETE, r.agent, r.who, r.time_ns, files={r.name: None}))
        except FsError as exc:
            # Gone already (rmdir, a rename away by another process): nothing to remove.
            (log.debug if exc.errno == errno.ENOENT else log.warning)(
                "parked removal of %s/%s not committed: %s", r.agent, r.name, exc.reason)
        finally:
            # re-check: folded or parked anew meanwhile?
            if self.removals.get(r.agent, r.name) is r:
                self.removals.pop(r.agent, r.name)
            r.settling.set()

    def _fold_removal(self, agent: str, name: str) -> None:
        """The name was written again: its parked removal is part of that write."""
        self.removals.pop(agent, name)

    def _undo_removal(self, agent: str, name: str) -> None:
        """The re-written content was refused: the previous version stays under its name."""
        if self.removals.pop(agent, name) is not None:
            log.info("%s/%s: the new content was refused; the previous version is kept", agent, name)
            ino = self.inodes.peek(("agent", agent))
            if ino is not None:
                self.kernel.invalidate_entry(ino, name)

    async def _settle_dead(self, agent: str, name: str | None = None) -> None:
        """Commit the parked removals in ``agent`` whose process has exited (another
        process is looking: it must see what the finished program left)."""
        for r in self.removals.of_agent(agent):
            if (name is None or r.name == name) and not r.owner_alive():
                await self._settle_removal(r)

    async def settle_removals(self, agent: str | None = None) -> None:
        """Commit every parked removal (of ``agent``): fsync of the directory, rmdir,
        reading the head, unmount."""
        for r in (self.removals.of_agent(agent) if agent is not None else self.removals.all()):
            await self._settle_removal(r)

    def _recreating(self, r: Removal) -> bool:
        p = self.pending.get((r.agent, r.name))
        return p is not None and p.replace and p.creators > 0

    async def run_removals(self) -> None:
        """Background task: commit parked removals whose window passed (a file being
        written again by its remover waits for that close)."""
        while True:
            self._removal_wakeup = trio.Event()
            nxt = self.removals.next_deadline()
            if nxt is None:
                await self._removal_wakeup.wait()
                continue
            delay = nxt - time.monotonic()
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._removal_wakeup.wait()
                continue
            now = time.monotonic()
            for r in self.removals.all():
                if r.deadline > now or r.settling is not None:
                    continue
                if self._recreating(r):
                    r.deadline = now + self.removals.window
                    continue
                try:
                    await self._settle_removal(r)
                except Exception:
                    log.exception("committing the removal of %s/%s failed", r.agent, r.name)

    # -- shared version bytes and write buffers ----------------------------------------------
    async def _acquire(self, agent: str, name: str) -> tuple[bytes, object, object]:
        """Current content of a state file for a new handle: (bytes, blob id, runtime file).

        Readers of one durable version share one bytes object."""
        if name == RUNTIME_FILE:
            rf = self.runtime.get(agent)
            if rf is not None:
                return rf.current.data, None, rf
            if (agent, name) in self.pending:
                return b"", None, None
            raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
        view = self.git.agent(agent)
        if view is None or name not in view.files:
            if (agent, name) in self.pending:
                return b"", None, None
            raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
        oid = view.files[name]
        s = self.shared.get(oid)
        if s is None or self.git.codec.encrypted:
            # Encrypted store: each place opens its blob itself (a blob-cache hit after the
            # first time), so a sealed blob moved to another agent or file is refused there
            # even while its own place has it open.
            fm = view.file_meta(name) or {}
            if fm.get("size", 0) > OFFLOAD_BYTES:
                data = await trio.to_thread.run_sync(self.git.read_blob, oid, agent, name)
            else:
                data = self.git.read_blob(oid, agent, name)
            s = self.shared.get(oid)       # re-check: another open may have read it meanwhile
            if s is None:
                s = self.shared[oid] = _Shared(data)
        s.refs += 1
        return s.data, oid, None

    def _durable_size(self, agent: str, name: str) -> int:
        """Size of a durable state file's committed version (0 while it is being
        created); ENOENT as ``_acquire``. Unknown (no size recorded): 1."""
        view = self.git.agent(agent)
        if view is None or name not in view.files:
            if (agent, name) in self.pending:
                return 0
            raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
        return (view.file_meta(name) or {}).get("size", 1)

    def _unshare(self, oid) -> None:
        s = self.shared.get(oid)
        if s is not None:
            s.refs -= 1
            if s.refs <= 0:
                del self.shared[oid]

    def _grow_buffer(self, h: Handle, new_len: int) -> None:
        old = len(h.buffer) if h.buffer is not None else 0
        grow = new_len - old
        if grow > 0 and self.buffer_bytes + grow > self.buffer_max:
            raise FsError(errno.ENOSPC, f"{h.agent}/{h.name}: write buffers of open files are full "
                                        f"({self.buffer_bytes} of {self.buffer_max} bytes)")
        self.buffer_bytes += grow

    def _ensure_buffer(self, h: Handle) -> bytearray:
        if h.buffer is None:
            self._grow_buffer(h, len(h.snapshot))
            h.buffer = bytearray(h.snapshot)
        return h.buffer

    def _drop_buffer(self, h: Handle) -> None:
        if h.buffer is not None:
            self.buffer_bytes -= len(h.buffer)
            h.buffer = None
        h.dirty = False

    def _touch(self, h: Handle) -> None:
        self._write_clock += 1
        h.gen += 1
        h.last_write = self._write_clock
        h.dirty = True

    def _add_handle(self, h: Handle) -> None:
        self.handles[h.fh] = h
        self.by_ino.setdefault(h.ino, set()).add(h)

    # -- lifecycle -------------------------------------------------------------------------
    def forget(self, inode_list) -> None:
        for ino, n in inode_list:
            self.inodes.forget(ino, n, keep=lambda i: bool(self.by_ino.get(i)))

    def remember(self, ino: int) -> None:
        self.inodes.remember(ino)

    # -- permissions (fs/access.py; docs/security.md) --------------------------------------
    # The mount has no default_permissions: every check is made here, so every denial is
    # seen (audit log) and history can be held to today's permissions as well as its own.
    @staticmethod
    def _meta_perm(m: dict, default_mode: int = 0o755) -> tuple:
        return (m.get("mode", default_mode), m.get("uid", 0), m.get("gid", 0), m.get("acl"))

    def _agent_perm(self, agent: str) -> tuple | None:
        """Today's agent directory as a Perm, None if the agent does not exist."""
        view = self.git.agent(agent)
        return self._meta_perm(view.meta) if view is not None else None

    def _file_perm(self, agent: str, name: str) -> tuple | None:
        """Today's state file (durable, runtime or being created) as a Perm, or None."""
        if name == RUNTIME_FILE:
            rf = self.runtime.get(agent)
            if rf is not None:
                return (rf.mode, rf.uid, rf.gid, rf.acl)
        else:
            view = self.git.agent(agent)
            fm = view.file_meta(name) if view is not None and name in view.files else None
            if fm is not None:
                return (fm["mode"], fm["uid"], fm["gid"], fm.get("acl"))
        p = self.pending.get((agent, name))
        if p is not None:
            return (p.mode, p.uid, p.gid, p.acl)
        return None

    @staticmethod
    def _scratch_perm(node: ScratchNode) -> tuple:
        ext = None
        raw = node.xattrs.get(ACL_XATTR)
        if raw is not None:
            try:
                ext = split_acl(parse_acl(raw), node.mode)[1]
            except FsError:
                ext = None
        return (stat.S_IMODE(node.mode), node.uid, node.gid, ext)

    def _perms(self, key: tuple) -> tuple[list, list]:
        """(what the object itself grants, the directories it is reached through, which
        must grant search): every Perm in a list must allow the access. A past version
        is held to today's agent directory and file as well as to its own."""
        kind = key[0]
        if kind == "root":
            return [(self.root_mode, self.uid, self.gid, None)], []
        if kind == "agent":
            p = self._agent_perm(key[1])
            return ([p] if p else []), []
        if kind == "state":
            agent, name = key[1], key[2]
            view = self.git.agent(agent)       # one cache lookup for both (the hot path)
            if view is None:
                return [], []
            m = view.meta
            ap = (m.get("mode", 0o755), m.get("uid", 0), m.get("gid", 0), m.get("acl"))
            fm = m.get("files", {}).get(name) if name != RUNTIME_FILE and name in view.files else None
            fp = (fm["mode"], fm["uid"], fm["gid"], fm.get("acl")) if fm else self._file_perm(agent, name)
            return ([fp] if fp else []), [ap]
        if kind == "scratch":
            node = key[1]
            ap = self._agent_perm(node.agent) if node.agent else None
            return [self._scratch_perm(node)], ([ap] if ap else [])
        if kind == "events":
            return [(0o444, self.uid, self.gid, None)], []
        if kind in ("patch-dir", "rejected-dir"):
            p = self._agent_perm(key[1])
            return ([p] if p else []), []
        if kind == "patch":
            fp, ap = self._file_perm(key[1], key[2]), self._agent_perm(key[1])
            return [fp or ap] if (fp or ap) else [], ([ap] if ap else [])
        if kind == "rejected":
            e = self.rejected.get(key[1], key[2])
            fp, ap = self._file_perm(key[1], key[2]), self._agent_perm(key[1])
            own = [(0o440, e.who.uid, e.who.gid, None)] if e is not None else []
            return own + ([fp] if fp else []), ([ap] if ap else [])
        if kind.startswith("hist-"):
            return self._hist_perms(key)
        return [], []

    def _hist_perms(self, key: tuple) -> tuple[list, list]:
        kind = key[0]
        today = self._agent_perm
        if kind == "hist-root":
            if key[1]:
                t = today(key[1])
                return ([t] if t else []), ([t] if t else [])
            return [(0o555, self.uid, self.gid, None)], []
        if kind == "hist-commit":
            _, scope, _used, hexid = key
            if not scope:
                return [(0o555, self.uid, self.gid, None)], []
            t = today(scope)
            past = self.git.agent_at(hexid, scope)
            own = ([t] if t else []) + ([self._meta_perm(past.meta)] if past is not None else [])
            return own, ([t] if t else [])
        if kind == "hist-agent":
            _, _used, hexid, agent = key
            t = today(agent)
            past = self.git.agent_at(hexid, agent)
            return ([self._meta_perm(past.meta)] if past is not None else []) + ([t] if t else []), []
        if kind == "hist-file":
            _, hexid, agent, name = key
            past = self.git.agent_at(hexid, agent)
            fm = past.file_meta(name) if past is not None else None
            t, tf = today(agent), self._file_perm(agent, name)
            own = ([(fm["mode"], fm["uid"], fm["gid"], fm.get("acl"))] if fm else []) + ([tf] if tf else [])
            via = ([self._meta_perm(past.meta)] if past is not None else []) + ([t] if t else [])
            return own, via
        if kind == "hist-runtime":
            t = today(key[1])
            return ([t] if t else []), ([t] if t else [])
        if kind == "hist-rt":
            t, tf = today(key[1]), self._file_perm(key[1], RUNTIME_FILE)
            return ([tf] if tf else []), ([t] if t else [])
        return [], []

    def _path(self, key: tuple, name: str | None = None) -> str:
        """The path of an object (and optionally a name in it), for the audit log."""
        kind = key[0]
        if kind == "root":
            base = ""
        elif kind == "agent":
            base = f"/{key[1]}"
        elif kind in ("state",):
            base = f"/{key[1]}/{key[2]}"
        elif kind == "scratch":
            base = f"/{key[1].agent or '?'}/..."
        elif kind == "events":
            base = f"/{EVENTS_FILE}"
        elif kind == "patch-dir":
            base = f"/{key[1]}/{PATCH_DIR}"
        elif kind == "patch":
            base = f"/{key[1]}/{PATCH_DIR}/{key[2]}"
        elif kind == "rejected-dir":
            base = f"/{key[1]}/{REJECTED_DIR}"
        elif kind == "rejected":
            base = f"/{key[1]}/{REJECTED_DIR}/{key[2]}"
        elif kind == "hist-root":
            base = f"/{key[1]}/{HISTORY_DIR}" if key[1] else f"/{HISTORY_DIR}"
        elif kind == "hist-commit":
            base = f"/{key[1]}/{HISTORY_DIR}/{key[2]}" if key[1] else f"/{HISTORY_DIR}/{key[2]}"
        elif kind == "hist-agent":
            base = f"/{HISTORY_DIR}/{key[1]}/{key[3]}"
        elif kind == "hist-file":
            base = f"/{HISTORY_DIR}/{key[1]}/{key[2]}/{key[3]}"
        elif kind == "hist-runtime":
            base = f"/{key[1]}/{HISTORY_DIR}/runtime"
        elif kind == "hist-rt":
            base = f"/{key[1]}/{HISTORY_DIR}/runtime/{key[2]}.json"
        else:
            base = "/?"
        if name is not None:
            return f"{base}/{name}"
        return base or "/"

    def _deny(self, caller: Caller, op: str, path: str, err: int = errno.EACCES, why: str = "permission denied"):
        metrics.denials.labels(op=op).inc()
        if self.audit is not None:
            self.audit.record(caller.who(), op, path, err, denied=True)
        raise FsError(err, f"{path}: {why} (uid {caller.uid})")

    def _check(self, caller: Caller, key: tuple, want: int, op: str, name: str | None = None) -> None:
        """EACCES (audited) unless the caller may ``want`` (R|W|X) on the object ``key``
        and search the directories it is reached through. Root passes at once; group
        membership is looked up only when a decision depends on it."""
        if caller.uid == 0:
            return
        own, via = self._perms(key)
        acc = self.access
        if (via and not acc.allowed(caller, via, X)) or (want and own and not acc.allowed(caller, own, want)):
            self._deny(caller, op, self._path(key, name))

    def may(self, ino: int, mode: int, caller: Caller) -> bool:
        """access(2): may the caller ``mode`` (R_OK|W_OK|X_OK bits, 0 = exists)?"""
        key = self.inodes.key(ino)
        if caller.uid == 0:
            return True
        own, via = self._perms(key)
        if via and not self.access.allowed(caller, via, X):
            return False
        if mode & W and (key[0].startswith("hist-") or key[0] in ("rejected", "rejected-dir")):
            return True      # writes fail with EROFS, not EACCES
        return not (mode and own and not self.access.allowed(caller, own, mode & 7))

    def _check_sticky(self, caller: Caller, dir_perm: tuple, owner: int | None, op: str, path: str) -> None:
        """In a sticky directory (root_mode=1777) only the owner of an entry, of the
        directory, or a privileged caller may remove or rename it (as in /tmp): EPERM."""
        if owner is None or not dir_perm[0] & stat.S_ISVTX or caller.uid in (0, owner, dir_perm[1]):
            return
        if not self.access.privileged(caller):
            self._deny(caller, op, path, errno.EPERM, "sticky directory: not the owner")

    def _entry_owner(self, where: str, agent: str | None, sdir, name: str) -> int | None:
        """The owner of entry ``name`` in a directory (for the sticky rule), None if absent."""
        if where == "root":
            p = self._agent_perm(name)
            return p[1] if p else None
        if where == "agent" and is_state(name):
            fp = self._file_perm(agent, name)
            return fp[1] if fp else None
        node = sdir.children.get(name) if sdir is not None else None
        return node.uid if node is not None else None

    def _dir_perm(self, parent: int) -> tuple:
        own, _ = self._perms(self.inodes.key(parent))
        return own[0] if own else (0o755, 0, 0, None)

    def _check_remove(self, caller: Caller, parent: int, where: str, agent, sdir, name: str, op: str) -> None:
        """Write and search on the directory, and the sticky rule, to remove or replace ``name``."""
        key = self.inodes.key(parent)
        self._check(caller, key, W | X, op, name)
        if caller.uid != 0:
            self._check_sticky(caller, self._dir_perm(parent), self._entry_owner(where, agent, sdir, name),
                               op, self._path(key, name))

    def _audit(self, caller: Caller, op: str, path: str, err: int = 0) -> None:
        if self.audit is not None:
            self.audit.record(caller.who(), op, path, err)

    # -- lookup & attributes -----------------------------------------------------------------
    async def lookup(self, parent: int, name: str, caller: Caller) -> Attr:
        if caller.uid != 0:
            self._check(caller, self.inodes.key(parent), X, "lookup", name)
        if len(self.removals) > 0:
            key = self.inodes.key(parent)
            r = self.removals.get(key[1], name) if key[0] == "agent" else None
            if r is not None:
                return await self._lookup_removed(r, caller)
        ino, entry_timeout = self._child(parent, name)
        attr = self._attr(ino)
        if entry_timeout is not None:
            attr.entry_timeout = entry_timeout
        self.inodes.remember(ino)
        return attr

    async def _lookup_removed(self, r: Removal, caller: Caller) -> Attr:
        """A name whose removal is parked: gone for its remover (or its re-creation),
        the committed version for everyone else. Never cached by the kernel, so each
        process asks again."""
        agent, name = r.agent, r.name
        if r.owner == tgid_of(caller.pid):
            p = self.pending.get((agent, name))
            if p is None or not p.replace:
                raise FsError(errno.ENOENT, f"{agent}/{name} was removed")
            ino = p.fid
        else:
            if not r.owner_alive():
                await self._settle_removal(r)
            # re-check: the removal may have been committed (or folded) meanwhile.
            self._agent_view(agent)
            ino = self._state_ino(agent, name)
            if ino is None:
                raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
        attr = self._attr(ino)
        attr.entry_timeout = 0
        attr.timeout = 0
        self.inodes.remember(ino)
        return attr

    async def getattr(self, ino: int, caller: Caller) -> Attr:
        return self._attr(ino)

    async def setattr(self, ino: int, caller: Caller, *, size=None, mode=None, uid=None, gid=None,
                      atime_ns=None, mtime_ns=None, fh=None) -> Attr:
        key = self.inodes.key(ino)
        kind = key[0]
        if kind.startswith("hist-"):
            raise FsError(errno.EROFS, "history is read-only")
        if kind in ("rejected-dir", "rejected"):
            raise FsError(errno.EROFS, f"{REJECTED_DIR} is read-only")
        if caller.uid != 0 and kind not in ("orphan", "orphan-pending"):
            self._check_setattr(caller, key, size, mode, uid, gid, atime_ns, mtime_ns, fh)
        if kind == "events":
            if size is not None or mode is not None or uid is not None or gid is not None:
                raise FsError(errno.EPERM, f"{EVENTS_FILE} is the change stream")
            return self._attr(ino)
        if kind == "report":
            if size is not None or mode is not None or uid is not None or gid is not None:
                raise FsError(errno.EPERM, f"{key[1]} is read-only")
            return self._attr(ino)
        if kind in ("patch-dir", "patch"):
            if mode is not None or uid is not None or gid is not None:
                raise FsError(errno.EPERM, f"{PATCH_DIR} takes the state file's owner and mode")
            h = self.handles.get(fh) if fh else None
            if size is not None and h is not None and h.kind == "patch":
                self._truncate_handle(h, size)
            return self._attr(ino)
        if kind in ("orphan", "orphan-pending"):
            h = self.handles.get(fh) if fh else None
            if h is None:
                raise FsError(errno.ENOENT, "file was removed")
            if size is not None and h.kind in ("state", "runtime") and h.writable:
                self._truncate_handle(h, size)
            return self._attr(ino)
        if kind == "root":
            if size is not None:
                raise FsError(errno.EISDIR, "is a directory")
            cur = self._attr(ino)
            if (mode is not None and stat.S_IMODE(mode) != stat.S_IMODE(cur.mode)) \
                    or (uid is not None and uid != cur.uid) or (gid is not None and gid != cur.gid):
                raise FsError(errno.EPERM, "the mount root's attributes are fixed")
            return cur
        if kind == "scratch":
            node: ScratchNode = key[1]
            if size is not None:
                if node.is_dir:
                    raise FsError(errno.EISDIR, "is a directory")
                self.scratch.resize(node, size)
            if mode is not None:
                node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            if uid is not None:
                node.uid = uid
            if gid is not None:
                node.gid = gid
            if atime_ns is not None:
                node.atime_ns = atime_ns
            if mtime_ns is not None:
                node.mtime_ns = mtime_ns
            if atime_ns is not None or mtime_ns is not None:
                node.user_times = True
            node.ctime_ns = time.time_ns()
            return self._attr(ino)
        upd = {k: v for k, v in (("mode", None if mode is None else stat.S_IMODE(mode)),
                                 ("uid", uid), ("gid", gid)) if v is not None}
        if kind == "agent":
            if size is not None:
                raise FsError(errno.EISDIR, "is a directory")
            if upd:
                op = ch.CHOWN if ("uid" in upd or "gid" in upd) else ch.CHMOD
                await self._commit(Change(op, key[1], caller.who(), time.time_ns(), attrs={"": upd}))
            return self._attr(ino)
        agent, name = key[1], key[2]
        if size is not None:
            check_size(size, self.opts.max_size)       # before anything is allocated
            h = self.handles.get(fh) if fh else None
            if h is not None and h.kind in ("state", "runtime") and h.writable and h.ino == ino:
                self._truncate_handle(h, size)
            else:
                data, oid, rf = await self._acquire(agent, name)
                try:
                    new = data[:size] + bytes(max(0, size - len(data)))
                    if new != data:
                        await self._save(agent, name, new, caller.who(), fid=ino if is_durable(name) else None,
                                         rtfile=rf)
                finally:
                    if oid is not None:
                        self._unshare(oid)
        p = self.pending.get((agent, name))
        creating = p is not None and p.fid == ino and (p.replace or not self._committed(agent, name))
        if upd:
            if creating:
                p.mode, p.uid, p.gid = upd.get("mode", p.mode), upd.get("uid", p.uid), upd.get("gid", p.gid)
            elif name == RUNTIME_FILE:
                rf = self.runtime.get(agent)
                if rf is None:
                    raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
                rf.mode, rf.uid, rf.gid = upd.get("mode", rf.mode), upd.get("uid", rf.uid), upd.get("gid", rf.gid)
                self.kernel.invalidate_attr(ino)
                self._audit(caller, ch.CHOWN if ("uid" in upd or "gid" in upd) else ch.CHMOD, f"/{agent}/{name}")
            else:
                op = ch.CHOWN if ("uid" in upd or "gid" in upd) else ch.CHMOD
                await self._commit(Change(op, agent, caller.who(), time.time_ns(), attrs={name: upd}))
        times = {k: v for k, v in (("mtime_ns", mtime_ns), ("atime_ns", atime_ns)) if v is not None}
        if times and name != RUNTIME_FILE:
            await self._set_times(ino, agent, name, times, fh, caller, p if creating else None)
        return self._attr(ino)

    def _check_setattr(self, caller: Caller, key: tuple, size, mode, uid, gid, atime_ns, mtime_ns, fh) -> None:
        """chmod: the owner; chown: privileged (a no-op is fine); chgrp: the owner, to a group
        it is in; truncate: write permission (or a descriptor open for writing); times:
        the owner or write permission. EPERM/EACCES, audited."""
        own, via = self._perms(key)
        if via and not self.access.allowed(caller, via, X):
            self._deny(caller, "setattr", self._path(key))
        cur = own[0] if own else None
        if cur is None:
            return
        path = self._path(key)
        is_owner = self.access.owns(caller, cur[1])
        if mode is not None and stat.S_IMODE(mode) != stat.S_IMODE(cur[0]) and not is_owner:
            self._deny(caller, "chmod", path, errno.EPERM, "only the owner may change the mode")
        if uid is not None and uid != cur[1] and not self.access.privileged(caller):
            self._deny(caller, "chown", path, errno.EPERM, "only root or the admin group may change the owner")
        if gid is not None and gid != cur[2] and not self.access.privileged(caller) \
                and not (caller.uid == cur[1] and self.access.in_group(caller, gid)):
            self._deny(caller, "chown", path, errno.EPERM, "only the owner may change the group, to one of its groups")
        h = self.handles.get(fh) if fh else None
        if size is not None and not (h is not None and h.writable) and not self.access.allowed(caller, own, W):
            self._deny(caller, "truncate", path)
        if (atime_ns is not None or mtime_ns is not None) and not is_owner \
                and not self.access.allowed(caller, own, W):
            self._deny(caller, "utimes", path, errno.EPERM, "only the owner may set times")

    async def _set_times(self, ino: int, agent: str, name: str, times: dict, fh, caller: Caller,
                         pending: PendingFile | None) -> None:
        """User-set mtime/atime of a durable state file (touch -d, rsync -a, tar -x, cp -a):
        kept and versioned in meta.json. Set through a descriptor with unsaved writes (or
        on a file not written yet) they go into that close's commit; otherwise they are a
        "touch" commit of their own (none when they are the times the file has)."""
        h = self.handles.get(fh) if fh else None
        if h is None or h.ino != ino or not h.dirty:
            h = max((x for x in self.by_ino.get(ino, ()) if x.kind == "state" and x.dirty and not x.orphan),
                    key=lambda x: x.last_write, default=None)
        if h is not None and h.dirty and not h.orphan:
            h.times = {**(h.times or {}), **times}
            return
        if pending is not None:
            pending.times.update(times)
            return
        view = self._agent_view(agent)
        fm = view.file_meta(name) if name in view.files else None
        if fm is None:
            raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
        if times.get("mtime_ns", fm.get("mtime_ns")) == fm.get("mtime_ns"):
            return       # the same mtime (an access time alone is not a new version)
        await self._commit(Change(ch.TOUCH, agent, caller.who(), time.time_ns(), attrs={name: times}))

    def _committed(self, agent: str, name: str) -> bool:
        if name == RUNTIME_FILE:
            return self.runtime.get(agent) is not None
        view = self.git.agent(agent)
        return view is not None and name in view.files

    def _truncate_handle(self, h: Handle, size: int) -> None:
        check_size(size, self.opts.max_size)
        buf = self._ensure_buffer(h)
        if size > len(buf):
            self._grow_buffer(h, size)
            buf.extend(bytes(size - len(buf)))
        else:
            self.buffer_bytes -= len(buf) - size
            del buf[size:]
        self._touch(h)

    # -- directories ---------------------------------------------------------------------------
    async def mkdir(self, parent: int, name: str, mode: int, caller: Caller) -> Attr:
        where, agent, sdir = self._parent_dir(parent)
        if caller.uid != 0:
            self._check(caller, self.inodes.key(parent), W | X, "mkdir", name)
        perm, acl = self._new_mode(where, agent, mode, caller)
        if where == "root":
            check_agent_id(name)
            if self.git.agent(name) is not None:
                raise FsError(errno.EEXIST, f"agent {name} exists")
            await self._commit(Change(ch.MKDIR, name, caller.who(), time.time_ns(),
                                      attrs={"": {"mode": perm, "uid": caller.uid, "gid": caller.gid}}))
            ino = self.inodes.stable(("agent", name))
        else:
            self._check_scratch_name(where, agent, name)
            if name in sdir.children:
                raise FsError(errno.EEXIST, f"{name} exists")
            node = self.scratch.new_node(new_ino(self.inodes._keys), stat.S_IFDIR | perm, caller.uid,
                                         caller.gid, name, parent_ino=parent)
            node.agent = sdir.agent
            self._inherit_scratch_acl(node, acl)
            self.inodes.bind(node.ino, ("scratch", node))
            sdir.children[name] = node
            sdir.touch()
            ino = node.ino
        attr = self._attr(ino)
        self.inodes.remember(ino)
        return attr

    def _new_mode(self, where: str, agent: str | None, mode: int, caller: Caller) -> tuple[int, list | None]:
        """Permission bits (and ACL) of something new: the caller's mode and umask, or,
        in an agent directory with a default ACL, that ACL limited by the mode (POSIX.1e;
        the kernel has applied the umask to the mode already)."""
        if where == "agent":
            view = self.git.agent(agent)
            default = view.meta.get("default_acl") if view is not None else None
            if default:
                return inherit([tuple(e) for e in default], stat.S_IMODE(mode))
        return stat.S_IMODE(mode) & ~caller.umask & 0o7777, None

    def _inherit_scratch_acl(self, node: ScratchNode, acl) -> None:
        if acl:
            self.scratch.set_xattr(node, ACL_XATTR, encode_acl(full_acl(stat.S_IMODE(node.mode), acl)))

    def _check_scratch_name(self, where: str, agent: str | None, name: str) -> None:
        if is_reserved(name):
            raise FsError(errno.EINVAL, f"{name!r}: names starting with '@' are reserved")
        if where == "agent" and is_state(name):
            if self._exists_state(agent, name):
                raise FsError(errno.EEXIST, f"{agent}/{name} exists")
            raise FsError(errno.EINVAL, f"{agent}/{name} is a state file name, not a directory")

    async def rmdir(self, parent: int, name: str, caller: Caller) -> None:
        where, agent, sdir = self._parent_dir(parent)
        if name in (HISTORY_DIR, REJECTED_DIR):
            raise FsError(errno.EROFS, f"{name} is read-only")
        if name == PATCH_DIR:
            raise FsError(errno.EPERM, f"{PATCH_DIR} is part of every agent")
        if caller.uid != 0:
            self._check_remove(caller, parent, where, agent, sdir, name, "rmdir")
        if where == "root":
            if is_reserved(name):
                raise FsError(errno.EPERM, f"{name} is reserved")
            self._agent_view(name)
            await self.settle_removals(name)     # `rm -r`: the files' deletes come first
            self._agent_view(name)               # re-check: still there
            s = self.agent_scratch.get(name)
            if (s is not None and s.children) or self.runtime.get(name) is not None \
                    or any(a == name for a, _ in self.pending):
                raise FsError(errno.ENOTEMPTY, f"agent {name} is not empty")
            await self._commit(Change(ch.RMDIR, name, caller.who(), time.time_ns()))
            return   # publish retired the agent and released its scratch
        if where == "agent" and is_state(name):
            raise FsError(errno.ENOTDIR, f"{agent}/{name} is not a directory")
        node = sdir.children.get(name)
        if node is None:
            raise FsError(errno.ENOENT, f"{name} does not exist")
        if not node.is_dir:
            raise FsError(errno.ENOTDIR, f"{name} is not a directory")
        if node.children:
            raise FsError(errno.ENOTEMPTY, f"{name} is not empty")
        del sdir.children[name]
        self.scratch.unlinked(node)
        sdir.touch()

    async def opendir(self, ino: int, caller: Caller) -> int:
        key = self.inodes.key(ino)
        if caller.uid != 0:
            self._check(caller, key, R, "opendir")
        if key[0].startswith("hist-"):
            if key[0] == "hist-commit" and not key[1]:
                # Lists every agent at a commit: a walk proportional to the store, off the trio thread.
                count, item = await trio.to_thread.run_sync(self.history.entries, key)
            else:
                count, item = self.history.entries(key)
                if key[0] == "hist-root":
                    # Newest first; a listing is capped (history_max), older commits still
                    # resolve by name (HEAD~N, id, time).
                    count = min(count, getattr(self.opts, "history_max", count))
            fh = self._fh()
            self.dirs[fh] = _Dir(count, item, keys=True, dots=(ino, self._dotdot(ino, key)))
            return fh
        entries: list[tuple[str, object]] = []
        if key[0] == "rejected-dir":
            entries = [(n, ("rejected", key[1], n)) for n in self.rejected.names(key[1])]
        elif key[0] == "patch-dir":
            self._agent_view(key[1])
            entries = [(n, ("patch", key[1], n)) for n in sorted(DURABLE_FILES + (RUNTIME_FILE,))]
        elif key[0] == "root":
            if not self.git.agents_loaded():
                await trio.to_thread.run_sync(self.git.sorted_agents)
            ids = self.git.sorted_agents()     # a snapshot: later commits do not change it
            prefix = []
            if self.opts.history_visible:
                prefix.append((HISTORY_DIR, ("hist-root", "")))
            fh = self._fh()
            self.dirs[fh] = _Dir(len(prefix) + len(ids), prefix.__getitem__, keys=True,
                                 dots=(ino, self._dotdot(ino, key)), agents=ids, first_agent=len(prefix))
            return fh
        elif key[0] == "agent":
            agent = key[1]
            if len(self.removals) > 0:
                await self._settle_dead(agent)
            view = self._agent_view(agent)
            names = set(view.files) | {n for a, n in self.pending if a == agent}
            names = {n for n in names if not self._hidden(agent, n, caller)
                     or (agent, n) in self.pending}
            if self.runtime.get(agent) is not None:
                names.add(RUNTIME_FILE)
            entries = [(n, ("state", agent, n)) for n in sorted(names)]
            s = self.agent_scratch.get(agent)
            if s is not None:
                entries += [(n, ("scratch", c)) for n, c in sorted(s.children.items())]
        elif key[0] == "scratch" and key[1].is_dir:
            entries = [(n, ("scratch", c)) for n, c in sorted(key[1].children.items())]
        else:
            raise FsError(errno.ENOTDIR, "not a directory")
        if self.opts.history_visible and key[0] in ("root", "agent"):
            entries.insert(0, (HISTORY_DIR, ("hist-root", key[1] if key[0] == "agent" else "")))
        fh = self._fh()
        self.dirs[fh] = _Dir(len(entries), entries.__getitem__, keys=True, dots=(ino, self._dotdot(ino, key)),
                             agent=key[1] if key[0] == "agent" else None)
        return fh

    def _dotdot(self, ino: int, key: tuple) -> int:
        """The inode number of a directory's ``..`` (the kernel holds it: the directory
        was reached through it; a number it no longer holds falls back to ``.``)."""
        kind = key[0]
        if kind in ("root", "agent"):
            return ROOT
        if kind == "scratch":
            parent = key[1].parent_ino
            return parent if parent and self.inodes.has(parent) else ino
        if kind == "hist-root":
            pkey = ("agent", key[1]) if key[1] else ("root",)
        elif kind == "hist-commit":
            pkey = ("hist-root", key[1])
        elif kind == "hist-agent":
            pkey = ("hist-commit", "", key[1], key[2])
        elif kind == "hist-runtime":
            pkey = ("hist-root", key[1])
        elif kind in ("rejected-dir", "patch-dir"):
            pkey = ("agent", key[1])
        else:
            return ino
        parent = self.inodes.peek(pkey)
        return parent if parent is not None else ino

    async def fsyncdir(self, fh: int) -> None:
        """Every acknowledged change is durable, except parked removals: fsync of an
        agent directory commits its own (as fsync of a directory makes an unlink
        durable on ext4)."""
        d = self.dirs.get(fh)
        if d is not None and d.agent is not None:
            await self.settle_removals(d.agent)

    def _ino_for_listing(self, key: tuple) -> int | None:
        kind = key[0]
        if kind == "state":
            return self._state_ino(key[1], key[2])
        if kind == "scratch":
            node = key[1]
            if node.nlink == 0:
                return None
            self.inodes.bind(node.ino, key)
            return node.ino
        return self.inodes.stable(key)

    async def readdir(self, fh: int, start: int, reply) -> None:
        """Call ``reply(name, attr, next_id) -> bool`` for entries from ``start`` on.

        An inode is registered only when the kernel accepted its entry (it then holds a
        lookup reference and will forget it); so long listings leave nothing behind."""
        d = self.dirs.get(fh)
        if d is None:
            return
        if d.dots:
            # "." and "..": the kernel takes no lookup reference for them.
            for i in range(start, 2):
                try:
                    attr = self._attr(d.dots[i])
                except FsError:
                    attr = Attr(d.dots[i], stat.S_IFDIR | 0o755, 2, self.uid, self.gid, 0, self.mount_ns)
                if not reply("." if i == 0 else "..", attr, i + 1):
                    return
            start = max(start, 2)
        base = 2 if d.dots else 0
        reply_bare = self._reply_bare(reply)
        for i in range(start - base, d.count):
            if d.agents is not None and i >= d.first_agent:
                self._readdir_agents(d, i, reply, base)
                return
            name, key = d.item(i)
            if key[0] in NODELESS_KINDS and self.listing_without_lookup and self.inodes.peek(key) is None:
                # Listed, not looked up (``ls M/@history/<commit>``: 100,000 agents): the
                # kernel gets name, number and type, and no node to hold or forget.
                if not reply_bare(name.encode("utf-8", "surrogateescape"), self.inodes.number(key), base + i + 1):
                    break
                continue
            had = None
            try:
                had = self.inodes.peek(key)
                ino = self._ino_for_listing(key)
                if ino is None:
                    continue
                attr = self._listing_attr(ino)
            except FsError:
                continue  # removed since opendir
            if not reply(name, attr, base + i + 1):
                if had is None:
                    self.inodes.drop_if_unused(ino, keep=lambda i: bool(self.by_ino.get(i)))
                break
            self.inodes.remember(ino)

    async def warm_up(self) -> None:
        """Right after mounting, in a worker thread: the sorted agent list that ``ls M``
        needs (a walk of the fan-out trees, ~0.6 s at 100,000 agents), so the first
        listing does not wait for it. A failure only means the first ``ls`` walks."""
        try:
            await trio.to_thread.run_sync(self.git.sorted_agents)
        except Exception as exc:
            log.warning("could not list the agents ahead of the first ls (%s)", exc)

    def _reply_bare(self, reply):
        """``bare(name_bytes, ino, next_id)`` for an entry without a node: the adapter's
        own (``reply.bare``), or one that hands ``reply`` an Attr marked listed_only."""
        fast = getattr(reply, "bare", None)
        if fast is not None:
            return fast
        attr = Attr(0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, self.mount_ns, timeout=0, shared=True,
                    listed_only=True)

        def bare(name: bytes, ino: int, nxt: int) -> bool:
            attr.ino = ino
            return reply(name.decode("utf-8", "surrogateescape"), attr, nxt)
        return bare

    def _readdir_agents(self, d: _Dir, start: int, reply, base: int) -> None:
        """The agents of a root listing, from entry ``start`` on: the same as the generic
        loop, without its per-entry costs (``ls M`` at 100,000 agents). An agent not in
        the cache is listed with one placeholder Attr, changed in place per entry (its
        number and generation; ``reply`` consumes it before returning), which the kernel
        must not cache (timeouts 0), so ``stat``/``ls -l`` still ask for the truth.
        With ``listing_without_lookup`` an agent the kernel does not hold yet is listed
        without a node (``Attr.listed_only``): nothing is registered or remembered."""
        inodes, cached, ids, first = self.inodes, self.git.cached_agent, d.agents, d.first_agent
        known = inodes._inos
        ph = Attr(0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, self.mount_ns, timeout=0, shared=True)
        taken = inodes._keys
        xxh64 = xxhash.xxh64_intdigest
        nodeless = self.listing_without_lookup
        reply_bare = self._reply_bare(reply)
        for i in range(start, d.count):
            agent = ids[i - first]
            key = ("agent", agent)
            ino = known.get(key)
            if ino is None and nodeless:
                # InodeTable.number inlined (gitstore.hash_ino of "agent\0<id>"): two calls
                # less per entry of a 100,000-entry listing.
                raw = agent.encode("utf-8", "surrogateescape")
                n = xxh64(b"agent\0" + raw) & INO_MASK
                if n <= 1024:
                    n += 1024
                if n in taken:
                    n = inodes.number(key)   # in use: probe as a lookup would
                if not reply_bare(raw, n, base + i + 1):
                    return
                continue
            fresh = ino is None
            if fresh:
                ino = inodes.stable(key)
            if cached(agent) is None:
                ph.ino, ph.generation = ino, inodes.generation(ino)
                attr = ph
            else:
                try:
                    attr = self._attr(ino)
                except FsError:
                    continue   # removed since opendir
            if not reply(agent, attr, base + i + 1):
                if fresh:
                    inodes.drop_if_unused(ino, keep=lambda i: bool(self.by_ino.get(i)))
                return
            inodes.remember(ino)

    async def releasedir(self, fh: int) -> None:
        d = self.dirs.pop(fh, None)
        if d is not None and d.count >= BIG_LISTING:
            # Its entries (and the walk that found them) were many small allocations.
            await trio.to_thread.run_sync(heap.trim)

    # -- files -------------------------------------------------------------------------------
    async def open(self, ino: int, flags: int, caller: Caller) -> Handle:
        key = self.inodes.key(ino)
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        readable = flags & os.O_ACCMODE != os.O_WRONLY
        if caller.uid != 0 and not key[0].startswith("orphan"):
            # Read-only objects answer a write with EROFS (below), whatever their mode.
            ro = key[0].startswith("hist-") or key[0] in ("rejected", "events")
            want = (R if readable else 0) | (W if (writable or flags & os.O_TRUNC) and not ro else 0)
            self._check(caller, key, want, "open")
        if readable and self.audit is not None and self.audit.reads and key[0] not in ("scratch", "events"):
            self._audit(caller, "read", self._path(key))
        fh = self._fh()
        if key[0] == "scratch":
            node: ScratchNode = key[1]
            if node.is_dir:
                raise FsError(errno.EISDIR, "is a directory")
            if node.is_link:
                raise FsError(errno.ELOOP, "is a symbolic link")
            if writable and flags & os.O_TRUNC:
                self.scratch.resize(node, 0)
            h = Handle(fh, ino, "scratch", node=node, flags=flags)
            self.scratch.opened(node)
            self._add_handle(h)
            return h
        if key[0] == "events":
            if writable or flags & os.O_TRUNC:
                raise FsError(errno.EACCES, f"{EVENTS_FILE} is read-only")
            h = Handle(fh, ino, "events", flags=flags, node=self.events.subscribe(bool(flags & os.O_NONBLOCK)))
            self._add_handle(h)
            return h
        if key[0] == "report":
            if writable or flags & os.O_TRUNC:
                raise FsError(errno.EACCES, f"{key[1]} is read-only")
            # One snapshot per open: every read of this descriptor sees the same numbers.
            h = Handle(fh, ino, "report", name=key[1], flags=flags, snapshot=self.monitor.report(key[1]))
            self._add_handle(h)
            return h
        if key[0] == "patch":
            if flags & os.O_ACCMODE != os.O_WRONLY:
                raise FsError(errno.EACCES, f"{key[1]}/{PATCH_DIR}/{key[2]} is write-only (open it with O_WRONLY)")
            self._agent_view(key[1])
            h = Handle(fh, ino, "patch", agent=key[1], name=key[2], flags=flags, who=caller.who())
            self._add_handle(h)
            return h
        if key[0] == "rejected":
            if writable or flags & os.O_TRUNC:
                raise FsError(errno.EROFS, f"{REJECTED_DIR} is read-only")
            e = self.rejected.get(key[1], key[2])
            if e is None:
                raise FsError(errno.ENOENT, f"{key[1]}/{REJECTED_DIR}/{key[2]}: no refused write")
            h = Handle(fh, ino, "rejected", flags=flags, snapshot=e.data)
            self._add_handle(h)
            return h
        if key[0] in ("hist-file", "hist-rt"):
            if writable or flags & os.O_TRUNC:
                raise FsError(errno.EROFS, "history is read-only")
            self._note_history_read(caller.pid, key)
            h = Handle(fh, ino, "history", flags=flags, snapshot=self.history.content(key))
            self._add_handle(h)
            return h
        if key[0] == "state-new":
            p = self.pending.get((key[1], key[2]))
            if p is None or p.fid != ino:
                raise FsError(errno.ENOENT, f"{key[1]}/{key[2]} was removed")
            h = Handle(fh, ino, "state", agent=key[1], name=key[2], flags=flags,
                       who=caller.who() if writable else Who(caller.uid, caller.gid, caller.pid),
                       snapshot=b"", fid=ino, created=True)
            p.creators += 1
            if writable and flags & os.O_TRUNC:
                h.buffer = bytearray()
                self._touch(h)
            self._add_handle(h)
            return h
        if key[0] == "orphan-pending" and writable:
            key = self._recreate_pending(ino, key[1], key[2], caller)
        if key[0] == "orphan" and not writable and key[1] is not None \
                and getattr(key[1], "blob", None) is not None:
            h = Handle(fh, ino, "history", flags=flags, snapshot=self.git.read_blob(*key[1].blob))
            self._add_handle(h)
            return h
        if key[0] in ("orphan", "orphan-pending"):
            raise FsError(errno.ENOENT, "file was removed")
        if key[0] != "state":
            raise FsError(errno.EISDIR, "is a directory")
        agent, name = key[1], key[2]
        r = self.removals.get(agent, name) if len(self.removals) > 0 else None
        if r is not None and writable:
            # Someone writes a file whose removal is parked: the removal happened first.
            await self._settle_removal(r)
            if self.inodes.key(ino) != key:       # re-check: it was committed
                raise FsError(errno.ENOENT, f"{agent}/{name} was removed")
        if writable and flags & os.O_TRUNC and is_durable(name):
            # Truncating: the committed bytes are never read through this handle.
            data, oid, rf = b"", None, None
            had_content = self._durable_size(agent, name) != 0
        else:
            data, oid, rf = await self._acquire(agent, name)
            had_content = bool(data)
        # re-check: the name may have been unlinked or replaced while we read the blob.
        if self.inodes.key(ino) != key:
            if oid is not None:
                self._unshare(oid)
            raise FsError(errno.ENOENT, f"{agent}/{name} was replaced while opening")
        p = self.pending.get((agent, name))
        created = p is not None and p.fid == ino and not self._committed(agent, name)
        h = Handle(fh, ino, "runtime" if name == RUNTIME_FILE else "state", agent=agent, name=name,
                   flags=flags, who=caller.who() if writable else Who(caller.uid, caller.gid, caller.pid),
                   snapshot=data, blob=oid, fid=ino if is_durable(name) else None, rtfile=rf,
                   created=created)
        if created:
            p.creators += 1
        if writable and flags & os.O_TRUNC:
            h.buffer = bytearray()
            if had_content or created:
                self._touch(h)
        self._add_handle(h)
        return h

    def _recreate_pending(self, ino: int, agent: str, name: str, caller: Caller) -> tuple:
        """An open for writing of a name whose file was created and dropped unwritten a
        moment ago (the kernel still maps the name to it): create it again, same inode."""
        if self.git.agent(agent) is None or self._exists_state(agent, name):
            return ("orphan",)
        if caller.uid != 0:
            self._check(caller, ("agent", agent), W | X, "create", name)
        perm, acl = self._new_mode("agent", agent, 0o644, caller)
        self.pending[(agent, name)] = PendingFile(ino, perm, caller.uid, caller.gid, time.time_ns(), acl=acl)
        key = ("state", agent, name)
        self.inodes.bind(ino, key)
        return key

    async def create(self, parent: int, name: str, mode: int, flags: int, caller: Caller) -> tuple[Handle, Attr]:
        where, agent, sdir = self._parent_dir(parent)
        perm, acl = self._new_mode(where, agent, mode, caller)
        if where == "root":
            raise FsError(errno.EPERM, f"{name!r}: only agent directories can be created at the top level")
        exists = self._exists_state(agent, name) if where == "agent" and is_state(name) else name in sdir.children
        if caller.uid != 0 and not exists:
            self._check(caller, self.inodes.key(parent), W | X, "create", name)
        if where == "agent" and is_state(name):
            r = self.removals.get(agent, name) if len(self.removals) > 0 else None
            if r is not None and r.owner == tgid_of(caller.pid):
                return await self._create_again(agent, name, perm, flags, caller)
            if r is not None and not r.owner_alive():
                await self._settle_removal(r)
                # re-check below: the name is gone now
            if self._exists_state(agent, name):
                if flags & os.O_EXCL:
                    raise FsError(errno.EEXIST, f"{agent}/{name} exists")
                ino = self._state_ino(agent, name)
                h = await self.open(ino, flags, caller)
            else:
                fid = new_ino(self.inodes._keys) if is_durable(name) else None
                self.pending[(agent, name)] = PendingFile(fid or 0, perm, caller.uid, caller.gid, time.time_ns(),
                                                          acl=acl)
                ino = self._state_ino(agent, name)
                if fid is None:
                    self.pending[(agent, name)].fid = ino
                h = Handle(self._fh(), ino, "runtime" if name == RUNTIME_FILE else "state", agent=agent,
                           name=name, flags=flags, who=caller.who(), buffer=bytearray(), created=True,
                           fid=fid)
                self.pending[(agent, name)].creators += 1
                self._touch(h)
                self._add_handle(h)
            attr = self._attr(ino)
            self.inodes.remember(ino)
            return h, attr
        self._check_scratch_name(where, agent, name)
        node = sdir.children.get(name)
        if node is not None:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST, f"{name} exists")
            self.inodes.bind(node.ino, ("scratch", node))
            h = await self.open(node.ino, flags, caller)
        else:
            node = self.scratch.new_node(new_ino(self.inodes._keys), stat.S_IFREG | perm, caller.uid,
                                         caller.gid, name)
            node.agent = sdir.agent
            self._inherit_scratch_acl(node, acl)
            self.inodes.bind(node.ino, ("scratch", node))
            sdir.children[name] = node
            sdir.touch()
            h = Handle(self._fh(), node.ino, "scratch", node=node, flags=flags)
            self.scratch.opened(node)
            self._add_handle(h)
        attr = self._attr(node.ino)
        self.inodes.remember(node.ino)
        return h, attr

    async def _create_again(self, agent: str, name: str, perm: int, flags: int,
                            caller: Caller) -> tuple[Handle, Attr]:
        """The remover of ``agent/name`` creates it again (vim, emacs, install, tar -x):
        a new file, bound to its own inode number, that replaces the committed one when
        it is closed with valid content (one "write" commit, the removal folded in);
        other processes keep seeing the committed version until then."""
        p = self.pending.get((agent, name))
        if p is not None and p.replace:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST, f"{agent}/{name} exists")
            h = await self.open(p.fid, flags, caller)
            ino = p.fid
        else:
            if p is not None:
                raise FsError(errno.EBUSY, f"{agent}/{name} is being created by another process")
            ino = new_ino(self.inodes._keys)
            p = self.pending[(agent, name)] = PendingFile(ino, perm, caller.uid, caller.gid, time.time_ns(),
                                                          replace=True)
            r = self.removals.get(agent, name)
            if r is not None:
                r.refused = False
            self.inodes.bind(ino, ("state-new", agent, name))
            h = Handle(self._fh(), ino, "state", agent=agent, name=name, flags=flags, who=caller.who(),
                       buffer=bytearray(), created=True, fid=ino)
            p.creators += 1
            self._touch(h)
            self._add_handle(h)
        attr = self._attr(ino)
        attr.entry_timeout = 0
        self.inodes.remember(ino)
        return h, attr

    def handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise FsError(errno.EBADF, f"unknown file handle {fh}")
        return h

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handle(fh)
        if h.kind == "events":
            # A blocked read is not a request in flight: quiesce (unmount) must not wait for it.
            self.sm.in_flight -= 1
            try:
                return await self.events.read(h.node, size)
            finally:
                self.sm.in_flight += 1
        if h.kind == "scratch":
            node = h.node
            now = time.time_ns()
            # relatime, as ext4 and tmpfs mount by default: atime moves when it is older
            # than the last change or a day old, so a time set with `touch -a` stays.
            if node.atime_ns <= max(node.mtime_ns, node.ctime_ns) or now - node.atime_ns > RELATIME_NS:
                node.atime_ns = now
            return node.read(off, size)
        return bytes(h.content()[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handle(fh)
        if h.kind == "scratch":
            if h.append:
                off = h.node.size
            return self.scratch.write(h.node, off, buf)
        if h.kind in ("history", "rejected", "events", "report"):
            raise FsError(errno.EBADF, "read-only file")
        data = self._ensure_buffer(h)
        if h.append:
            off = len(data)
        end = off + len(buf)
        if end > self.opts.max_size:
            raise FsError(errno.EFBIG, f"{h.agent}/{h.name}: write to {end} bytes exceeds the "
                                       f"{self.opts.max_size}-byte state file cap")
        if end > len(data):
            self._grow_buffer(h, end)
            data.extend(bytes(end - len(data)))
        data[off:end] = buf
        self._touch(h)
        return len(buf)

    async def flush(self, fh: int) -> None:
        """Commit a dirty handle's buffer (close and fsync). On refusal the buffer stays
        (a later flush of a dup'ed descriptor may succeed); writes that arrive while
        the commit is in flight are committed by the next round of the loop."""
        h = self.handles.get(fh)
        if h is None or h.kind in ("scratch", "history", "rejected", "events", "report"):
            return
        if h.kind == "patch":
            await self._flush_patch(h)
            return
        while h.dirty and not h.orphan:
            gen = h.gen
            data = bytes(h.content())
            attrs = None
            p = self.pending.get((h.agent, h.name))
            replace = False
            if h.created and p is not None and p.fid == h.ino:
                attrs = {"mode": p.mode, "uid": p.uid, "gid": p.gid, **p.times}
                if p.acl:
                    attrs["acl"] = p.acl
                replace = p.replace
            times = h.times
            if times and h.kind == "state":
                attrs = {**(attrs or {}), **times}
            try:
                result = await self._save(h.agent, h.name, data, h.who, attrs=attrs, fid=h.fid,
                                          create=h.created, replace=replace,
                                          rtfile=h.rtfile if not h.created else None,
                                          origin=h.fh)
            except FsError as exc:
                h.last_error = exc
                raise
            # re-check: the handle may have been written, renamed or orphaned meanwhile.
            if result == ch.ORPHAN:
                h.orphan = True
                break
            h.last_error = None
            if h.times is times:
                h.times = None
            self.rejected.settle(h.agent, h.name, h.fh, committed=True)
            if replace:
                # Written again by its remover: the parked removal folds into this write.
                self._fold_removal(h.agent, h.name)
                if result is None and self.pending.get((h.agent, h.name)) is p:
                    # Same content as before: no commit; the name keeps its version, and
                    # this inode (the kernel's for the name now) answers for it.
                    del self.pending[(h.agent, h.name)]
                    self.inodes.bind(h.ino, ("state", h.agent, h.name))
            if h.created and p is not None and self.pending.get((h.agent, h.name)) is p \
                    and self._committed(h.agent, h.name):
                del self.pending[(h.agent, h.name)]
            if h.created:
                h.created = False
                if h.kind == "runtime":
                    h.rtfile = self.runtime.get(h.agent)
            if h.gen == gen:
                h.snapshot = data
                self._drop_buffer(h)
        if h.orphan and h.dirty:
            log.debug("%s/%s: written after it was removed; the data goes nowhere (as on ext4)",
                      h.agent, h.name)
            self._drop_buffer(h)

    async def _flush_patch(self, h: Handle) -> None:
        """Apply what was written to ``@patch/<state>.json`` as one patch (an empty
        handle does nothing: a shell's first close of a dup'ed descriptor)."""
        while h.dirty:
            gen = h.gen
            data = bytes(h.content())
            try:
                await self._patch(h.agent, h.name, data, h.who, origin=h.fh)
            except FsError as exc:
                h.last_error = exc
                raise
            h.last_error = None
            self.rejected.settle(h.agent, h.name, h.fh, committed=True)
            if h.gen == gen:
                self._drop_buffer(h)

    async def _patch(self, agent: str, name: str, patch: bytes, who: Who, origin: int | None = None):
        """Apply a merge patch / JSON Patch to the current version of ``agent/name``,
        atomically: durable files in the store (resolved at the patch's turn in the
        queue), runtime.json here with no await between reading and storing."""
        try:
            await self._validate(agent, name, patch)
            self._agent_view(agent)
            if name != RUNTIME_FILE:
                return await self._commit(Change(ch.PATCH, agent, who, time.time_ns(), files={name: patch},
                                                 limit=self.opts.max_size))
            rf = self.runtime.get(agent)
            current = rf.current.data if rf is not None else None
            new, _ = apply_patch(current, patch)
            if new is None or new == current:
                return None
            check_size(len(new), self.opts.max_size)
            check_json(new)
            self._store_runtime(agent, new, who, rf.mode if rf is not None else 0o644)
            return None
        except FsError as exc:
            if exc.errno in (errno.EINVAL, errno.EFBIG, errno.ESTALE, errno.ENOENT) \
                    and self.git.agent(agent) is not None:
                reason = exc.reason.removeprefix(f"{agent}/{name}: ")
                self._reject(agent, name, patch, who, FsError(exc.errno, f"patch refused: {reason}"), origin)
            raise

    def poll(self, fh: int, poll_handle) -> int:
        """Readiness for poll/select: @events has lines queued; everything else is ready."""
        h = self.handles.get(fh)
        if h is not None and h.kind == "events":
            return self.events.poll(h.node, poll_handle)
        return select.POLLIN | select.POLLRDNORM | select.POLLOUT | select.POLLWRNORM

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.flush(fh)

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        peers = self.by_ino.get(h.ino)
        if peers is not None:
            peers.discard(h)
            if not peers:
                del self.by_ino[h.ino]
                self.inodes.drop_if_unused(h.ino)
        if h.kind == "scratch":
            self.scratch.closed(h.node)
            return
        if h.kind == "events":
            self.events.unsubscribe(h.node)
            return
        if h.blob is not None:
            self._unshare(h.blob)
        if h.kind in ("history", "rejected", "report"):
            return
        if h.dirty and not h.orphan:
            reason = h.last_error.reason if h.last_error else "closed without a successful flush"
            reason = reason.removeprefix(f"{h.agent}/{h.name}: ")
            log.warning("%s/%s: not committed (%s); previous version kept (pid %d %s, uid %d)",
                        h.agent, h.name, reason, h.who.pid, h.who.comm, h.who.uid)
        e = self.rejected.settle(h.agent, h.name, h.fh, committed=False)
        if e is not None:
            self._rejected_final(h.agent, h.name, e)
        self._drop_buffer(h)
        p = self.pending.get((h.agent, h.name))
        if h.created and p is not None and p.fid == h.ino:
            p.creators -= 1
            if p.creators <= 0 and p.replace:
                # Written again by its remover and never validly closed: the previous
                # version stays under its name (the removal is undone, no commit).
                attr = self._orphan_attr(h.ino, False)
                del self.pending[(h.agent, h.name)]
                self.inodes.retire(h.ino, ("orphan", attr))
                r = self.removals.get(h.agent, h.name)
                if r is not None:
                    r.refused = True     # undone when it settles (fs/removals.py)
                agent_ino = self.inodes.peek(("agent", h.agent))
                if agent_ino is not None:
                    self.kernel.invalidate_entry(agent_ino, h.name)
            elif p.creators <= 0:
                del self.pending[(h.agent, h.name)]
                if not self._committed(h.agent, h.name):
                    # Created, never validly written: the name goes away (a state file
                    # exists once written). The kernel may still map the name to this
                    # inode for a moment: an open for writing through it creates anew.
                    self.inodes.retire(h.ino, ("orphan-pending", h.agent, h.name))
                    agent_ino = self.inodes.peek(("agent", h.agent))
                    if agent_ino is not None:
                        self.kernel.invalidate_entry(agent_ino, h.name)

    # -- names -------------------------------------------------------------------------------
    async def unlink(self, parent: int, name: str, caller: Caller) -> None:
        where, agent, sdir = self._parent_dir(parent)
        if name in (HISTORY_DIR, REJECTED_DIR):
            raise FsError(errno.EROFS, f"{name} is read-only")
        if name == PATCH_DIR:
            raise FsError(errno.EPERM, f"{PATCH_DIR} is part of every agent")
        if where == "root" and name == EVENTS_FILE:
            raise FsError(errno.EPERM, f"{EVENTS_FILE} is the change stream")
        if where == "root" and name in REPORT_FILES:
            raise FsError(errno.EPERM, f"{name} is read-only")
        if where == "root":
            raise FsError(errno.EISDIR if self.git.agent(name) is not None else errno.ENOENT,
                          f"{name} is an agent directory (use rmdir / rm -r)")
        if caller.uid != 0:
            self._check_remove(caller, parent, where, agent, sdir, name, "unlink")
        if where == "agent" and is_state(name):
            r = self.removals.get(agent, name) if len(self.removals) > 0 else None
            if r is not None:
                if r.owner == tgid_of(caller.pid):
                    raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
                await self._settle_removal(r)   # another process removes it too: now
                return
            p = self.pending.get((agent, name))
            if p is not None and p.replace:
                raise FsError(errno.EBUSY, f"{agent}/{name} is being written again by its remover")
            if p is not None and not self._committed(agent, name):
                del self.pending[(agent, name)]
                for h in self.by_ino.get(p.fid, ()):
                    h.created, h.orphan = False, True
                self.inodes.retire(p.fid, ("orphan", self._orphan_attr(p.fid, False)))
                return
            if name == RUNTIME_FILE:
                ino = self.inodes.peek(("state", agent, name))
                if not self.runtime.remove(agent):
                    raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
                self.events.emit(ch.DELETE, agent, name, uid=caller.uid, pid=caller.pid)
                self._audit(caller, ch.DELETE, f"/{agent}/{name}")
                if ino is not None:
                    for h in self.by_ino.get(ino, ()):
                        h.orphan = True
                    self.inodes.retire(ino, ("orphan", self._orphan_attr(ino, False)))
                return
            view = self._agent_view(agent)
            if name not in view.files:
                raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
            # Parked, not committed yet: a program that writes the name again (vim,
            # install, tar -x) makes one "write" commit (fs/removals.py).
            self._park_removal(agent, name, view.fid(agent, name), caller)
            return
        node = sdir.children.get(name)
        if node is None:
            raise FsError(errno.ENOENT, f"{name} does not exist")
        if node.is_dir:
            raise FsError(errno.EISDIR, f"{name} is a directory")
        del sdir.children[name]
        self.scratch.unlinked(node)
        if node.nlink == 0:
            self.inodes.retire(node.ino, ("scratch", node))
        sdir.touch()

    async def rename(self, parent_old: int, old: str, parent_new: int, new: str, flags: int,
                     caller: Caller) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FsError(errno.EINVAL, "RENAME_WHITEOUT is not supported")
        swhere, sagent, sdir = self._parent_dir(parent_old)
        dwhere, dagent, ddir = self._parent_dir(parent_new)
        if swhere == "root" and dwhere == "root" and not flags & RENAME_EXCHANGE:
            if caller.uid != 0:
                self._check_remove(caller, parent_old, swhere, None, None, old, "rename")
            await self._move_agent(old, new, flags, caller)
            return
        if swhere == "root" or dwhere == "root":
            # An agent into an agent, or a file to the top level: mv(1) copies instead.
            raise FsError(errno.EXDEV, "only agents live at the top level; this moves by copy (EXDEV)")
        if dwhere == "agent" and is_reserved(new) or swhere == "agent" and is_reserved(old):
            raise FsError(errno.EINVAL, "names starting with '@' are reserved")
        if caller.uid != 0:
            self._check_remove(caller, parent_old, swhere, sagent, sdir, old, "rename")
            self._check_remove(caller, parent_new, dwhere, dagent, ddir, new, "rename")
        src_state = swhere == "agent" and is_state(old)
        dst_state = dwhere == "agent" and is_state(new)
        if src_state and self._hidden(sagent, old, caller):
            raise FsError(errno.ENOENT, f"{sagent}/{old} does not exist")
        exists = self._exists_state(dagent, new) if dst_state else new in ddir.children
        if dst_state and self._hidden(dagent, new, caller):
            exists = False
        if flags & RENAME_NOREPLACE and exists:
            raise FsError(errno.EEXIST, f"{new} exists")
        if flags & RENAME_EXCHANGE:
            await self._exchange(swhere, sagent, sdir, old, dwhere, dagent, ddir, new, caller)
            return
        if src_state:
            if not self._exists_state(sagent, old):
                raise FsError(errno.ENOENT, f"{sagent}/{old} does not exist")
            if dst_state and sagent == dagent and is_durable(old) and is_durable(new):
                if old == new:
                    return
                if not self._committed(sagent, old):
                    raise FsError(errno.EBUSY, f"{sagent}/{old} is being created and has no content yet")
                # An intent: the store moves whatever content and metadata `old` has when
                # the change is applied (a close queued before us is applied first).
                await self._commit(Change(ch.RENAME, sagent, caller.who(), time.time_ns(), move=(old, new)))
                self._fold_removal(dagent, new)
                return
            if dwhere == "agent" and sagent == dagent and is_durable(old) and not dst_state:
                await self._rename_out(sagent, old, ddir, new, caller)
                return
            raise FsError(errno.EXDEV, "state files move between kinds by copy (EXDEV)")
        node = sdir.children.get(old)
        if node is None:
            raise FsError(errno.ENOENT, f"{old} does not exist")
        if dst_state:
            if node.is_dir:
                raise FsError(errno.EISDIR, f"{old} is a directory; {new} is a state file")
            if node.is_link:
                raise FsError(errno.EINVAL, f"{old} is a symbolic link; {new} is a state file")
            check_size(node.size, self.opts.max_size)     # before a sparse file is read out
            attrs = {"mode": stat.S_IMODE(node.mode), "uid": node.uid, "gid": node.gid,
                     "acl": self._scratch_perm(node)[3]}
            if node.user_times and is_durable(new):
                # rsync -a, tar -x: times set on the temp file are the state file's.
                attrs.update(mtime_ns=node.mtime_ns, atime_ns=node.atime_ns)
            data = node.content()
            cond = node.xattrs.get(IF_VERSION)
            expect = parse_if_version(cond) if cond is not None else None
            if is_durable(new):
                try:
                    result = await self._save(dagent, new, data, caller.who(), attrs=attrs, fid=node.ino,
                                              replace=True, expect=expect)
                except FsError:
                    if self._hidden(dagent, new, caller):
                        self._undo_removal(dagent, new)     # refused: the previous version stays
                    raise
                self._fold_removal(dagent, new)
            else:
                result = await self._save(dagent, new, data, caller.who(), attrs=attrs, expect=expect)
            if result is None:
                # Nothing changed (same bytes and metadata): the file keeps its identity,
                # but the kernel now maps the name to the scratch inode: let it answer
                # as the state file until the kernel forgets it.
                self.inodes.bind(node.ino, ("state", dagent, new))
            # re-check: the scratch name may have been unlinked or re-created meanwhile;
            # remove it only if it still names the node we committed.
            if sdir.children.get(old) is node:
                del sdir.children[old]
                sdir.touch()
                self.scratch.unlinked(node)
            elif node.nlink > 0:
                self.scratch.unlinked(node)
            return
        target = ddir.children.get(new)
        if target is node:
            return
        if target is not None:
            if target.is_dir and not node.is_dir:
                raise FsError(errno.EISDIR, f"{new} is a directory")
            if node.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR, f"{new} is not a directory")
            if target.is_dir and target.children:
                raise FsError(errno.ENOTEMPTY, f"{new} is not empty")
        if node.is_dir and self._is_inside(ddir, node):
            raise FsError(errno.EINVAL, "cannot move a directory into itself")
        self.scratch.charge_name(node, new)
        if target is not None:
            self.scratch.unlinked(target)
            if target.nlink == 0:
                self.inodes.retire(target.ino, ("scratch", target))
        del sdir.children[old]
        ddir.children[new] = node
        if node.is_dir:
            node.parent_ino = parent_new
        if node.agent != ddir.agent:
            self._set_agent(node, ddir.agent)
        node.ctime_ns = time.time_ns()
        sdir.touch()
        ddir.touch()

    async def _rename_out(self, agent: str, old: str, ddir: ScratchNode, new: str, caller: Caller) -> None:
        """``mv config.json config.json~`` (vim's and emacs's backup by rename): the
        scratch name gets a RAM copy of the committed version, and the state file's
        removal is parked (fs/removals.py): written again under its name, it is one
        "write" commit; refused, the previous version is still there."""
        if not self._committed(agent, old):
            raise FsError(errno.EBUSY, f"{agent}/{old} is being created and has no content yet")
        if self.removals.get(agent, old) is not None:
            # Parked by another process (the remover's own view says ENOENT above).
            raise FsError(errno.ENOENT, f"{agent}/{old} was removed")
        view = self._agent_view(agent)
        oid, fid, fm = view.files[old], view.fid(agent, old), dict(view.file_meta(old) or {})
        data, blob, _ = await self._acquire(agent, old)
        try:
            # re-check: the file may have been written, renamed or removed while we read it.
            view = self.git.agent(agent)
            if view is None or view.files.get(old) != oid or self.removals.get(agent, old) is not None \
                    or self.agent_scratch.get(agent) is not ddir:
                raise FsError(errno.EBUSY, f"{agent}/{old} changed while it was renamed; try again")
            target = ddir.children.get(new)
            if target is not None and target.is_dir:
                raise FsError(errno.EISDIR, f"{new} is a directory")
            node = self.scratch.new_node(new_ino(self.inodes._keys), stat.S_IFREG | fm.get("mode", 0o644),
                                         fm.get("uid", caller.uid), fm.get("gid", caller.gid), new)
            node.agent = agent
            try:
                self.scratch.write(node, 0, data)
            except FsError:
                self.scratch.unlinked(node)
                raise
            node.mtime_ns = fm.get("mtime_ns", node.mtime_ns)
            node.atime_ns = fm.get("atime_ns", node.mtime_ns)
            if target is not None:
                self.scratch.unlinked(target)
                if target.nlink == 0:
                    self.inodes.retire(target.ino, ("scratch", target))
            ddir.children[new] = node
            ddir.touch()
            self.inodes.bind(node.ino, ("scratch", node))
            self._park_removal(agent, old, fid, caller)
            # The kernel moved its dentry (the state file's inode) to the new name: make
            # it look the name up again, and find the scratch copy.
            agent_ino = self.inodes.peek(("agent", agent))
            if agent_ino is not None:
                self.kernel.invalidate_entry(agent_ino, new)
        finally:
            if blob is not None:
                self._unshare(blob)

    async def _move_agent(self, old: str, new: str, flags: int, caller: Caller) -> None:
        """``mv M/old M/new``: one commit moving the agent's subtree in the store (its
        history continues under the new id: ``agentstatefs log new`` shows both)."""
        for n in (old, new):
            if is_reserved(n):
                raise FsError(errno.EPERM, f"{n} is reserved")
        check_agent_id(new)
        self._agent_view(old)
        if old == new:
            return
        if self.git.agent(new) is not None:
            raise FsError(errno.EEXIST if flags & RENAME_NOREPLACE else errno.ENOTEMPTY,
                          f"agent {new} exists")
        await self.settle_removals(old)
        # re-check after the await: both names as they are now.
        self._agent_view(old)
        if self.git.agent(new) is not None:
            raise FsError(errno.ENOTEMPTY, f"agent {new} exists")
        if any(a == old for a, _ in self.pending) or self.removals.of_agent(old):
            raise FsError(errno.EBUSY, f"agent {old} has a file being created; try again")
        await self._commit(Change(ch.MOVE, old, caller.who(), time.time_ns(), move=(old, new)))
        # publish moved the inode, scratch and runtime.json (_moved_agent)

    @staticmethod
    def _set_agent(node: ScratchNode, agent: str | None) -> None:
        node.agent = agent
        for c in node.children.values():
            Namespace._set_agent(c, agent)

    @staticmethod
    def _is_inside(d: ScratchNode, node: ScratchNode) -> bool:
        """Is directory ``d`` the directory ``node`` or inside it?"""
        if d is node:
            return True
        return any(c.is_dir and Namespace._is_inside(d, c) for c in node.children.values())

    async def _exchange(self, swhere, sagent, sdir, old, dwhere, dagent, ddir, new, caller) -> None:
        if swhere == "agent" and dwhere == "agent" and sagent == dagent and is_durable(old) and is_durable(new):
            if not (self._committed(sagent, old) and self._committed(sagent, new)):
                raise FsError(errno.ENOENT, f"both {old} and {new} must exist to exchange them")
            await self._commit(Change(ch.EXCHANGE, sagent, caller.who(), time.time_ns(), move=(old, new)))
            return
        if (swhere == "agent" and is_state(old)) or (dwhere == "agent" and is_state(new)):
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE works between two durable state files or two scratch files")
        a, b = sdir.children.get(old), ddir.children.get(new)
        if a is None or b is None:
            raise FsError(errno.ENOENT, f"both {old} and {new} must exist to exchange them")
        sdir.children[old], ddir.children[new] = b, a
        now = time.time_ns()
        a.ctime_ns = b.ctime_ns = now
        sdir.touch()
        ddir.touch()

    def _scratch_target(self, parent: int, name: str, caller: Caller, op: str) -> ScratchNode:
        """The scratch directory a new link named ``name`` goes into (EEXIST if taken)."""
        where, agent, sdir = self._parent_dir(parent)
        if caller.uid != 0:
            self._check(caller, self.inodes.key(parent), W | X, op, name)
        if where == "root":
            raise FsError(errno.EPERM, f"{name!r}: only agent directories can be created at the top level")
        if where == "agent" and is_state(name):
            if self._exists_state(agent, name):
                raise FsError(errno.EEXIST, f"{agent}/{name} exists")
            raise FsError(errno.EPERM, f"{agent}/{name} is a state file: it holds JSON, not a link")
        self._check_scratch_name(where, agent, name)
        if name in sdir.children:
            raise FsError(errno.EEXIST, f"{name} exists")
        return sdir

    async def link(self, ino: int, parent: int, name: str, caller: Caller) -> Attr:
        """A hard link: scratch files (and symlinks) only, as on tmpfs. State files are
        versioned under one name each: EPERM (as for hard links to directories)."""
        key = self.inodes.key(ino)
        if key[0] != "scratch":
            raise FsError(errno.EPERM, "hard links work between scratch files only "
                                       "(state files are versioned under one name)")
        node: ScratchNode = key[1]
        if node.is_dir:
            raise FsError(errno.EPERM, "hard links to directories are not allowed")
        if node.nlink == 0:
            raise FsError(errno.ENOENT, "file was removed")
        if node.nlink >= LINK_MAX:
            raise FsError(errno.EMLINK, f"a file has at most {LINK_MAX} links (as on ext4)")
        sdir = self._scratch_target(parent, name, caller, "link")
        self.scratch.charge_name(node, name)
        sdir.children[name] = node
        node.nlink += 1
        node.ctime_ns = time.time_ns()
        sdir.touch()
        attr = self._attr(ino)
        self.inodes.remember(ino)
        return attr

    async def symlink(self, parent: int, name: str, target: bytes, caller: Caller) -> Attr:
        """A symbolic link (scratch, RAM-only like every other scratch node)."""
        target = bytes(target)
        if not target or len(target) > 4095:
            raise FsError(errno.ENAMETOOLONG if target else errno.ENOENT, "bad symbolic link target")
        sdir = self._scratch_target(parent, name, caller, "symlink")
        node = self.scratch.new_node(new_ino(self.inodes._keys), stat.S_IFLNK | 0o777, caller.uid,
                                     caller.gid, name, target=target)
        node.agent = sdir.agent
        self.inodes.bind(node.ino, ("scratch", node))
        sdir.children[name] = node
        sdir.touch()
        attr = self._attr(node.ino)
        self.inodes.remember(node.ino)
        return attr

    async def mknod(self, parent: int, name: str, mode: int, rdev: int, caller: Caller) -> Attr:
        """mknod(2): a regular file (as create + close), or a FIFO or socket in a scratch
        area (the kernel runs pipes and sockets itself; we keep the name, as tmpfs does).
        Device nodes: EPERM."""
        if stat.S_ISREG(mode):
            h, attr = await self.create(parent, name, mode, os.O_WRONLY, caller)
            await self.release(h.fh)
            return attr
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise FsError(errno.EPERM, "device nodes are not supported")
        sdir = self._scratch_target(parent, name, caller, "mknod")
        perm = stat.S_IMODE(mode) & ~caller.umask
        node = self.scratch.new_node(new_ino(self.inodes._keys), stat.S_IFMT(mode) | perm, caller.uid,
                                     caller.gid, name)
        self.inodes.bind(node.ino, ("scratch", node))
        sdir.children[name] = node
        sdir.touch()
        attr = self._attr(node.ino)
        self.inodes.remember(node.ino)
        return attr

    async def readlink(self, ino: int, caller: Caller) -> bytes:
        key = self.inodes.key(ino)
        if key[0] != "scratch" or not key[1].is_link:
            raise FsError(errno.EINVAL, "not a symbolic link")
        node: ScratchNode = key[1]
        node.atime_ns = time.time_ns()
        return node.target

    # -- xattrs ------------------------------------------------------------------------------
    def _rejected_xattrs(self, agent: str, name: str) -> dict[str, bytes]:
        e = self.rejected.get(agent, name)
        return {LAST_ERROR: e.last_error()} if e is not None else {}

    def _state_xattrs(self, agent: str, name: str) -> dict[str, bytes]:
        if name == RUNTIME_FILE:
            rf = self.runtime.get(agent)
            if rf is None:
                return {}
            return {"user.agentstatefs.version": str(rf.current.version).encode(),
                    "user.agentstatefs.time": history_iso(rf.current.time_ns / 1e9).encode(),
                    **self._rejected_xattrs(agent, name)}
        view = self.git.agent(agent)
        fm = view.file_meta(name) if view is not None and name in view.files else None
        last = self.store.history.last_change(agent, name)
        out = self.history.file_xattrs(agent, name, fm, last.commit if last else None)
        out.update(self._rejected_xattrs(agent, name))
        return out

    def _acl_of(self, key: tuple, name: str) -> bytes | None:
        """The binary ACL (access or default) of an object, None when it has none."""
        kind = key[0]
        meta = None
        if kind == "agent":
            view = self.git.agent(key[1])
            meta = view.meta if view is not None else None
        elif kind == "hist-agent":
            past = self.git.agent_at(key[2], key[3])
            meta = past.meta if past is not None else None
        elif kind == "hist-commit" and key[1]:
            past = self.git.agent_at(key[3], key[1])
            meta = past.meta if past is not None else None
        if meta is not None:
            if name == DEFAULT_ACL_XATTR:
                d = meta.get("default_acl")
                return encode_acl([tuple(e) for e in d]) if d else None
            return encode_acl(full_acl(meta.get("mode", 0o755), meta["acl"])) if meta.get("acl") else None
        if name == DEFAULT_ACL_XATTR:
            return None
        if kind == "state":
            fp = self._file_perm(key[1], key[2])
        elif kind == "hist-file":
            past = self.git.agent_at(key[1], key[2])
            fm = past.file_meta(key[3]) if past is not None else None
            fp = (fm["mode"], fm["uid"], fm["gid"], fm.get("acl")) if fm else None
        elif kind == "scratch":
            return key[1].xattrs.get(ACL_XATTR)
        else:
            fp = None
        return encode_acl(full_acl(fp[0], fp[3])) if fp and fp[3] else None

    async def _set_acl(self, ino: int, key: tuple, name: str, value: bytes | None, caller: Caller) -> None:
        """setfacl/getfacl: ACLs of agent directories, state files and scratch nodes,
        stored (durable ones in meta.json, versioned) and enforced by ``_check``.
        Only the owner (or a privileged caller) may change them (EPERM)."""
        kind = key[0]
        entries = parse_acl(value) if value is not None else None      # EINVAL on anything malformed
        own, via = self._perms(key)
        path = self._path(key)
        if kind not in ("agent", "state", "scratch") or not own:
            raise FsError(errno.ENOTSUP, f"{path}: ACLs are kept on agent directories, state files and scratch files")
        if caller.uid != 0:
            if via and not self.access.allowed(caller, via, X):
                self._deny(caller, "setfacl", path)
            if not self.access.owns(caller, own[0][1]):
                self._deny(caller, "setfacl", path, errno.EPERM, "only the owner may change the ACL")
        mode = own[0][0]
        if name == DEFAULT_ACL_XATTR:
            if kind == "state" or (kind == "scratch" and not key[1].is_dir):
                raise FsError(errno.EACCES, f"{path}: a default ACL needs a directory")
            if kind == "scratch":
                raise FsError(errno.ENOTSUP, f"{path}: default ACLs are kept on agent directories")
            d = [list(e) for e in entries] if entries else None
            await self._commit(Change(ch.CHMOD, key[1], caller.who(), time.time_ns(), attrs={"": {"default_acl": d}}))
            return
        new_mode, ext = split_acl(entries, mode) if entries else (mode, None)
        if kind == "scratch":
            node: ScratchNode = key[1]
            node.mode = stat.S_IFMT(node.mode) | new_mode
            if ext:
                self.scratch.set_xattr(node, ACL_XATTR, encode_acl(full_acl(new_mode, ext)))
            else:
                self.scratch.remove_xattr(node, ACL_XATTR)
            node.ctime_ns = time.time_ns()
            return
        upd = {"mode": new_mode, "acl": ext}
        if kind == "agent":
            await self._commit(Change(ch.CHMOD, key[1], caller.who(), time.time_ns(), attrs={"": upd}))
            return
        agent, fname = key[1], key[2]
        p = self.pending.get((agent, fname))
        if p is not None and p.fid == ino and not self._committed(agent, fname):
            p.mode, p.acl = new_mode, ext
        elif fname == RUNTIME_FILE:
            rf = self.runtime.get(agent)
            if rf is None:
                raise FsError(errno.ENOENT, f"{agent}/{fname} does not exist")
            rf.mode, rf.acl = new_mode, ext
            self._audit(caller, "setfacl", path)
        else:
            await self._commit(Change(ch.CHMOD, agent, caller.who(), time.time_ns(), attrs={fname: upd}))
        self.kernel.invalidate_attr(ino)

    async def getxattr(self, ino: int, name: str, caller: Caller) -> bytes:
        key = self.inodes.key(ino)
        if name in ACL_XATTRS:
            if caller.uid != 0:
                self._check(caller, key, 0, "getxattr")
            value = self._acl_of(key, name)
            if value is None:
                raise FsError(errno.ENODATA, f"no attribute {name}")
            return value
        if key[0] != "scratch" and not name.startswith("user.agentstatefs."):
            # The kernel asks for security.capability before every write: answer at once.
            raise FsError(errno.ENODATA, f"no attribute {name}")
        if key[0] == "root" and name == "user.agentstatefs.head" and len(self.removals) > 0:
            # The head names every acknowledged change, parked removals included.
            await self.settle_removals()
        if key[0] == "root" and name in self._root_xattrs():
            return self._root_xattrs()[name]
        if caller.uid != 0:
            self._check(caller, key, R, "getxattr")
        if key[0] == "scratch":
            value = key[1].xattrs.get(name)
        elif key[0].startswith("hist-"):
            value = self.history.xattrs(key).get(name)
        elif key[0] == "state":
            value = self._state_xattrs(key[1], key[2]).get(name)
        elif key[0] == "rejected":
            value = self._rejected_xattrs(key[1], key[2]).get(name)
        else:
            value = None
        if value is None:
            raise FsError(errno.ENODATA, f"no attribute {name}")
        return value

    def _root_xattrs(self) -> dict[str, bytes]:
        """The daemon's pid; the head readers see; the commit git's ``main`` names on disk
        (it trails the head by about a millisecond after each group: equal when idle)."""
        head, flushed = self.git.head, self.store.flushed_head
        return {"user.agentstatefs.pid": str(os.getpid()).encode(),
                "user.agentstatefs.repo": os.fsencode(self.store.repo_dir),
                "user.agentstatefs.head": str(head or "").encode(),
                "user.agentstatefs.git-head": str(flushed or "").encode(),
                MAINTENANCE_XATTR: json.dumps(self.sm.maintenance.status()).encode(),
                **({REPLICATION_XATTR: json.dumps(self.sm.replication.to_json()).encode()}
                   if self.sm.replication is not None else {})}

    def _maintenance_request(self, name: str, value: bytes, caller: Caller) -> None:
        """prune/gc asked for through the mount root: the operator only (root or the
        daemon's own user); the state manager runs it in the background."""
        if caller.uid not in (0, os.getuid()):
            self._deny(caller, name.rsplit('.', 1)[-1], "/", errno.EPERM,
                       f"only root or uid {os.getuid()} may {name.rsplit('.', 1)[-1]}")
        if self.store.readonly:
            raise FsError(errno.EROFS, "mounted read-only")
        try:
            req = json.loads(bytes(value[:4096]).decode())
            if not isinstance(req, dict):
                raise ValueError("not an object")
            token = req.pop("token", "")
            if not isinstance(token, str) or len(token) > 64:
                raise ValueError("bad token")
        except (ValueError, UnicodeDecodeError) as exc:
            raise FsError(errno.EINVAL, f"{name}: not a JSON request ({exc})") from None
        if name == PRUNE_XATTR:
            from .prune import Policy
            self.sm.request("prune", Policy.from_json(req), token)
        else:
            if req:
                raise FsError(errno.EINVAL, f"{name}: takes no arguments")
            self.sm.request("gc", None, token)

    async def listxattr(self, ino: int, caller: Caller) -> list[str]:
        key = self.inodes.key(ino)
        if key[0] == "root":
            return list(self._root_xattrs())
        if caller.uid != 0:
            self._check(caller, key, R, "listxattr")
        if key[0] == "scratch":
            return list(key[1].xattrs)
        acls = [n for n in ACL_XATTRS if key[0] in ("agent", "state", "hist-file", "hist-agent")
                and self._acl_of(key, n) is not None]
        if key[0] == "state":
            return list(self._state_xattrs(key[1], key[2])) + acls
        if key[0] == "rejected":
            return list(self._rejected_xattrs(key[1], key[2]))
        if key[0].startswith("hist-"):
            return list(self.history.xattrs(key)) + acls
        return acls

    async def setxattr(self, ino: int, name: str, value: bytes, caller: Caller) -> None:
        key = self.inodes.key(ino)
        if key[0] == "root" and name in (PRUNE_XATTR, GC_XATTR):
            self._maintenance_request(name, value, caller)
            return
        if key[0].startswith("hist-") or key[0] in ("rejected-dir", "rejected"):
            raise FsError(errno.EROFS, "history is read-only" if key[0].startswith("hist-")
                          else f"{REJECTED_DIR} is read-only")
        if name in ACL_XATTRS:
            if len(value) > XATTR_VALUE_MAX:
                raise FsError(errno.E2BIG, "attribute value too large")
            await self._set_acl(ino, key, name, value, caller)
            return
        if caller.uid != 0:
            self._check(caller, key, W, "setxattr")
        if key[0] != "scratch":
            if name == IF_VERSION and key[0] == "state":
                raise FsError(errno.EINVAL, f"{key[1]}/{key[2]}: {IF_VERSION} goes on a scratch file that is "
                                            f"then renamed onto the state file (compare-and-swap)")
            raise FsError(errno.ENOTSUP, "extended attributes can only be set on scratch files")
        if name == IF_VERSION:
            parse_if_version(value)
        if len(name.encode()) > XATTR_NAME_MAX:
            raise FsError(errno.ERANGE, "attribute name too long")
        if len(value) > XATTR_VALUE_MAX:
            raise FsError(errno.E2BIG, "attribute value too large")
        self.scratch.set_xattr(key[1], name, bytes(value))

    async def removexattr(self, ino: int, name: str, caller: Caller) -> None:
        key = self.inodes.key(ino)
        if name in ACL_XATTRS:
            if key[0].startswith("hist-") or key[0] in ("rejected-dir", "rejected"):
                raise FsError(errno.EROFS, "read-only")
            if self._acl_of(key, name) is None:
                raise FsError(errno.ENODATA, "no such attribute")
            await self._set_acl(ino, key, name, None, caller)
            return
        if caller.uid != 0:
            self._check(caller, key, W, "removexattr")
        if key[0] != "scratch" or not self.scratch.remove_xattr(key[1], name):
            raise FsError(errno.ENODATA, "no such attribute")
