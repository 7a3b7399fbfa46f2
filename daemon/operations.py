"""pyfuse3 Operations: thin handlers that resolve inodes and call the state manager.

Every handler is wrapped so that an FsError becomes its errno, and any other exception
becomes EIO with a traceback in the log: a Python exception never kills the daemon.

Inode kinds: the root, agent directories, state files (durable config/memory and the
RAM-only runtime.json), and scratch nodes (RAM-only files and directories).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time

import pygit2
import pyfuse3

from ..fs import changes as ch
from ..fs.changes import Change, Who
from ..fs.errors import FsError
from ..fs.history import iso as history_iso
from ..fs.names import (HISTORY_DIR, RUNTIME_FILE, check_agent_id, decode_name, is_durable,
                        is_reserved, is_state)
from ..fs.runtime import RuntimeLayer
from ..fs.scratch import ScratchNode, ScratchSpace
from ..fs.validate import check_json, check_size
from .handles import Handle
from .historyview import HistoryView
from .inodes import ROOT, InodeTable
from .options import MountOptions
from .statemgr import StateManager

log = logging.getLogger("agentstatefs")

LIVE_TIMEOUT = 1.0
_QUIET = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, pyfuse3.ENOATTR, errno.ENOTSUP, errno.EXDEV}


def _ctx_pid(args) -> str:
    for a in args:
        if isinstance(a, pyfuse3.RequestContext):
            return f" (pid {a.pid} {ch.command_name(a.pid)})"
    return ""


def handler(fn):
    """Turn FsError into its errno and any other exception into EIO, logging once."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        self.sm.in_flight += 1
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            if exc.errno not in _QUIET:
                log.warning("%s: %s%s", op, exc.reason, _ctx_pid(args))
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.warning("%s: %s%s", op, exc, _ctx_pid(args))
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s: internal error%s; returning EIO", op, _ctx_pid(args))
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.sm.in_flight -= 1

    return wrapper


def _who(ctx) -> Who:
    return Who.from_pid(ctx.uid, ctx.gid, ctx.pid)


