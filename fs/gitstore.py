"""Git persistence: the tree layout, reading agents and files, committing Changes.

A bare repository, branch ``main``; commits are built in memory (git's object formats,
serialized and hashed here; no working copy, no index) and each group's objects are
written as one pack. Durability is not this module's job: packs are written unsynced
and the journal (``journal.py``) is the durability point.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import pygit2
import xxhash
from pygit2.enums import FileMode, ObjectType

from . import changes as ch
from . import crypto, heap, mempack
from .errors import FsError, RepoError
from .layout import FORMAT_BLOB, FORMAT_NAME, fanout
from .names import DURABLE_FILES, META_FILE

log = logging.getLogger(__name__)

BRANCH = "refs/heads/main"
ACL_KEYS = ("acl", "default_acl")   # POSIX ACLs in meta.json (fs/access.py), versioned like mode
COMMITTER = ("agentstatefs", "agentstatefs@localhost")


@dataclass
class AgentView:
    """One agent as of one commit: its metadata and the blob ids of its files."""

    meta: dict
    files: dict[str, pygit2.Oid] = field(default_factory=dict)
    tree: pygit2.Oid | None = None

    def file_meta(self, name: str) -> dict | None:
        return self.meta.get("files", {}).get(name)

    def fid(self, agent: str, name: str) -> int | None:
        """The identity (inode number) of file ``name``, None when absent.

        Files created since identities were introduced carry ``fid`` in their metadata
        (assigned at creation, moved by rename); older ones answer with the number
        derived from their path, as before.
        """
        if name not in self.files:
            return None
        fm = self.file_meta(name) or {}
        return fm.get("fid") or legacy_fid(agent, name)

    def version(self, name: str) -> int:
        fm = self.file_meta(name)
        return fm.get("version", 0) if fm and name in self.files else 0


def hash_ino(text: str, salt: int = 0) -> int:
    """A 63-bit inode number above the reserved range, from ``text``."""
    ino = xxhash.xxh64_intdigest(text.encode(), seed=salt) & ((1 << 63) - 1)
    return ino if ino > 1024 else ino + 1024


def legacy_fid(agent: str, name: str) -> int:
    return hash_ino("\0".join(("state", agent, name)))


def _encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def signature_for(who: ch.Who, time_ns: int) -> tuple[pygit2.Signature, pygit2.Signature]:
    secs = time_ns // 1_000_000_000
    # who.comm is escaped by Who itself (no newline, '<' or '>' can reach the header).
    author = pygit2.Signature(f"{ch.safe_text(who.comm, ch.COMM_MAX)} (uid {who.uid}, pid {who.pid})",
                              f"uid-{who.uid}@agentstatefs", secs, 0)
    committer = pygit2.Signature(COMMITTER[0], COMMITTER[1], secs, 0)
    return author, committer


class _Tree:
    """A git tree being rewritten: entries in git's order with their encoded bytes, so
    replacing one entry of a 256-entry fan-out tree re-encodes one entry, not 256."""

    __slots__ = ("info", "keys", "enc")
    EMPTY: "_Tree"

    def __init__(self, info: dict, keys: list, enc: dict):
        self.info = info      # name -> (mode, raw oid)
        self.keys = keys      # sort keys in git's order (a tree's name sorts as "name/")
        self.enc = enc        # sort key -> encoded entry

    @staticmethod
    def _key(name: str, mode: int) -> str:
        return name + "/" if mode == FileMode.TREE else name

    @staticmethod
    def _encode(name: str, mode: int, raw: bytes) -> bytes:
        return b"%o %s\x00%s" % (mode, name.encode(), raw)

    @classmethod
    def build(cls, info: dict) -> "_Tree":
        enc = {cls._key(n, m): cls._encode(n, m, raw) for n, (m, raw) in info.items()}
        return cls(dict(info), sorted(enc), enc)

    @classmethod
    def parse(cls, data: bytes) -> "_Tree | None":
        """A tree from its raw bytes (git's format), or None when they are not a tree
        as this module writes it (a non-canonical mode, a name that is not UTF-8, bytes
        left over): the caller then reads it through libgit2. A regular expression over
        the bytes is ~4x faster than libgit2's parsed tree entries at 256 entries
        (~200 vs ~890 µs: every entry's mode becomes a FileMode enum there)."""
        info, enc, keys = {}, {}, []
        pos = 0
        for m in _TREE_ENTRY.finditer(data):
            if m.start() != pos or m[1][0] == 48:      # a gap, or a mode with a leading 0
                return None
            pos = m.end()
            mode = int(m[1], 8)
            try:
                name = m[2].decode()
            except UnicodeDecodeError:
                return None
            k = name + "/" if mode == FileMode.TREE else name
            info[name] = (mode, m[3])
            enc[k] = m[0]
            keys.append(k)
        if pos != len(data) or len(info) != len(keys):
            return None
        keys.sort()          # already in git's order: linear
        return cls(info, keys, enc)

    def with_entry(self, name: str, entry: tuple | None) -> "_Tree":
        old = self.info.get(name)
        if old == entry:
            return self
        info, enc, keys = dict(self.info), dict(self.enc), self.keys
        if old is not None:
            k = self._key(name, old[0])
            del enc[k]
            del info[name]
            if entry is None or self._key(name, entry[0]) != k:
                keys = [x for x in keys if x != k]
        if entry is not None:
            k = self._key(name, entry[0])
            info[name] = entry
            enc[k] = self._encode(name, entry[0], entry[1])
            if old is None or self._key(name, old[0]) != k:
                keys = list(keys)
                bisect.insort(keys, k)
        return _Tree(info, keys, enc)

    def encode(self) -> bytes:
        return b"".join(map(self.enc.__getitem__, self.keys))


_Tree.EMPTY = _Tree({}, [], {})
_TREE_ENTRY = re.compile(rb"([0-7]+) ([^\0/]+)\0(.{20})", re.S)


# Parsed trees kept (sum of their entries): ~300 bytes each, so ~30 MB at most.
TREE_CACHE_ENTRIES = 100_000


class GitStore:
    """Reads and commits agent state in a bare git repository."""

    def __init__(self, path: str, *, create: bool = True, agent_cache: int = 4096,
                 blob_cache_bytes: int = 64 << 20, codec=crypto.PLAIN):
        self.path = os.path.abspath(path)
        # Every blob inside an agent's tree passes through the codec (fs/crypto.py):
        # sealed on the way in, opened (and refused if it does not open) on the way out.
        self.codec = codec
        self._last_sealed: tuple | None = None
        self._tls = threading.local()   # one repository handle per thread (see ``repo``)
        self._generation = 0            # bumped by reopen/attach_memory: handles are renewed
        self._attached: list = []       # memory backends every handle gets
        try:
            if os.path.isdir(os.path.join(self.path, "objects")):
                self.repo = pygit2.Repository(self.path)
            elif create:
                os.makedirs(self.path, exist_ok=True)
                self.repo = pygit2.init_repository(self.path, bare=True, initial_head="main")
            else:
                raise RepoError(f"{self.path} is not an agentstatefs repository")
        except pygit2.GitError as exc:
            raise RepoError(f"{self.path}: cannot open git repository: {exc}") from None
        if not self.repo.is_bare:
            raise RepoError(f"{self.path} is a git repository with a working copy; agentstatefs needs a bare one")
        if self.repo.head_is_unborn or self.repo.references.get("HEAD") is None:
            self.repo.set_head(BRANCH)
        self._lock = threading.RLock()
        self._agent_cache: OrderedDict[str, AgentView | None] = OrderedDict()
        self._agent_cache_max = agent_cache
        self._past_cache: OrderedDict[tuple[str, str], AgentView | None] = OrderedDict()
        self._blob_cache: OrderedDict[pygit2.Oid, bytes] = OrderedDict()
        self._blob_cache_bytes = 0
        self._blob_cache_max = blob_cache_bytes
        self._agents: set[str] | None = None
        self._agents_delta: dict = {}
        self._sorted: list[str] | None = None   # sorted(_agents), handed out read-only
        self._sorted_shared = False             # handed out: copy before changing it
        # Cache hit counters, read by the metrics (plain ints: no cost worth a lock).
        self.agent_hits = self.agent_misses = 0
        self.blob_hits = self.blob_misses = 0
        self.tree_hits = self.tree_misses = 0
        self.pending_objects: dict = {}
        self._ref_fd: int | None = None
        self.group_objects: list = []    # objects first written by the current group
        self._tree_cache: OrderedDict = OrderedDict()   # tree id -> _Tree (parsed), LRU
        self._tree_cache_entries = 0
        self._memory = mempack.attach(self.repo, self.pending_objects)
        self._attached.append(self.pending_objects)
        self._head: pygit2.Oid | None = None
        self._root: pygit2.Tree | None = None       # the head's tree
        self._load_head()

    # -- head -------------------------------------------------------------------
    def _load_head(self) -> None:
        try:
            ref = self.repo.references.get(BRANCH)
        except (pygit2.GitError, ValueError) as exc:
            raise RepoError(f"{self.path}: branch main is unreadable ({exc}); run 'agentstatefs fsck'") from None
        if ref is None:
            self._head, self._root = None, None
            return
        try:
            commit = self.repo[ref.target]
            self._head, self._root = commit.id, commit.tree
        except (KeyError, ValueError, pygit2.GitError) as exc:
            raise RepoError(f"{self.path}: branch main points to a missing or corrupt commit {ref.target} "
                            f"({exc}); run 'agentstatefs fsck'") from None

    @property
    def head(self) -> pygit2.Oid | None:
        return self._head

    @property
    def root_id(self) -> pygit2.Oid | None:
        return self._root.id if self._root is not None else None

    def _set_root_id(self, oid: pygit2.Oid | None) -> None:
        """The head's tree by id, looked up NOW (one lookup instead of commit -> tree):
        right after a group it is still in memory. Looked up later, after the flusher
        wrote it into a pack and dropped it from memory, the first miss makes libgit2
        rescan the pack directory (measured 2.5 ms per group in-process at 100,000 agents)."""
        self._root = self.repo[oid] if oid is not None else None

    def reset_head(self, oid: pygit2.Oid | None) -> None:
        """Point ``main`` at ``oid`` (recovery only) and drop every cache."""
        with self._lock:
            self._agent_cache.clear()
            self._agents = self._sorted = None
            self._head = oid
            self._root = self.repo[oid].tree if oid is not None else None
            if oid is None:
                ref = self.repo.references.get(BRANCH)
                if ref is not None:
                    ref.delete()
            else:
                self.repo.references.create(BRANCH, oid, force=True)

    # -- repository handles ---------------------------------------------------------
    # Each thread reads through its OWN libgit2 repository handle. libgit2 holds the
    # odb's mutex while it calls a backend's read, and the in-memory backend
    # (mempack.MemoryObjects) is Python: inside it the interpreter may hand the GIL to
    # another thread, which then blocks on that same mutex while holding the GIL, and
    # neither can go on. Seen as a daemon hung at mount (the agent walk in a worker
    # thread against lookups on the trio thread) that kill -9 could not even end.
    # Separate handles have separate odb mutexes; the objects dict behind the memory
    # backends is shared (plain Python, under the GIL).
    @property
    def repo(self) -> pygit2.Repository:
        tls = self._tls
        repo = getattr(tls, "repo", None)
        if repo is None or tls.generation != self._generation:
            repo = self._new_handle()
            tls.repo, tls.generation = repo, self._generation
        return repo

    def _new_handle(self) -> pygit2.Repository:
        repo = pygit2.Repository(self.path)
        for objects in self._attached:
            mempack.attach(repo, objects)
        return repo

    @repo.setter
    def repo(self, repo: pygit2.Repository) -> None:
        """The handle of the calling thread (the constructor's)."""
        self._tls.repo, self._tls.generation = repo, self._generation

    def attach_memory(self, objects: dict) -> None:
        mempack.attach(self.repo, objects)
        self._attached.append(objects)
        self._generation += 1           # other threads' handles get it when renewed
        self._tls.generation = self._generation

    def reopen(self) -> None:
        """New repository handles: libgit2 keeps packs that a repack deleted open and
        mapped for as long as a handle lives (file descriptors and memory grow with every
        repack). Objects and trees already read stay valid; every thread's next read
        opens a new handle."""
        with self._lock:
            self._generation += 1
            root = self.repo[self._head].tree if self._head is not None else None
            self._root = root

    def rewind(self, oid: pygit2.Oid | None, agents) -> None:
        """Move the in-memory head back to ``oid`` (a group that never became durable);
        the ref on disk is not touched: it still names the last durable head."""
        with self._lock:
            self._head = oid
            self._root = self.repo[oid].tree if oid is not None else None
            for a in agents:
                self._agent_cache.pop(a, None)
            self._agents = self._sorted = None

    def move_head(self, oid: pygit2.Oid) -> None:
        """Point the in-memory head at ``oid``, a commit with the same tree as the head
        (a rewritten history, see prune.py): every cached agent stays valid."""
        root = self.repo[oid].tree
        with self._lock:
            self._head, self._root = oid, root

    def publish(self, oid: pygit2.Oid, views: dict, root_id: pygit2.Oid | None = None) -> None:
        """Reader side: make ``oid`` the head readers see, with the agents the writer
        changed (``{agent: AgentView or None}``, immutable views shared with it).
        ``root_id``: the commit's tree, when the writer says it (saves two lookups)."""
        if root_id is None:
            root_id = self.repo[oid].tree_id
        with self._lock:
            self._head = oid
            self._set_root_id(root_id)
            for agent, view in views.items():
                self._cache_agent(agent, view)
                self._agent_listed(agent, view is not None)
            if self._agents is None:
                self._agents_delta.update(views)   # replayed onto a walk in progress

    # -- reading ----------------------------------------------------------------
    def write_ref(self, oid: pygit2.Oid) -> None:
        """Point ``main`` at ``oid`` on disk. One writer per repository, so no lock file:
        the loose ref is overwritten in place (always 41 bytes; a rename over it would
        make ext4 flush it at once, ~0.3 ms a group), and replaced atomically only when
        it is missing or was replaced behind our back. Not fsynced: recovery trusts only
        the checkpoint, whose syncfs makes this durable."""
        path = os.path.join(self.path, BRANCH)
        line = f"{oid}\n".encode()
        fd = self._ref_fd
        if fd is not None:
            try:
                st, cur = os.fstat(fd), os.stat(path)
                if (st.st_ino, st.st_dev) == (cur.st_ino, cur.st_dev) and st.st_size == len(line):
                    os.pwrite(fd, line, 0)
                    return
            except OSError:
                pass
            self._ref_fd = None
            os.close(fd)
        tmp = os.path.join(self.path, "agentstatefs-main.tmp")   # outside refs/: never a branch
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.rename(tmp, path)
        except OSError:
            os.close(fd)
            raise
        self._ref_fd = fd

    def close(self) -> None:
        if self._ref_fd is not None:
            os.close(self._ref_fd)
            self._ref_fd = None

    def cached_agent(self, agent: str) -> AgentView | None:
        """The agent's view if it is in the cache, without loading it (None otherwise)."""
        with self._lock:
            return self._agent_cache.get(agent)

    def _subtree(self, tree: pygit2.Tree | None, name: str) -> pygit2.Tree | None:
        if tree is None:
            return None
        try:
            entry = tree[name]
        except KeyError:
            return None
        if entry.type != ObjectType.TREE:
            return None
        return self.repo[entry.id]

    def agent_tree(self, root: pygit2.Tree | None, agent: str) -> pygit2.Tree | None:
        a, b = fanout(agent)
        return self._subtree(self._subtree(self._subtree(root, a), b), agent)

    def _head_agent_tree(self, agent: str) -> pygit2.Tree | None | bool:
        """The agent's tree at the head through the parsed fan-out trees, when the head's
        root is among them (the writer's store, after its first commit): the ``ab/`` and
        ``cd/`` trees parsed here are the ones ``apply`` rewrites next, so a commit to a
        random agent reads each once instead of twice. False: not available."""
        root_id = self.root_id
        root = self._tree_cache.get(root_id) if root_id is not None else None
        if root is None:
            return False
        a, b = fanout(agent)
        l1 = self._child_oid(root, a)
        l2 = self._child_oid(self._entries(l1), b) if l1 is not None else None
        entry = self._entries(l2).info.get(agent) if l2 is not None else None
        if entry is None or entry[0] != FileMode.TREE:
            return None
        return self.repo[pygit2.Oid(raw=entry[1])]

    def load_agent(self, root: pygit2.Tree | None, agent: str, tree=False) -> AgentView | None:
        """The agent as of ``root`` (any commit's tree), or None if absent there
        (``tree``: its tree, when the caller found it already)."""
        if tree is False:
            tree = self.agent_tree(root, agent)
        if tree is None:
            return None
        files = {}
        meta = None
        for entry in tree:
            if entry.name == META_FILE:
                meta = json.loads(self.read_blob(entry.id, agent, META_FILE))
            elif entry.name in DURABLE_FILES:
                files[entry.name] = entry.id
        if meta is None:
            raise FsError(errno.EIO, f"agent {agent} has no {META_FILE} in tree {tree.id}")
        return AgentView(meta=meta, files=files, tree=tree.id)

    def agent(self, agent: str) -> AgentView | None:
        """The agent at the current head (LRU cached)."""
        with self._lock:
            if agent in self._agent_cache:
                self._agent_cache.move_to_end(agent)
                self.agent_hits += 1
                return self._agent_cache[agent]
            if self._agents is not None and agent not in self._agents:
                return None
            self.agent_misses += 1
            view = self.load_agent(self._root, agent, self._head_agent_tree(agent))
            self._cache_agent(agent, view)
            return view

    def _cache_agent(self, agent: str, view: AgentView | None) -> None:
        self._agent_cache[agent] = view
        self._agent_cache.move_to_end(agent)
        while len(self._agent_cache) > self._agent_cache_max:
            self._agent_cache.popitem(last=False)

    def agent_at(self, commit_hex: str, agent: str) -> AgentView | None:
        """The agent as of a past commit (immutable, so cached by (commit, agent))."""
        key = (commit_hex, agent)
        with self._lock:
            if key in self._past_cache:
                self._past_cache.move_to_end(key)
                return self._past_cache[key]
        view = self.load_agent(self.tree_at(commit_hex), agent)
        with self._lock:
            self._past_cache[key] = view
            while len(self._past_cache) > self._agent_cache_max:
                self._past_cache.popitem(last=False)
        return view

    def tree_at(self, commit_hex: str) -> pygit2.Tree:
        return self.repo[commit_hex].tree

    def agents(self) -> set[str]:
        """All agent ids at the head (built once by walking the fan-out, then kept up to date).

        The walk runs without the lock (it may take a while at 100,000 agents and may
        run in a worker thread): changes published meanwhile are replayed onto it."""
        with self._lock:
            if self._agents is not None:
                return self._agents
            root = self._root
            self._agents_delta = {}
        found = set(self.iter_agents(root))
        with self._lock:
            if self._agents is None:
                for agent, view in self._agents_delta.items():
                    if view is None:
                        found.discard(agent)
                    else:
                        found.add(agent)
                self._agents = found
            return self._agents

    def _agent_listed(self, agent: str, exists: bool) -> None:
        """Keep the agent set (and its sorted snapshot) up to date (lock held)."""
        if self._agents is None or (agent in self._agents) == exists:
            return
        if exists:
            self._agents.add(agent)
        else:
            self._agents.discard(agent)
        ids = self._sorted
        if ids is not None:
            if self._sorted_shared:
                ids = self._sorted = list(ids)
                self._sorted_shared = False
            i = bisect.bisect_left(ids, agent)
            if exists:
                ids.insert(i, agent)
            elif i < len(ids) and ids[i] == agent:
                del ids[i]

    def sorted_agents(self) -> list[str]:
        """Every agent id at the head, sorted: a snapshot the caller must not change
        (``ls M`` lists from it; kept sorted across commits instead of re-sorting 100,000
        ids per listing). Builds the agent set first if needed (a walk: call it off the
        trio thread then)."""
        self.agents()
        with self._lock:
            if self._sorted is None:
                self._sorted = sorted(self._agents)
            self._sorted_shared = True
            return self._sorted

    def agents_loaded(self) -> bool:
        return self._agents is not None

    def iter_agents(self, root: pygit2.Tree | None):
        """The agent ids in ``root`` (a head's or a past commit's tree), in tree order.

        Walks with a repository handle of its own, freed afterwards (and the heap
        trimmed): the walk reads every fan-out tree (65,536 at 100,000 agents), and a
        long-lived handle would keep them all parsed in libgit2's object cache, ~50 MB
        that its size accounting (raw bytes) does not even see."""
        if root is None:
            return
        walker = self._new_handle()
        try:
            for l1 in root:
                if l1.type != ObjectType.TREE:
                    continue
                for l2 in walker[l1.id]:
                    if l2.type != ObjectType.TREE:
                        continue
                    for entry in walker[l2.id]:
                        if entry.type == ObjectType.TREE:
                            yield entry.name
        finally:
            l1 = l2 = entry = None
            walker.free()
            del walker
            heap.trim()

    def read_blob(self, oid: pygit2.Oid, agent: str, name: str) -> bytes:
        """The content of blob ``oid`` found at ``agent/name`` (opened by the codec: in an
        encrypted store a blob that does not open there is EIO, never served)."""
        key = oid if not self.codec.encrypted else (oid, agent, name)
        with self._lock:
            data = self._blob_cache.get(key)
            if data is not None:
                self._blob_cache.move_to_end(key)
                self.blob_hits += 1
                return data
            self.blob_misses += 1
        # One odb read (``repo[oid].data`` was an object lookup, then a second read by
        # prefix that asks every backend, a loose-object stat included).
        kind, raw = self.repo.odb.read(oid)
        if kind != ObjectType.BLOB:
            raise FsError(errno.EIO, f"{agent}/{name}: object {oid} is not a blob")
        try:
            data = self.codec.open_blob(agent, name, raw)
        except crypto.CryptoError as exc:
            log.error("refused to read blob %s: %s", oid, exc)
            raise FsError(errno.EIO, str(exc)) from None
        with self._lock:
            if len(data) <= self._blob_cache_max // 8:
                self._blob_cache[key] = data
                self._blob_cache_bytes += len(data)
                while self._blob_cache_bytes > self._blob_cache_max:
                    _, old = self._blob_cache.popitem(last=False)
                    self._blob_cache_bytes -= len(old)
        return data

    def read_file(self, agent: str, name: str) -> bytes | None:
        view = self.agent(agent)
        if view is None or name not in view.files:
            return None
        return self.read_blob(view.files[name], agent, name)

    # -- writing ----------------------------------------------------------------
    # Objects are serialized and hashed here (git's own formats), kept in memory
    # (``self.pending_objects``, readable through the ``MemoryObjects`` backend) and
    # written out once per group as one pack (``flush_objects``). No loose files, no
    # libgit2 write path (whose existence check re-reads the pack directory on every
    # new object).
    def _write(self, kind: int, data: bytes) -> pygit2.Oid:
        header = b"%s %d\x00" % (mempack.TYPE_NAMES[kind], len(data))
        oid = pygit2.Oid(raw=hashlib.sha1(header + data).digest())
        if oid not in self.pending_objects:
            self.pending_objects[oid] = (kind, bytes(data))
            self.group_objects.append(oid)
        return oid

    def _blob(self, data: bytes) -> pygit2.Oid:
        return self._write(ObjectType.BLOB, data)

    def seal(self, agent: str, name: str, data: bytes) -> bytes:
        """The bytes stored for ``data`` at ``agent/name`` (the codec's; deterministic).
        The last result is kept: the store hashes a write before applying it."""
        last = self._last_sealed
        if last is not None and last[2] is data and last[0] == agent and last[1] == name:
            return last[3]
        sealed = self.codec.seal_blob(agent, name, data)
        if self.codec.encrypted:
            self._last_sealed = (agent, name, data, sealed)
        return sealed

    def blob_id(self, agent: str, name: str, data: bytes) -> pygit2.Oid:
        """The blob id ``data`` gets at ``agent/name`` (compare with a view's file ids)."""
        return pygit2.hash(self.seal(agent, name, data))

    def _entries(self, oid: pygit2.Oid | None) -> "_Tree":
        """A tree, parsed once and cached by id (trees never change)."""
        if oid is None:
            return _Tree.EMPTY
        cached = self._tree_cache.get(oid)
        if cached is not None:
            self._tree_cache.move_to_end(oid)
            self.tree_hits += 1
            return cached
        self.tree_misses += 1
        kind, data = self.repo.odb.read(oid)
        tree = _Tree.parse(data) if kind == ObjectType.TREE else None
        if tree is None:
            tree = _Tree.build({e.name: (int(e.filemode), e.id.raw) for e in self.repo[oid]})
        self._cache_tree(oid, tree)
        return tree

    def _cache_tree(self, oid: pygit2.Oid, tree: "_Tree") -> None:
        """Bounded by entries, not trees: at 100,000 agents every commit makes two new
        256-entry trees (the root and an ``ab/``), ~20 KB each parsed, and a count bound
        of 4,096 trees let the cache grow to ~80 MB. TREE_CACHE_ENTRIES holds the root
        and all 256 ``ab/`` trees of a 100,000-agent head (the random-agent working set)."""
        if oid in self._tree_cache:
            return
        self._tree_cache[oid] = tree
        self._tree_cache_entries += len(tree.info) + 1
        while self._tree_cache_entries > TREE_CACHE_ENTRIES and len(self._tree_cache) > 1:
            _, old = self._tree_cache.popitem(last=False)
            self._tree_cache_entries -= len(old.info) + 1

    def _uncache_tree(self, oid: pygit2.Oid | None) -> None:
        tree = self._tree_cache.pop(oid, None) if oid is not None else None
        if tree is not None:
            self._tree_cache_entries -= len(tree.info) + 1

    def _tree_write(self, entries, cache: bool = True) -> pygit2.Oid | None:
        tree = entries if isinstance(entries, _Tree) else _Tree.build(entries)
        if not tree.info:
            return None
        oid = self._write(ObjectType.TREE, tree.encode())
        if cache:
            self._cache_tree(oid, tree)
        return oid

    def _replace(self, tree: pygit2.Oid | None, name: str, oid: pygit2.Oid | None,
                 mode: int = FileMode.TREE) -> pygit2.Oid | None:
        return self._tree_write(self._entries(tree).with_entry(name, None if oid is None else (int(mode), oid.raw)))

    @staticmethod
    def _child_oid(tree: "_Tree", name: str) -> pygit2.Oid | None:
        e = tree.info.get(name)
        if e is None or e[0] != FileMode.TREE:
            return None
        return pygit2.Oid(raw=e[1])

    def _new_root(self, agent: str, agent_tree: pygit2.Oid | None, base=False) -> pygit2.Oid:
        a, b = fanout(agent)
        root_entries = self._entries(self.root_id if base is False else base)
        l1 = self._child_oid(root_entries, a)
        l2 = self._child_oid(self._entries(l1), b)
        new_l2 = self._replace(l2, agent, agent_tree)
        new_l1 = self._replace(l1, b, new_l2)
        tree = root_entries
        if FORMAT_NAME not in tree.info:
            tree = tree.with_entry(FORMAT_NAME, (int(FileMode.BLOB), self._blob(FORMAT_BLOB).raw))
        tree = tree.with_entry(a, None if new_l1 is None else (int(FileMode.TREE), new_l1.raw))
        new_root = self._tree_write(tree)
        # The versions just replaced are no longer the head's: out of the cache, so that
        # it holds the head's fan-out trees (at 100,000 agents the 256 ``ab/`` trees are
        # the working set; with the replaced versions in it too, the LRU dropped an
        # ``ab/`` before it came round again and 3 in 4 commits parsed one anew).
        for old, new in ((l2, new_l2), (l1, new_l1), (self.root_id if base is False else base, new_root)):
            if old != new:
                self._uncache_tree(old)
        return new_root

    def _commit_write(self, tree: pygit2.Oid, parents: list, author: pygit2.Signature,
                      committer: pygit2.Signature, message: str) -> pygit2.Oid:
        def ident(sig: pygit2.Signature) -> bytes:
            return b"%s <%s> %d +0000" % (sig.name.encode(), sig.email.encode(), sig.time)
        lines = [b"tree %s" % str(tree).encode()]
        lines += [b"parent %s" % str(p).encode() for p in parents]
        lines += [b"author " + ident(author), b"committer " + ident(committer)]
        return self._write(ObjectType.COMMIT, b"\n".join(lines) + b"\n\n" + message.encode())

    def discard_objects(self) -> None:
        """Forget objects of a group that never became durable."""
        self.pending_objects.clear()

    def flush_objects(self) -> int:
        """Write every pending object as one pack (not fsynced: the checkpoint's syncfs
        makes it durable; until then the journal is the durability point). Objects stay
        readable from memory until the pack is in place. Returns how many were written."""
        if not self.pending_objects:
            return 0
        objects = dict(self.pending_objects)
        mempack.write_pack(self.path, objects, durable=False)
        for oid in objects:
            self.pending_objects.pop(oid, None)
        return len(objects)

    def apply(self, change: ch.Change, update_ref: bool = True) -> pygit2.Oid | None:
        """Commit ``change`` on top of the head; None when it changes nothing.

        Raises FsError (ENOENT, EEXIST, ENOTEMPTY) when the change does not fit
        the current state. Deterministic: same head + same change = same commit.
        With ``update_ref=False`` only the in-memory head moves (the caller writes
        the ref once for a whole group with ``write_ref``).
        """
        with self._lock:
            agent = change.agent
            view = self.agent(agent)
            if change.op == ch.MKDIR:
                if view is not None:
                    raise FsError(errno.EEXIST, f"agent {agent} exists")
                a = change.attrs.get("", {})
                meta = {"id": agent, "created_ns": change.time_ns, "mode": a.get("mode", 0o755),
                        "uid": a.get("uid", change.who.uid), "gid": a.get("gid", change.who.gid),
                        "files": {}, "versions": {}}
                for key in ACL_KEYS:
                    if a.get(key):
                        meta[key] = a[key]
                new_view = AgentView(meta=meta, files={})
            elif view is None:
                raise FsError(errno.ENOENT, f"agent {agent} does not exist")
            elif change.op == ch.RMDIR:
                if view.files:
                    raise FsError(errno.ENOTEMPTY, f"agent {agent} still has {', '.join(sorted(view.files))}")
                new_view = None
            elif change.op == ch.MOVE:
                dst = change.move[1]
                if self.agent(dst) is not None:
                    raise FsError(errno.ENOTEMPTY, f"agent {dst} exists")
                meta = json.loads(json.dumps(view.meta))
                meta["id"] = dst
                for name in view.files:
                    fm = meta.setdefault("files", {}).get(name)
                    if fm is not None and not fm.get("fid"):
                        fm["fid"] = view.fid(agent, name)   # the file keeps its number
                files = dict(view.files)
                if self.codec.encrypted:
                    # Sealed blobs are bound to their place: seal them anew for the new id.
                    files = {n: self._blob(self.seal(dst, n, self.read_blob(oid, agent, n)))
                             for n, oid in files.items()}
                new_view = AgentView(meta=meta, files=files)
            else:
                new_view = self._updated_view(view, change)
                if new_view is None:
                    return None
            if new_view is None:
                agent_tree = None
            else:
                home = change.move[1] if change.op == ch.MOVE else agent
                meta_blob = self.seal(home, META_FILE, _encode_meta(new_view.meta))
                entries = {META_FILE: (int(FileMode.BLOB), self._blob(meta_blob).raw)}
                for name, oid in new_view.files.items():
                    entries[name] = (int(FileMode.BLOB), oid.raw)
                # Agent trees are never read back through the cache (``_new_root``
                # replaces them whole): not cached.
                agent_tree = self._tree_write(entries, cache=False)
                new_view.tree = agent_tree
            if change.op == ch.MOVE:
                # One commit: the subtree leaves the old id's place and appears at the new one.
                root = self._new_root(change.move[1], agent_tree, base=self._new_root(agent, None))
            else:
                root = self._new_root(agent, agent_tree)
            author, committer = signature_for(change.who, change.time_ns)
            parents = [self._head] if self._head is not None else []
            oid = self._commit_write(root, parents, author, committer, change.message())
            made = self.repo[oid]
            if made.author.name != author.name or made.message != change.message():
                # Never publish a commit git could not parse back exactly.
                raise FsError(errno.EIO, f"commit {oid} does not read back as written; not published")
            if update_ref:
                self.write_ref(oid)
            self._head = oid
            self._set_root_id(root)
            if change.op == ch.MOVE:
                self._cache_agent(agent, None)
                self._cache_agent(change.move[1], new_view)
                self._agent_listed(agent, False)
                self._agent_listed(change.move[1], True)
                return oid
            self._cache_agent(agent, new_view)
            self._agent_listed(agent, new_view is not None)
            return oid

    def _updated_view(self, view: AgentView, change: ch.Change) -> AgentView | None:
        meta = json.loads(json.dumps(view.meta))  # deep copy
        files = dict(view.files)
        fmeta = meta.setdefault("files", {})
        versions = meta.setdefault("versions", {})
        changed = False
        for name, data in sorted(change.files.items()):
            if data is None:
                if name not in files:
                    raise FsError(errno.ENOENT, f"{change.agent}/{name} does not exist")
                del files[name]
                fmeta.pop(name, None)
                changed = True
                continue
            stored = self.seal(change.agent, name, data)
            oid = self._blob(stored) if name not in files or pygit2.hash(stored) != files[name] else files[name]
            prev = fmeta.get(name) or {}
            attrs = change.attrs.get(name, {})
            # Same bytes and metadata: no new version. A rename onto the name with the same
            # content (temp file + rename) keeps the file's identity then; only a move
            # between state names carries its identity along (the kernel's dentry moves).
            # Times count only when the caller set them (a WRITE carries mtime_ns/atime_ns then).
            # An access time alone is never a new version (reading a source for cp -a moves it).
            ignored = ("mtime_ns", "atime_ns") if change.op in (ch.RENAME, ch.EXCHANGE) else ("fid", "atime_ns")
            if files.get(name) == oid and all(prev.get(k) == v for k, v in attrs.items() if k not in ignored):
                continue
            versions[name] = versions.get(name, 0) + 1
            fmeta[name] = {
                "mode": attrs.get("mode", prev.get("mode", 0o644)),
                "uid": attrs.get("uid", prev.get("uid", change.who.uid)),
                "gid": attrs.get("gid", prev.get("gid", change.who.gid)),
                "size": len(data), "mtime_ns": attrs.get("mtime_ns", change.time_ns),
                "version": versions[name],
            }
            if "atime_ns" in attrs:
                fmeta[name]["atime_ns"] = attrs["atime_ns"]
            fid = attrs.get("fid", prev.get("fid"))
            if fid:
                fmeta[name]["fid"] = fid
            acl = attrs["acl"] if "acl" in attrs else prev.get("acl")
            if acl:
                fmeta[name]["acl"] = acl
            files[name] = oid
            changed = True
        if change.op == ch.TOUCH:
            for name, attrs in change.attrs.items():
                target = fmeta.get(name)
                if target is None:
                    raise FsError(errno.ENOENT, f"{change.agent}/{name} does not exist")
                if "mtime_ns" in attrs and target.get("mtime_ns") != attrs["mtime_ns"]:
                    target["mtime_ns"] = attrs["mtime_ns"]
                    changed = True       # an access time alone is not a new version
                if changed and "atime_ns" in attrs:
                    target["atime_ns"] = attrs["atime_ns"]
        if change.op in (ch.CHMOD, ch.CHOWN):
            for name, attrs in change.attrs.items():
                target = meta if name == "" else fmeta.get(name)
                if target is None:
                    raise FsError(errno.ENOENT, f"{change.agent}/{name} does not exist")
                for key in ("mode", "uid", "gid"):
                    if key in attrs and target.get(key) != attrs[key]:
                        target[key] = attrs[key]
                        changed = True
                for key in ACL_KEYS:
                    # An ACL (fs/access.py: extended entries) or None to remove it.
                    if key in attrs and target.get(key) != attrs[key]:
                        if attrs[key]:
                            target[key] = attrs[key]
                        elif key in target:
                            del target[key]
                        else:
                            continue
                        changed = True
        if not changed:
            return None
        return AgentView(meta=meta, files=files)

