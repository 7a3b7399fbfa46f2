"""pyfuse3 Operations: a thin adapter from FUSE requests to the namespace (fs/namespace.py).

Each handler decodes names, turns the request context into a ``Caller``, calls the
namespace and converts its ``Attr`` records to pyfuse3's. Every handler is wrapped so
that an FsError becomes its errno and any other exception becomes EIO with one
traceback in the log: a Python exception never kills the daemon.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from time import perf_counter

import pyfuse3

from ..fs.changes import Who
from ..fs.errors import FsError
from ..fs.metrics import metrics
from ..fs.namespace import Attr, Caller, Kernel, Namespace
from ..fs.names import decode_name
from . import direntry

log = logging.getLogger("agentstatefs")

# ESTALE: a compare-and-swap that lost a race, an expected outcome (the caller retries).
# EACCES: a permission denial, an expected outcome recorded in the audit log (-o audit).
_QUIET = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENODATA, errno.ENOTSUP, errno.EXDEV, errno.ESTALE,
          errno.EAGAIN, errno.EACCES}


def _ctx_text(args) -> str:
    for a in args:
        if isinstance(a, pyfuse3.RequestContext):
            w = Who.from_pid(a.uid, a.gid, a.pid)
            return f" (pid {w.pid} {w.comm}, uid {w.uid})"
    return ""


def handler(fn=None, *, timed: bool = True):
    """Turn FsError into its errno and any other exception into EIO, logging once;
    time the request into its op's latency histogram (``timed=False``: the handler
    times itself) and count errors by op and errno (fs/metrics.py)."""
    if fn is None:
        return functools.partial(handler, timed=timed)
    op = fn.__name__
    timer = metrics.op_timer(op) if timed else None
    errors: dict = {}

    def count_error(e: int) -> None:
        c = errors.get(e)
        if c is None:
            c = errors[e] = metrics.op_errors.labels(op, errno.errorcode.get(e, str(e)))
        c.inc()

    @functools.wraps(fn)
    async def wrapper(self, *args):
        self.sm.in_flight += 1
        t0 = perf_counter()
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError as exc:
            count_error(exc.errno)
            raise
        except FsError as exc:
            count_error(exc.errno)
            if op == "flush" or op == "fsync":
                # A refused close is logged once, at release, with the final reason.
                log.debug("%s: %s", op, exc.reason)
            elif exc.errno not in _QUIET:
                log.warning("%s: %s%s", op, exc.reason, _ctx_text(args))
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            count_error(exc.errno or errno.EIO)
            log.warning("%s: %s%s", op, exc, _ctx_text(args))
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            count_error(errno.EIO)
            log.exception("%s: internal error%s; returning EIO", op, _ctx_text(args))
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.sm.in_flight -= 1
            if timer is not None:
                timer.observe(perf_counter() - t0)

    return wrapper


_READ = metrics.op_timer("read")
_EVENTS_READ = metrics.op_timer("read_events")   # blocking @events reads, kept apart from file reads


def _caller(ctx) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.pid, ctx.umask)


def _entry(a: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.generation = a.generation
    e.entry_timeout = a.timeout if a.entry_timeout is None else a.entry_timeout
    e.attr_timeout = a.timeout
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = 0
    e.st_size = a.size
    e.st_blksize = 4096
    e.st_blocks = a.blocks if a.blocks is not None else (a.size + 511) // 512
    e.st_atime_ns = a.atime_ns if a.atime_ns is not None else a.mtime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns if a.ctime_ns is not None else a.mtime_ns
    return e


class FuseKernel(Kernel):
    """Tells the kernel when a name or an inode's attributes changed behind its back."""

    def __init__(self):
        self.inodes = None

    def invalidate_attr(self, ino: int) -> None:
        if self.inodes is not None and self.inodes.known_to_kernel(ino):
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError:
                pass

    def invalidate_entry(self, parent: int, name: str) -> None:
        if self.inodes is not None and self.inodes.known_to_kernel(parent):
            try:
                pyfuse3.invalidate_entry_async(parent, name.encode(), ignore_enoent=True)
            except Exception:
                pass


