"""Read-only ``@history`` views, resolved through the store's commit index.

Keys (see inodes.py for the live ones):
  ("hist-root", "")                      M/@history
  ("hist-root", agent)                   M/<agent>/@history
  ("hist-commit", scope, name, hex)      M/@history/<name> or M/<agent>/@history/<name>
                                         (``name`` as looked up: HEAD, a prefix, a time...)
  ("hist-agent", name, hex, agent)       M/@history/<name>/<agent>
  ("hist-file", hex, agent, file)        a state file as of a commit (shared by all paths)
  ("hist-runtime", agent)                M/<agent>/@history/runtime
  ("hist-rt", agent, version)            one RAM version of runtime.json

Modes and owners are shown as they were (like ZFS snapshot directories), so `cp -r`
restores them; read-only-ness is enforced with EROFS, not with mode bits.
Directory keys include the name used to reach them, so the kernel never sees one
directory under two names; files may be shared. Everything reached by a full commit id
is immutable and gets long kernel cache timeouts.
"""

from __future__ import annotations

import bisect
import errno
import stat

from .errors import FsError
from .gitstore import AgentView
from .history import iso
from .names import DURABLE_FILES

IMMUTABLE = 3600.0
LIVE = 1.0
RUNTIME_DIR = "runtime"


class HistoryView:
    def __init__(self, store, inodes, runtime, entry_factory, root_owner):
        self.store = store
        self.git = store.reader
        self.index = store.history
        self.inodes = inodes
        self.runtime = runtime
        self.entry = entry_factory      # (ino, mode, nlink, uid, gid, size, mtime_ns, ctime_ns, timeout)
        self.root_owner = root_owner    # (uid, gid) of the mount root

    # -- helpers ----------------------------------------------------------------------
    def _agent_at(self, hexid: str, agent: str):
        """``agent`` at a commit, under the id it had then (it may have been moved since:
        ``M/<new>/@history`` lists the commits from before the move too)."""
        view = self.git.agent_at(hexid, agent)
        if view is None:
            pos = self.index.position(hexid)
            old = self.index.name_at(agent, pos) if pos is not None else agent
            if old != agent:
                view = self.git.agent_at(hexid, old)
        return view

    def _view(self, hexid: str, agent: str):
        view = self._agent_at(hexid, agent)
        if view is None:
            raise FsError(errno.ENOENT, f"agent {agent} does not exist at {hexid[:12]}")
        return view

    def _agent_owner(self, agent: str):
        view = self.git.agent(agent)
        if view is None:
            raise FsError(errno.ENOENT, f"agent {agent} does not exist")
        m = view.meta
        return m.get("mode", 0o755), m.get("uid", 0), m.get("gid", 0)

    def _commit_key(self, scope: str, name: str) -> tuple:
        entry = self.index.resolve(name, scope or None)
        return ("hist-commit", scope, name, entry.commit)

    # -- lookup ------------------------------------------------------------------------
    def child(self, key: tuple, name: str) -> tuple[int, float]:
        """(inode, entry timeout) of ``name`` inside history directory ``key``."""
        kind = key[0]
        if kind == "hist-root":
            scope = key[1]
            if scope and name == RUNTIME_DIR:
                return self.inodes.stable(("hist-runtime", scope)), LIVE
            ckey = self._commit_key(scope, name)
            # A full id never changes meaning; a prefix hardly; HEAD~N and times move with
            # every commit, so the kernel must ask again each time (entry timeout 0).
            if name == ckey[3]:
                timeout = IMMUTABLE
            elif ckey[3].startswith(name):
                timeout = LIVE
            else:
                timeout = 0.0
            return self.inodes.stable(ckey), timeout
        if kind == "hist-commit":
            _, scope, used, hexid = key
            if scope:
                if name not in DURABLE_FILES or name not in self._view_or_empty(hexid, scope).files:
                    raise FsError(errno.ENOENT, f"{scope}/{name} does not exist at {hexid[:12]}")
                return self.inodes.stable(("hist-file", hexid, scope, name)), IMMUTABLE
            if self.git.agent_at(hexid, name) is None:
                raise FsError(errno.ENOENT, f"agent {name} does not exist at {hexid[:12]}")
            return self.inodes.stable(("hist-agent", used, hexid, name)), IMMUTABLE
        if kind == "hist-agent":
            _, used, hexid, agent = key
            if name not in DURABLE_FILES or name not in self._view(hexid, agent).files:
                raise FsError(errno.ENOENT, f"{agent}/{name} does not exist at {hexid[:12]}")
            return self.inodes.stable(("hist-file", hexid, agent, name)), IMMUTABLE
        if kind == "hist-runtime":
            rf = self.runtime.get(key[1])
            if rf is not None and name.endswith(".json") and name[:-5].isdigit():
                v = int(name[:-5])
                if any(x.version == v for x in rf.versions):
                    return self.inodes.stable(("hist-rt", key[1], str(v))), LIVE
            raise FsError(errno.ENOENT, f"runtime version {name} is not in memory")
        raise FsError(errno.ENOTDIR, "not a directory")

    def _view_or_empty(self, hexid: str, agent: str):
        view = self._agent_at(hexid, agent)
        return view if view is not None else AgentView(meta={}, files={})

    # -- attributes ----------------------------------------------------------------------
    def attr(self, ino: int, key: tuple):
        kind = key[0]
        uid, gid = self.root_owner
        if kind == "hist-root":
            # Its time is the newest commit it lists (a directory's mtime is its last change).
            t = self.index.newest_ns(key[1] or None)
            if key[1]:
                mode, uid, gid = self._agent_owner(key[1])
                return self.entry(ino, stat.S_IFDIR | (mode & 0o555), 2, uid, gid, 0, t, None, LIVE)
            return self.entry(ino, stat.S_IFDIR | 0o555, 2, uid, gid, 0, t, None, LIVE)
        if kind == "hist-commit":
            _, scope, used, hexid = key
            t = self._commit_time_ns(hexid)
            if scope:
                mode, uid, gid = self._agent_owner(scope)
                return self.entry(ino, stat.S_IFDIR | mode, 2, uid, gid, 0, t, None, IMMUTABLE)
            return self.entry(ino, stat.S_IFDIR | 0o555, 2, uid, gid, 0, t, None, IMMUTABLE)
        if kind == "hist-agent":
            _, used, hexid, agent = key
            m = self._view(hexid, agent).meta
            return self.entry(ino, stat.S_IFDIR | m.get("mode", 0o755), 2, m.get("uid", 0),
                              m.get("gid", 0), 0, self._commit_time_ns(hexid), None, IMMUTABLE)
        if kind == "hist-file":
            _, hexid, agent, name = key
            fm = self._view(hexid, agent).file_meta(name)
            if fm is None:
                raise FsError(errno.ENOENT, f"{agent}/{name} does not exist at {hexid[:12]}")
            return self.entry(ino, stat.S_IFREG | fm["mode"], 1, fm["uid"], fm["gid"],
                              fm["size"], fm["mtime_ns"], None, IMMUTABLE)
        if kind == "hist-runtime":
            mode, uid, gid = self._agent_owner(key[1])
            rf = self.runtime.get(key[1])
            t = rf.current.time_ns if rf is not None else self.index.newest_ns(key[1])
            return self.entry(ino, stat.S_IFDIR | (mode & 0o555), 2, uid, gid, 0, t, None, LIVE)
        if kind == "hist-rt":
            v = self._rt_version(key[1], int(key[2]))
            rf = self.runtime.get(key[1])
            return self.entry(ino, stat.S_IFREG | rf.mode, 1, rf.uid, rf.gid, len(v.data),
                              v.time_ns, None, LIVE)
        raise FsError(errno.ENOENT, "unknown history inode")

    def _commit_time_ns(self, hexid: str) -> int:
        pos = self.index.position(hexid)
        if pos is not None:
            return self.index.time_ns(pos)
        return self.git.repo[hexid].commit_time * 1_000_000_000

    def _rt_version(self, agent: str, version: int):
        rf = self.runtime.get(agent)
        if rf is not None:
            for v in rf.versions:
                if v.version == version:
                    return v
        raise FsError(errno.ENOENT, f"runtime version {version} of {agent} is no longer in memory")

    # -- listing ----------------------------------------------------------------------------
    def entries(self, key: tuple):
        """(count, item(i) -> (name, key)) for a history directory, newest first."""
        kind = key[0]
        if kind == "hist-root":
            scope = key[1]
            if scope:
                positions = list(self.index.agent_positions(scope))
                head: list = []
                if self.runtime.get(scope) is not None:
                    head = [(RUNTIME_DIR, ("hist-runtime", scope))]
                n = len(positions)

                def item(i):
                    if i < len(head):
                        return head[i]
                    hexid = self.index.entries[positions[n - 1 - (i - len(head))]].commit
                    return hexid, ("hist-commit", scope, hexid, hexid)
                return len(head) + n, item
            n = len(self.index)

            def item(i):
                hexid = self.index.entries[n - 1 - i].commit
                return hexid, ("hist-commit", "", hexid, hexid)
            return n, item
        if kind == "hist-commit":
            _, scope, used, hexid = key
            if scope:
                names = sorted(self._view_or_empty(hexid, scope).files)
                items = [(f, ("hist-file", hexid, scope, f)) for f in names]
            else:
                # 100,000 agents: the entries are made as the listing reaches them.
                agents = sorted(self.git.iter_agents(self.git.tree_at(hexid)))
                return len(agents), lambda i: (agents[i], ("hist-agent", used, hexid, agents[i]))
            return len(items), items.__getitem__
        if kind == "hist-agent":
            _, used, hexid, agent = key
            items = [(f, ("hist-file", hexid, agent, f)) for f in sorted(self._view(hexid, agent).files)]
            return len(items), items.__getitem__
        if kind == "hist-runtime":
            rf = self.runtime.get(key[1])
            versions = [v.version for v in reversed(rf.versions)] if rf else []
            items = [(f"{v}.json", ("hist-rt", key[1], str(v))) for v in versions]
            return len(items), items.__getitem__
        raise FsError(errno.ENOTDIR, "not a directory")

    # -- content and facts ----------------------------------------------------------------------
    def content(self, key: tuple) -> bytes:
        if key[0] == "hist-file":
            _, hexid, agent, name = key
            view = self._view(hexid, agent)
            if name not in view.files:
                raise FsError(errno.ENOENT, f"{agent}/{name} does not exist at {hexid[:12]}")
            # Sealed under the id the agent had then (it may have been moved since).
            return self.git.read_blob(view.files[name], view.meta.get("id", agent), name)
        if key[0] == "hist-rt":
            return self._rt_version(key[1], int(key[2])).data
        raise FsError(errno.EISDIR, "is a directory")

    def source(self, key: tuple) -> tuple[str, str] | None:
        """(blob hex, commit that made that version) of a ``hist-file``, for restore labels."""
        if key[0] != "hist-file":
            return None
        _, hexid, agent, name = key
        view = self._view(hexid, agent)
        if name not in view.files:
            return None
        return str(view.files[name]), self.version_commit(hexid, agent, name) or hexid

    def version_commit(self, hexid: str, agent: str, name: str) -> str | None:
        """The commit (at or before ``hexid``) that produced ``agent/name``'s version there."""
        pos = self.index.position(hexid)
        if pos is None:
            return None
        positions = self.index.agent_positions(agent)
        i = bisect.bisect_right(positions, pos) - 1
        while i >= 0:
            e = self.index.entries[positions[i]]
            if any(n == name for n, _ in e.files):
                return e.commit
            i -= 1
        return None

    def file_xattrs(self, agent: str, name: str, fm: dict | None, commit: str | None) -> dict[str, bytes]:
        """The version facts of a state file version."""
        if fm is None:
            return {}
        out = {"user.agentstatefs.version": str(fm["version"]).encode(),
               "user.agentstatefs.time": iso(fm["mtime_ns"] / 1e9).encode()}
        if commit:
            c = self.git.repo[commit]
            out["user.agentstatefs.commit"] = commit.encode()
            out["user.agentstatefs.author"] = f"{c.author.name} <{c.author.email}>".encode()
        return out

    def xattrs(self, key: tuple) -> dict[str, bytes]:
        if key[0] == "hist-file":
            _, hexid, agent, name = key
            fm = self._view(hexid, agent).file_meta(name)
            return self.file_xattrs(agent, name, fm, self.version_commit(hexid, agent, name))
        if key[0] == "hist-rt":
            v = self._rt_version(key[1], int(key[2]))
            return {"user.agentstatefs.version": str(v.version).encode(),
                    "user.agentstatefs.time": iso(v.time_ns / 1e9).encode()}
        return {}

    @staticmethod
    def is_history(key: tuple) -> bool:
        return key[0].startswith("hist-")