class AgentFS(pyfuse3.Operations):
    """The agentstatefs filesystem."""

    def __init__(self, store, statemgr: StateManager, options: MountOptions):
        super().__init__()
        self.store = store
        self.git = store.git
        self.sm = statemgr
        self.opts = options
        self.inodes = InodeTable()
        self.runtime = RuntimeLayer(options.runtime_versions)
        self.scratch = ScratchSpace(options.scratch_max)
        self.agent_scratch: dict[str, ScratchNode] = {}
        self.pending: dict[tuple[str, str], dict] = {}   # created, not yet committed
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, list] = {}
        self._next_fh = 0
        self.mount_ns = time.time_ns()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.history = HistoryView(store, self.inodes, self.runtime, self._entry, (self.uid, self.gid))

    # -- helpers -----------------------------------------------------------------
    def _fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    def _key(self, ino: int) -> tuple:
        key = self.inodes.key(ino)
        if key[0] == "alias":
            return ("state", key[1], key[2])
        return key

    def _agent_view(self, agent: str):
        view = self.git.agent(agent)
        if view is None:
            raise FsError(errno.ENOENT, f"agent {agent} does not exist")
        return view

    def _scratch_dir(self, agent: str) -> ScratchNode:
        node = self.agent_scratch.get(agent)
        if node is None:
            node = self.agent_scratch[agent] = self.scratch.new_node(
                self.inodes.agent(agent), stat.S_IFDIR | 0o755, 0, 0)
        return node

    def _exists_state(self, agent: str, name: str) -> bool:
        if (agent, name) in self.pending:
            return True
        if name == RUNTIME_FILE:
            return self.runtime.get(agent) is not None
        view = self.git.agent(agent)
        return view is not None and name in view.files

    def _entry(self, ino, mode, nlink, uid, gid, size, mtime_ns, ctime_ns=None, timeout=LIVE_TIMEOUT):
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = timeout
        e.attr_timeout = timeout
        e.st_mode = mode
        e.st_nlink = nlink
        e.st_uid = uid
        e.st_gid = gid
        e.st_rdev = 0
        e.st_size = size
        e.st_blksize = 4096
        e.st_blocks = (size + 511) // 512
        e.st_atime_ns = mtime_ns
        e.st_mtime_ns = mtime_ns
        e.st_ctime_ns = ctime_ns if ctime_ns is not None else mtime_ns
        return e

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        key = self._key(ino)
        kind = key[0]
        if kind.startswith("hist-"):
            return self.history.attr(ino, key)
        if kind == "root":
            return self._entry(ROOT, stat.S_IFDIR | 0o755, 2, self.uid, self.gid, 0, self.mount_ns)
        if kind == "agent":
            view = self._agent_view(key[1])
            m = view.meta
            mtime = max([f.get("mtime_ns", 0) for f in m.get("files", {}).values()] + [m.get("created_ns", 0)])
            return self._entry(ino, stat.S_IFDIR | m.get("mode", 0o755), 2, m.get("uid", 0),
                               m.get("gid", 0), 0, mtime)
        if kind == "state":
            agent, name = key[1], key[2]
            if name == RUNTIME_FILE:
                rf = self.runtime.get(agent)
                if rf is not None:
                    v = rf.current
                    return self._entry(ino, stat.S_IFREG | rf.mode, 1, rf.uid, rf.gid, len(v.data), v.time_ns)
            else:
                view = self.git.agent(agent)
                fm = view.file_meta(name) if view is not None else None
                if fm is not None:
                    return self._entry(ino, stat.S_IFREG | fm["mode"], 1, fm["uid"], fm["gid"],
                                       fm["size"], fm["mtime_ns"])
            p = self.pending.get((agent, name))
            if p is not None:
                return self._entry(ino, stat.S_IFREG | p["mode"], 1, p["uid"], p["gid"], 0, p["time_ns"])
            raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
        if kind == "scratch":
            n: ScratchNode = key[1]
            return self._entry(ino, n.mode, n.nlink, n.uid, n.gid, len(n.data), n.mtime_ns, n.ctime_ns)
        raise FsError(errno.ENOENT, f"unknown inode {ino}")

    def _listing_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        """Attributes for readdir. An agent not in the cache is not loaded just to be
        listed (``ls`` of 100,000 agents): it gets directory attributes the kernel must
        not cache (timeouts 0), so ``stat``/``ls -l`` still ask getattr for the truth."""
        key = self._key(ino)
        if key[0] == "agent" and self.git.cached_agent(key[1]) is None:
            return self._entry(ino, stat.S_IFDIR | 0o755, 2, 0, 0, 0, self.mount_ns, timeout=0)
        return self._attr(ino)

    def _child(self, parent: int, name: str) -> tuple[int, float | None]:
        """Inode of ``name`` in directory ``parent`` (registered, lookup count untouched)
        and the entry timeout to use when it differs from the inode's attribute timeout."""
        key = self._key(parent)
        kind = key[0]
        if kind.startswith("hist-"):
            return self.history.child(key, name)
        if name == HISTORY_DIR and kind in ("root", "agent"):
            if kind == "agent":
                self._agent_view(key[1])
            return self.inodes.stable(("hist-root", key[1] if kind == "agent" else "")), None
        return self._live_child(key, name), None

    def _live_child(self, key: tuple, name: str) -> int:
        kind = key[0]
        if kind == "root":
            if is_reserved(name):
                raise FsError(errno.ENOENT, f"{name} not available")
            if self.git.agent(name) is None:
                raise FsError(errno.ENOENT, f"agent {name} does not exist")
            return self.inodes.agent(name)
        if kind == "agent":
            agent = key[1]
            self._agent_view(agent)
            if is_state(name):
                if not self._exists_state(agent, name):
                    raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
                return self.inodes.state(agent, name)
            node = self._scratch_dir(agent).children.get(name)
        elif kind == "scratch" and key[1].is_dir:
            node = key[1].children.get(name)
        else:
            raise FsError(errno.ENOTDIR, "not a directory")
        if node is None:
            raise FsError(errno.ENOENT, f"{name} does not exist")
        return node.ino

    def _parent_dir(self, parent: int) -> tuple[str, str | None, ScratchNode | None]:
        """Classify a parent directory: ("root"|"agent"|"scratch", agent, scratch dir node)."""
        key = self._key(parent)
        if key[0].startswith("hist-"):
            raise FsError(errno.EROFS, "history is read-only")
        if key[0] == "root":
            return "root", None, None
        if key[0] == "agent":
            self._agent_view(key[1])
            return "agent", key[1], self._scratch_dir(key[1])
        if key[0] == "scratch" and key[1].is_dir:
            if key[1].nlink == 0:
                raise FsError(errno.ENOENT, "directory was removed")
            return "scratch", None, key[1]
        raise FsError(errno.ENOTDIR, "not a directory")

    def _invalidate_attr(self, ino: int) -> None:
        if self.inodes.known_to_kernel(ino):
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError:
                pass

    async def _commit(self, change: Change):
        oid = await self.sm.commit(change)
        for name in change.files:
            self._invalidate_attr(self.inodes.state(change.agent, name))
        return oid

    async def _save(self, agent: str, name: str, data: bytes, who: Who, attrs: dict | None = None,
                    note: str = "") -> None:
        """Validate and store new content of a state file (durable: commit; runtime: RAM)."""
        check_size(len(data), self.opts.max_size)
        try:
            check_json(data)
        except FsError as exc:
            raise FsError(exc.errno, f"{agent}/{name}: {exc.reason}") from None
        self._agent_view(agent)
        if name == RUNTIME_FILE:
            mode = (attrs or {}).get("mode", 0o644)
            self.runtime.put(agent, data, who, time.time_ns(), mode=mode)
            self._invalidate_attr(self.inodes.state(agent, name))
            return
        op = ch.WRITE
        view = self.git.agent(agent)
        blob = str(pygit2.hash(data))
        if view is not None and (name not in view.files or str(view.files[name]) != blob):
            past = self.store.history.past_version(agent, name, blob)
            if past is not None:
                op, note = ch.RESTORE, past.commit[:7]
        change = Change(op, agent, who, time.time_ns(), files={name: data},
                        attrs={name: attrs} if attrs else {}, note=note)
        await self._commit(change)

    # -- lifecycle -----------------------------------------------------------------
    def init(self) -> None:
        log.debug("FUSE session initialised")

    async def forget(self, inode_list) -> None:
        for ino, n in inode_list:
            try:
                self.inodes.forget(ino, n)
            except Exception:
                log.exception("forget(%s) failed", ino)

    # -- lookup & attributes ---------------------------------------------------------
    @handler
    async def lookup(self, parent_inode, name, ctx):
        ino, entry_timeout = self._child(parent_inode, decode_name(name))
        attr = self._attr(ino)
        if entry_timeout is not None:
            attr.entry_timeout = entry_timeout
        self.inodes.remember(ino)
        return attr

    @handler
    async def getattr(self, inode, ctx):
        return self._attr(inode)

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        key = self._key(inode)
        kind = key[0]
        if kind.startswith("hist-"):
            raise FsError(errno.EROFS, "history is read-only")
        if kind == "root":
            if fields.update_mode or fields.update_uid or fields.update_gid or fields.update_size:
                raise FsError(errno.EPERM, "the mount root's attributes are fixed")
            return self._attr(inode)
        if kind == "scratch":
            node: ScratchNode = key[1]
            if fields.update_size:
                if node.is_dir:
                    raise FsError(errno.EISDIR, "is a directory")
                self.scratch.resize(node, attr.st_size)
            if fields.update_mode:
                node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
            if fields.update_uid:
                node.uid = attr.st_uid
            if fields.update_gid:
                node.gid = attr.st_gid
            if fields.update_atime:
                node.atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                node.mtime_ns = attr.st_mtime_ns
            node.ctime_ns = time.time_ns()
            return self._attr(inode)
        who = _who(ctx)
        if kind == "agent":
            if fields.update_size:
                raise FsError(errno.EISDIR, "is a directory")
            upd = self._owner_update(attr, fields)
            if upd:
                op = ch.CHOWN if ("uid" in upd or "gid" in upd) else ch.CHMOD
                await self._commit(Change(op, key[1], who, time.time_ns(), attrs={"": upd}))
            return self._attr(inode)
        agent, name = key[1], key[2]
        if fields.update_size:
            h = self.handles.get(fh) if fh else None
            if h is not None and h.kind in ("state", "runtime") and h.writable:
                check_size(attr.st_size, self.opts.max_size)
                buf = h.ensure_buffer()
                if attr.st_size < len(buf):
                    del buf[attr.st_size:]
                else:
                    buf.extend(b"\0" * (attr.st_size - len(buf)))
                h.dirty = True
            else:
                current = self._current(agent, name)
                data = current[:attr.st_size] + b"\0" * max(0, attr.st_size - len(current))
                if data != current:
                    await self._save(agent, name, data, who)
        upd = self._owner_update(attr, fields)
        if upd:
            p = self.pending.get((agent, name))
            if p is not None:
                p.update(upd)
            elif name == RUNTIME_FILE:
                rf = self.runtime.get(agent)
                if rf is None:
                    raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
                rf.mode, rf.uid, rf.gid = upd.get("mode", rf.mode), upd.get("uid", rf.uid), upd.get("gid", rf.gid)
            else:
                op = ch.CHOWN if ("uid" in upd or "gid" in upd) else ch.CHMOD
                await self._commit(Change(op, agent, who, time.time_ns(), attrs={name: upd}))
        # atime/mtime of state files are the version's time: explicit updates are ignored.
        return self._attr(inode)

    @staticmethod
    def _owner_update(attr, fields) -> dict:
        upd = {}
        if fields.update_mode:
            upd["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid and attr.st_uid != 0xFFFFFFFF:
            upd["uid"] = attr.st_uid
        if fields.update_gid and attr.st_gid != 0xFFFFFFFF:
            upd["gid"] = attr.st_gid
        return upd

    def _current(self, agent: str, name: str) -> bytes:
        """Committed content of a state file (b"" for a pending, uncommitted one)."""
        if name == RUNTIME_FILE:
            rf = self.runtime.get(agent)
            if rf is not None:
                return rf.current.data
        else:
            data = self.git.read_file(agent, name)
            if data is not None:
                return data
        if (agent, name) in self.pending:
            return b""
        raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")

    # -- directories ---------------------------------------------------------------------
    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        name = decode_name(name)
        where, agent, sdir = self._parent_dir(parent_inode)
        perm = stat.S_IMODE(mode) & ~ctx.umask
        if where == "root":
            check_agent_id(name)
            if self.git.agent(name) is not None:
                raise FsError(errno.EEXIST, f"agent {name} exists")
            await self._commit(Change(ch.MKDIR, name, _who(ctx), time.time_ns(),
                                      attrs={"": {"mode": perm, "uid": ctx.uid, "gid": ctx.gid}}))
            ino = self.inodes.agent(name)
        else:
            self._check_scratch_name(where, agent, name)
            if name in sdir.children:
                raise FsError(errno.EEXIST, f"{name} exists")
            node = self.scratch.new_node(self.inodes.new_scratch_ino(), stat.S_IFDIR | perm, ctx.uid, ctx.gid)
            self.inodes.set(node.ino, ("scratch", node))
            sdir.children[name] = node
            sdir.touch()
            ino = node.ino
        attr = self._attr(ino)
        self.inodes.remember(ino)
        return attr

    def _check_scratch_name(self, where: str, agent: str | None, name: str) -> None:
        if is_reserved(name):
            raise FsError(errno.EINVAL, f"{name!r}: names starting with '@' are reserved")
        if where == "agent" and is_state(name):
            if self._exists_state(agent, name):
                raise FsError(errno.EEXIST, f"{agent}/{name} exists")
            raise FsError(errno.EINVAL, f"{agent}/{name} is a state file name, not a directory")

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        name = decode_name(name)
        where, agent, sdir = self._parent_dir(parent_inode)
        if name == HISTORY_DIR:
            raise FsError(errno.EROFS, "history is read-only")
        if where == "root":
            if is_reserved(name):
                raise FsError(errno.EPERM, f"{name} is reserved")
            self._agent_view(name)
            s = self.agent_scratch.get(name)
            if (s is not None and s.children) or self.runtime.get(name) is not None \
                    or any(a == name for a, _ in self.pending):
                raise FsError(errno.ENOTEMPTY, f"agent {name} is not empty")
            await self._commit(Change(ch.RMDIR, name, _who(ctx), time.time_ns()))
            self.agent_scratch.pop(name, None)
            return
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
        node.nlink = 0
        sdir.touch()

    @handler
    async def opendir(self, inode, ctx):
        key = self._key(inode)
        entries: list[tuple[str, int]] = []
        if key[0].startswith("hist-"):
            count, item = self.history.entries(key)
            stable = self.inodes.stable

            def hist_item(i):
                name, k = item(i)
                return name, stable(k)
            fh = self._fh()
            self.dirs[fh] = (count, hist_item)
            return fh
        visible_history = [(HISTORY_DIR, None)] if self.opts.history_visible else []
        if key[0] == "root":
            entries = [(a, self.inodes.agent(a)) for a in sorted(self.git.agents())]
        elif key[0] == "agent":
            agent = key[1]
            view = self._agent_view(agent)
            names = set(view.files) | {n for a, n in self.pending if a == agent}
            if self.runtime.get(agent) is not None:
                names.add(RUNTIME_FILE)
            entries = [(n, self.inodes.state(agent, n)) for n in sorted(names)]
            s = self.agent_scratch.get(agent)
            if s is not None:
                entries += [(n, c.ino) for n, c in sorted(s.children.items())]
        elif key[0] == "scratch" and key[1].is_dir:
            entries = [(n, c.ino) for n, c in sorted(key[1].children.items())]
        else:
            raise FsError(errno.ENOTDIR, "not a directory")
        if visible_history and key[0] in ("root", "agent"):
            hist = self.inodes.stable(("hist-root", key[1] if key[0] == "agent" else ""))
            entries.insert(0, (HISTORY_DIR, hist))
        fh = self._fh()
        self.dirs[fh] = (len(entries), entries.__getitem__)
        return fh

    @handler
    async def readdir(self, fh, start_id, token):
        count, item = self.dirs.get(fh, (0, None))
        for i in range(start_id, count):
            name, ino = item(i)
            try:
                attr = self._listing_attr(ino)
            except FsError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, name.encode(), attr, i + 1):
                break
            self.inodes.remember(ino)

    @handler
    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    @handler
    async def fsyncdir(self, fh, datasync):
        return  # every acknowledged change is already durable

    # -- files -------------------------------------------------------------------------------
    @handler
    async def open(self, inode, flags, ctx):
        key = self._key(inode)
        fh = self._fh()
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        if key[0] == "scratch":
            node: ScratchNode = key[1]
            if node.is_dir:
                raise FsError(errno.EISDIR, "is a directory")
            if writable and flags & os.O_TRUNC:
                self.scratch.resize(node, 0)
            self.handles[fh] = Handle(fh, inode, "scratch", node=node, flags=flags)
            return pyfuse3.FileInfo(fh=fh, keep_cache=False)
        if key[0] in ("hist-file", "hist-rt"):
            if writable or flags & os.O_TRUNC:
                raise FsError(errno.EROFS, "history is read-only")
            self.handles[fh] = Handle(fh, inode, "history", flags=flags, snapshot=self.history.content(key))
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        if key[0] != "state":
            raise FsError(errno.EISDIR, "is a directory")
        agent, name = key[1], key[2]
        snapshot = self._current(agent, name)
        h = Handle(fh, inode, "runtime" if name == RUNTIME_FILE else "state", agent=agent, name=name,
                   flags=flags, who=_who(ctx) if writable else Who(ctx.uid, ctx.gid, ctx.pid),
                   snapshot=snapshot)
        if writable and flags & os.O_TRUNC and snapshot:
            h.buffer = bytearray()
            h.dirty = True
        self.handles[fh] = h
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        name = decode_name(name)
        where, agent, sdir = self._parent_dir(parent_inode)
        perm = stat.S_IMODE(mode) & ~ctx.umask
        fh = self._fh()
        if where == "root":
            raise FsError(errno.EPERM, f"{name!r}: only agent directories can be created at the top level")
        if where == "agent" and is_state(name):
            if self._exists_state(agent, name):
                if flags & os.O_EXCL:
                    raise FsError(errno.EEXIST, f"{agent}/{name} exists")
                ino = self.inodes.state(agent, name)
                h = Handle(fh, ino, "runtime" if name == RUNTIME_FILE else "state", agent=agent, name=name,
                           flags=flags, who=_who(ctx), snapshot=self._current(agent, name))
            else:
                self.pending[(agent, name)] = {"mode": perm, "uid": ctx.uid, "gid": ctx.gid,
                                               "time_ns": time.time_ns()}
                ino = self.inodes.state(agent, name)
                h = Handle(fh, ino, "runtime" if name == RUNTIME_FILE else "state", agent=agent, name=name,
                           flags=flags, who=_who(ctx), buffer=bytearray(), dirty=True, created=True)
            self.handles[fh] = h
            attr = self._attr(ino)
            self.inodes.remember(ino)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False), attr
        self._check_scratch_name(where, agent, name)
        if name in sdir.children:
            node = sdir.children[name]
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST, f"{name} exists")
        else:
            node = self.scratch.new_node(self.inodes.new_scratch_ino(), stat.S_IFREG | perm, ctx.uid, ctx.gid)
            self.inodes.set(node.ino, ("scratch", node))
            sdir.children[name] = node
            sdir.touch()
        self.handles[fh] = Handle(fh, node.ino, "scratch", node=node, flags=flags)
        attr = self._attr(node.ino)
        self.inodes.remember(node.ino)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), attr

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if not stat.S_ISREG(mode):
            raise FsError(errno.EPERM, "only regular files and directories are supported")
        fi, attr = await self.create.__wrapped__(self, parent_inode, name, mode, os.O_WRONLY, ctx)
        await self.release.__wrapped__(self, fi.fh)
        return attr

    def _handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise FsError(errno.EBADF, f"unknown file handle {fh}")
        return h

    @handler
    async def read(self, fh, off, size):
        h = self._handle(fh)
        if h.kind == "scratch":
            h.node.atime_ns = time.time_ns()
            return bytes(h.node.data[off:off + size])
        return bytes(h.content()[off:off + size])

    @handler
    async def write(self, fh, off, buf):
        h = self._handle(fh)
        if h.kind == "scratch":
            if h.append:
                off = len(h.node.data)
            return self.scratch.write(h.node, off, buf)
        data = h.ensure_buffer()
        if h.append:
            off = len(data)
        end = off + len(buf)
        if end > self.opts.max_size:
            raise FsError(errno.EFBIG, f"{h.agent}/{h.name}: write to {end} bytes exceeds the "
                                       f"{self.opts.max_size}-byte state file cap")
        if off > len(data):
            data.extend(b"\0" * (off - len(data)))
        data[off:end] = buf
        h.dirty = True
        return len(buf)

    async def _commit_handle(self, h: Handle) -> None:
        """Commit a dirty handle's buffer; on failure keep the buffer (a later flush may succeed)."""
        data = bytes(h.content())
        attrs = None
        p = self.pending.get((h.agent, h.name))
        if p is not None:
            attrs = {k: p[k] for k in ("mode", "uid", "gid")}
        try:
            await self._save(h.agent, h.name, data, h.who, attrs)
        except FsError as exc:
            h.last_error = exc
            log.debug("flush of %s/%s refused: %s", h.agent, h.name, exc.reason)
            raise pyfuse3.FUSEError(exc.errno) from None
        h.snapshot, h.buffer, h.dirty, h.last_error = data, None, False, None
        self.pending.pop((h.agent, h.name), None)

    @handler
    async def flush(self, fh):
        h = self.handles.get(fh)
        if h is None or h.kind in ("scratch", "history") or not h.dirty:
            return
        await self._commit_handle(h)

    @handler
    async def fsync(self, fh, datasync):
        h = self.handles.get(fh)
        if h is None or h.kind in ("scratch", "history") or not h.dirty:
            return
        await self._commit_handle(h)

    @handler
    async def release(self, fh):
        h = self.handles.pop(fh, None)
        if h is None or h.kind in ("scratch", "history"):
            return
        if h.dirty:
            reason = h.last_error.reason if h.last_error else "closed without a successful flush"
            reason = reason.removeprefix(f"{h.agent}/{h.name}: ")
            log.warning("%s/%s: not committed (%s); previous version kept (pid %d %s, uid %d)",
                        h.agent, h.name, reason, h.who.pid, h.who.comm, h.who.uid)
        if h.created and (h.agent, h.name) in self.pending:
            still_open = any(o.created and o.agent == h.agent and o.name == h.name
                             for o in self.handles.values())
            if not still_open:
                del self.pending[(h.agent, h.name)]
                try:
                    pyfuse3.invalidate_entry_async(self.inodes.agent(h.agent), h.name.encode(),
                                                   ignore_enoent=True)
                except Exception:
                    pass

    # -- names ------------------------------------------------------------------------------
    @handler
    async def unlink(self, parent_inode, name, ctx):
        name = decode_name(name)
        where, agent, sdir = self._parent_dir(parent_inode)
        if name == HISTORY_DIR:
            raise FsError(errno.EROFS, "history is read-only")
        if where == "root":
            raise FsError(errno.EISDIR if self.git.agent(name) is not None else errno.ENOENT,
                          f"{name} is an agent directory (use rmdir / rm -r)")
        if where == "agent" and is_state(name):
            ino = self.inodes.state(agent, name)
            if self.pending.pop((agent, name), None) is not None and not self._exists_state(agent, name):
                return
            if name == RUNTIME_FILE:
                if not self.runtime.remove(agent):
                    raise FsError(errno.ENOENT, f"{agent}/{name} does not exist")
            else:
                await self._commit(Change(ch.DELETE, agent, _who(ctx), time.time_ns(), files={name: None}))
            self._invalidate_attr(ino)
            return
        node = sdir.children.get(name)
        if node is None:
            raise FsError(errno.ENOENT, f"{name} does not exist")
        if node.is_dir:
            raise FsError(errno.EISDIR, f"{name} is a directory")
        del sdir.children[name]
        node.nlink = 0
        self.scratch.release(node)
        sdir.touch()

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old, new = decode_name(name_old), decode_name(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        swhere, sagent, sdir = self._parent_dir(parent_inode_old)
        dwhere, dagent, ddir = self._parent_dir(parent_inode_new)
        if swhere == "root" or dwhere == "root":
            # Agents are not renamed in place: EXDEV makes mv(1) copy and delete instead.
            raise FsError(errno.EXDEV, "agent directories are moved by copy (EXDEV)")
        src_state = swhere == "agent" and is_state(old)
        dst_state = dwhere == "agent" and is_state(new)
        exists = (self._exists_state(dagent, new) if dst_state else new in ddir.children)
        if flags & pyfuse3.RENAME_NOREPLACE and exists:
            raise FsError(errno.EEXIST, f"{new} exists")
        if dwhere == "agent" and is_reserved(new):
            raise FsError(errno.EINVAL, f"{new!r}: names starting with '@' are reserved")
        if src_state:
            if not self._exists_state(sagent, old):
                raise FsError(errno.ENOENT, f"{sagent}/{old} does not exist")
            if dst_state and sagent == dagent and is_durable(old) and is_durable(new):
                if old == new:
                    return
                data = self._current(sagent, old)
                await self._commit(Change(ch.RENAME, sagent, _who(ctx), time.time_ns(),
                                          files={old: None, new: data}))
                return
            raise FsError(errno.EXDEV, "state files move between kinds by copy (EXDEV)")
        node = sdir.children.get(old)
        if node is None:
            raise FsError(errno.ENOENT, f"{old} does not exist")
        if dst_state:
            if node.is_dir:
                raise FsError(errno.EISDIR, f"{old} is a directory; {new} is a state file")
            attrs = {"mode": stat.S_IMODE(node.mode), "uid": node.uid, "gid": node.gid}
            await self._save(dagent, new, bytes(node.data), _who(ctx), attrs)
            del sdir.children[old]
            node.nlink = 0
            self.scratch.release(node)
            sdir.touch()
            # The kernel now maps `new` to the scratch inode: make it answer as the state file.
            self.inodes.set(node.ino, ("alias", dagent, new))
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
            target.nlink = 0
            self.scratch.release(target)
        del sdir.children[old]
        ddir.children[new] = node
        node.ctime_ns = time.time_ns()
        sdir.touch()
        ddir.touch()

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise FsError(errno.EPERM, "hard links are not supported")

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        raise FsError(errno.EPERM, "symbolic links are not supported")

    # -- xattrs ------------------------------------------------------------------------------
    def _state_xattrs(self, agent: str, name: str) -> dict[str, bytes]:
        if name == RUNTIME_FILE:
            rf = self.runtime.get(agent)
            if rf is None:
                return {}
            return {"user.agentstatefs.version": str(rf.current.version).encode(),
                    "user.agentstatefs.time": history_iso(rf.current.time_ns / 1e9).encode()}
        view = self.git.agent(agent)
        fm = view.file_meta(name) if view else None
        last = self.store.history.last_change(agent, name)
        return self.history.file_xattrs(agent, name, fm, last.commit if last else None)

    @handler
    async def getxattr(self, inode, name, ctx):
        key = self._key(inode)
        xname = name.decode("utf-8", "replace")
        if key[0] == "root" and xname == "user.agentstatefs.pid":
            return str(os.getpid()).encode()
        if key[0] == "scratch":
            value = key[1].xattrs.get(xname)
        elif key[0].startswith("hist-"):
            value = self.history.xattrs(key).get(xname)
        elif key[0] == "state":
            value = self._state_xattrs(key[1], key[2]).get(xname)
        else:
            value = None
        if value is None:
            raise FsError(pyfuse3.ENOATTR, f"no attribute {xname}")
        return value

    @handler
    async def listxattr(self, inode, ctx):
        key = self._key(inode)
        if key[0] == "scratch":
            return [k.encode() for k in key[1].xattrs]
        if key[0] == "state":
            return [k.encode() for k in self._state_xattrs(key[1], key[2])]
        if key[0].startswith("hist-"):
            return [k.encode() for k in self.history.xattrs(key)]
        return []

    @handler
    async def setxattr(self, inode, name, value, ctx):
        key = self._key(inode)
        if key[0].startswith("hist-"):
            raise FsError(errno.EROFS, "history is read-only")
        if key[0] != "scratch":
            raise FsError(errno.ENOTSUP, "extended attributes can only be set on scratch files")
        if len(name) > 255:
            raise FsError(errno.ERANGE, "attribute name too long")
        if len(value) > 65536:
            raise FsError(errno.E2BIG, "attribute value too large")
        key[1].xattrs[name.decode("utf-8", "replace")] = bytes(value)

    @handler
    async def removexattr(self, inode, name, ctx):
        key = self._key(inode)
        if key[0] != "scratch" or key[1].xattrs.pop(name.decode("utf-8", "replace"), None) is None:
            raise FsError(pyfuse3.ENOATTR, "no such attribute")

    @handler
    async def statfs(self, ctx):
        st = os.statvfs(self.store.repo_dir)
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = st.f_bfree
        s.f_bavail = st.f_bavail
        s.f_files = st.f_files
        s.f_ffree = st.f_ffree
        s.f_favail = st.f_favail
        s.f_namemax = 255
        return s