def _xname(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _stop_events_on_terminate(ns: Namespace) -> None:
    """Blocked ``@events`` reads each hold one of pyfuse3's request tasks, and
    ``pyfuse3.main()`` returns only once they end: when the daemon terminates the FUSE
    loop (SIGTERM/SIGINT), they end first (readers see end of file)."""
    original = getattr(pyfuse3.terminate, "__wrapped__", pyfuse3.terminate)

    @functools.wraps(original)
    def terminate():
        try:
            ns.events.stop()
        finally:
            original()
    pyfuse3.terminate = terminate


class AgentFS(pyfuse3.Operations):
    """The agentstatefs filesystem, as pyfuse3 sees it."""

    def __init__(self, store, statemgr, options, audit=None):
        super().__init__()
        kernel = FuseKernel()
        self.ns = Namespace(store, statemgr, options, kernel)
        self.ns.listing_without_lookup = direntry.available()
        self.ns.audit = audit
        kernel.inodes = self.ns.inodes
        _stop_events_on_terminate(self.ns)
        self.store = store
        self.sm = statemgr
        self.opts = options

    # -- lifecycle -----------------------------------------------------------------
    def init(self) -> None:
        log.debug("FUSE session initialised")

    async def forget(self, inode_list) -> None:
        try:
            self.ns.forget(inode_list)
        except Exception:
            log.exception("forget failed")

    # -- lookup & attributes ---------------------------------------------------------
    @handler
    async def lookup(self, parent_inode, name, ctx):
        return _entry(await self.ns.lookup(parent_inode, decode_name(name), _caller(ctx)))

    @handler
    async def access(self, inode, mode, ctx):
        return self.ns.may(inode, mode, _caller(ctx))

    @handler
    async def getattr(self, inode, ctx):
        return _entry(await self.ns.getattr(inode, _caller(ctx)))

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        kw = {}
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid and attr.st_uid != 0xFFFFFFFF:
            kw["uid"] = attr.st_uid
        if fields.update_gid and attr.st_gid != 0xFFFFFFFF:
            kw["gid"] = attr.st_gid
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        return _entry(await self.ns.setattr(inode, _caller(ctx), fh=fh, **kw))

    # -- directories -------------------------------------------------------------------
    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        return _entry(await self.ns.mkdir(parent_inode, decode_name(name), mode, _caller(ctx)))

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        await self.ns.rmdir(parent_inode, decode_name(name), _caller(ctx))

    @handler
    async def opendir(self, inode, ctx):
        return await self.ns.opendir(inode, _caller(ctx))

    @handler
    async def readdir(self, fh, start_id, token):
        shared = [None, None]      # a shared Attr (namespace.Attr.shared) and its entry

        def reply(name, attr, nxt):
            if attr.shared:
                if shared[0] is not attr:
                    shared[0], shared[1] = attr, _entry(attr)
                e = shared[1]
                e.st_ino, e.generation = attr.ino, attr.generation
            else:
                e = _entry(attr)
            return pyfuse3.readdir_reply(token, name.encode("utf-8", "surrogateescape"), e, nxt)
        if self.ns.listing_without_lookup:
            reply.bare = self._bare_reply(token)
        await self.ns.readdir(fh, start_id, reply)

    @staticmethod
    def _bare_reply(token):
        """``reply.bare(name_bytes, ino, next_id)``: a directory entry without a node
        (daemon/direntry.py), with one EntryAttributes reused for the whole call."""
        e = pyfuse3.EntryAttributes()
        e.st_mode = stat.S_IFDIR | 0o755
        e.entry_timeout = e.attr_timeout = 0
        slot = direntry.nodeless_slot(e)
        readdir_reply = pyfuse3.readdir_reply

        def bare(name: bytes, ino, nxt):
            e.st_ino = ino
            slot.value = 0
            return readdir_reply(token, name, e, nxt)
        bare.entry = e        # keeps the object the slot points into alive with the function
        return bare

    @handler
    async def releasedir(self, fh):
        await self.ns.releasedir(fh)

    @handler
    async def fsyncdir(self, fh, datasync):
        await self.ns.fsyncdir(fh)   # parked removals of the directory (fs/removals.py)

    # -- files ---------------------------------------------------------------------------
    @staticmethod
    def _file_info(h) -> pyfuse3.FileInfo:
        if h.kind in ("state", "runtime", "rejected", "patch", "report"):
            return pyfuse3.FileInfo(fh=h.fh, direct_io=True, keep_cache=False)
        if h.kind == "events":
            return pyfuse3.FileInfo(fh=h.fh, direct_io=True, keep_cache=False, nonseekable=True)
        return pyfuse3.FileInfo(fh=h.fh, keep_cache=h.kind == "history")

    @handler
    async def open(self, inode, flags, ctx):
        return self._file_info(await self.ns.open(inode, flags, _caller(ctx)))

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        h, attr = await self.ns.create(parent_inode, decode_name(name), mode, flags, _caller(ctx))
        return self._file_info(h), _entry(attr)

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return _entry(await self.ns.mknod(parent_inode, decode_name(name), mode, rdev, _caller(ctx)))

    @handler(timed=False)
    async def read(self, fh, off, size):
        t0 = perf_counter()
        try:
            return await self.ns.read(fh, off, size)
        finally:
            h = self.ns.handles.get(fh)
            (_EVENTS_READ if h is not None and h.kind == "events" else _READ).observe(perf_counter() - t0)

    @handler
    async def write(self, fh, off, buf):
        return await self.ns.write(fh, off, buf)

    @handler
    async def flush(self, fh):
        await self.ns.flush(fh)

    @handler
    async def fsync(self, fh, datasync):
        await self.ns.fsync(fh, datasync)

    @handler
    async def release(self, fh):
        await self.ns.release(fh)

    @handler
    async def poll(self, inode, fh, poll_handle, ctx):
        return self.ns.poll(fh, poll_handle)

    # -- names ---------------------------------------------------------------------------
    @handler
    async def unlink(self, parent_inode, name, ctx):
        await self.ns.unlink(parent_inode, decode_name(name), _caller(ctx))

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.ns.rename(parent_inode_old, decode_name(name_old), parent_inode_new,
                             decode_name(name_new), flags, _caller(ctx))

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return _entry(await self.ns.link(inode, new_parent_inode, decode_name(new_name), _caller(ctx)))

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        return _entry(await self.ns.symlink(parent_inode, decode_name(name), target, _caller(ctx)))

    @handler
    async def readlink(self, inode, ctx):
        return await self.ns.readlink(inode, _caller(ctx))

    # -- xattrs --------------------------------------------------------------------------
    @handler
    async def getxattr(self, inode, name, ctx):
        return await self.ns.getxattr(inode, _xname(name), _caller(ctx))

    @handler
    async def listxattr(self, inode, ctx):
        return [n.encode("utf-8", "surrogateescape") for n in await self.ns.listxattr(inode, _caller(ctx))]

    @handler
    async def setxattr(self, inode, name, value, ctx):
        await self.ns.setxattr(inode, _xname(name), value, _caller(ctx))

    @handler
    async def removexattr(self, inode, name, ctx):
        await self.ns.removexattr(inode, _xname(name), _caller(ctx))

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
