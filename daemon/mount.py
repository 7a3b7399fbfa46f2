"""Mount lifecycle: checks, stale-mount cleanup, lock, daemonizing, signals, shutdown.

Order at start: clean a stale mount point -> take the repository lock -> open the store
(which recovers from any crash) -> mount -> serve. On SIGTERM/SIGINT: wait for
in-flight handlers and commits, stop the FUSE loop, checkpoint, unmount, exit 0.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import signal
import subprocess
import sys

import pyfuse3
import pygit2
import trio

from ..fs import private
from ..fs.audit import AuditLog
from ..fs.errors import RepoError
from ..fs.repolock import RepoLock
from ..fs.store import Store
from . import logs, sdnotify
from .credentials import CredentialError, repository_key
from .operations import AgentFS
from .options import MountOptions
from ..fs.statemgr import StateManager
from ..fs.metrics import metrics
from prometheus_client import start_http_server

log = logging.getLogger("agentstatefs")


class MountError(Exception):
    """A clear, user-facing reason why the mount cannot start."""


def mount_source(mountpoint: str) -> tuple[str, str] | None:
    """(fstype, source) of the mount at ``mountpoint`` from /proc/self/mountinfo, if any."""
    target = os.path.abspath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                mp = parts[4].replace("\\040", " ")
                if mp == target:
                    return parts[sep + 1], parts[sep + 2]
    except OSError:
        pass
    return None


def clean_stale_mount(mountpoint: str) -> None:
    """Lazily unmount a dead FUSE mount ("Transport endpoint is not connected")."""
    try:
        os.stat(mountpoint)
        if os.path.ismount(mountpoint):
            os.statvfs(mountpoint)  # never answered from the kernel's attribute cache
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise MountError(f"mount point {mountpoint}: {exc.strerror}") from None
    log.warning("mount point %s is a stale FUSE mount (daemon died); cleaning it up", mountpoint)
    for cmd in (["fusermount3", "-uz", mountpoint], ["umount", "-l", mountpoint]):
        try:
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return
        except FileNotFoundError:
            continue
    raise MountError(f"cannot clean up the stale mount at {mountpoint}")


def _first_fetch(repo: str, url: str) -> None:
    """--replica: fetch the remote before serving; without it, serve the local copy if
    there is one (with a warning), else refuse to start."""
    from ..fs.monitor import redact_url
    from ..fs.replica import fetch
    try:
        head = fetch(repo, url)
        log.info("replica: fetched %s from %s", head, redact_url(url))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        if os.path.exists(os.path.join(repo, "refs", "heads", "main")):
            log.warning("replica: %s; serving the local copy until a fetch succeeds", exc)
        else:
            raise RepoError(f"replica: {exc}") from None


OWN_REPO_HINT = "as a regular user, mount a repository you own: agentstatefs mount --repo ~/agents ~/agents-mnt"


def _blocker(path: str, write: bool) -> tuple[str, str] | None:
    """Where this user is stopped on the way to ``path``: (directory, what fails), or
    None. Walks down from ``/``: a directory it cannot search, the directory it would
    have to create ``path`` in, or ``path`` itself when it must be writable."""
    cur = "/"
    for comp in [c for c in path.split("/") if c]:
        if not os.access(cur, os.X_OK):
            return cur, "search"
        nxt = os.path.join(cur, comp)
        if not os.path.lexists(nxt):
            return None if os.access(cur, os.W_OK | os.X_OK) else (cur, "create in")
        cur = nxt
    if write and os.path.isdir(cur) and not os.access(cur, os.W_OK | os.X_OK):
        return cur, "write"
    return None


def check_writable(repo: str, mountpoint: str, readonly: bool) -> None:
    """Before anything is created or forked: can this user create/write the repository
    (and its own files: a repository another user created) and reach the mount point?
    A clear message instead of a traceback from deep in start-up."""
    checks = [] if readonly else [("repository", p, True) for p in
                                  (repo, os.path.join(repo, "agentstatefs"), os.path.join(repo, "objects"))]
    checks.append(("mount point", mountpoint, False))
    for what, path, write in checks:
        block = _blocker(path, write)
        if block is None:
            continue
        where, how = block
        try:
            st = os.stat(where)
            owner = f"owned by uid {st.st_uid}, mode {st.st_mode & 0o7777:o}"
        except OSError:
            owner = "not accessible"
        hint = OWN_REPO_HINT if what == "repository" else \
            "give a mount point you own, e.g. agentstatefs mount --repo ~/agents ~/agents-mnt"
        top = repo if what == "repository" else mountpoint
        raise MountError(f"cannot use the {what} {top}: permission denied to {how} {where} ({owner}); {hint}")


def prepare_mountpoint(mountpoint: str) -> None:
    clean_stale_mount(mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    if os.path.ismount(mountpoint):
        info = mount_source(mountpoint)
        raise MountError(f"{mountpoint} is already a mount point ({info[0] if info else 'unknown'} "
                         f"{info[1] if info else ''}); unmount it first")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")


def init_fuse(ops, mountpoint: str, fuse_options) -> None:
    """``pyfuse3.init`` with libfuse's and fusermount3's own words on failure: they write
    the real reason ("fuse: failed to open /dev/fuse: Permission denied", "option
    allow_other only allowed if 'user_allow_other' is set in /etc/fuse.conf") to fd 2,
    which is the log file in background mode; it is captured and becomes the message."""
    import tempfile
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        error = None
        try:
            pyfuse3.init(ops, mountpoint, fuse_options)
        except RuntimeError as exc:
            error = exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read(8192).decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if error is None:
        for line in lines:
            log.warning("libfuse: %s", line)
        return
    reasons = [line for line in lines if line != str(error)]
    reason = "; ".join(reasons) if reasons else f"{error} (is /dev/fuse available and fuse3 installed?)"
    hint = ""
    if "user_allow_other" in reason:
        hint = " (add a line user_allow_other to /etc/fuse.conf, or mount without -o allow_other)"
    elif "/dev/fuse" in reason and "ermission denied" in reason:
        hint = " (this user may not open /dev/fuse: ask for access to it, or mount as root)"
    raise MountError(f"cannot mount {mountpoint}: {reason}{hint}")


def fuse_queue_probe():
    """A function answering whether FUSE requests wait in the kernel's queue, not yet
    read by the loop: a zero-timeout poll of this process's ``/dev/fuse`` descriptor
    (found through /proc/self/fd; pyfuse3 does not expose it). The committer asks it
    before committing a group on the trio thread (decision 45)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                fds.append(int(name))
        except (OSError, ValueError):
            continue
    if len(fds) != 1:
        log.debug("no single /dev/fuse descriptor (%s): lone writers commit in a thread", fds)
        return lambda: True
    poller = select.poll()
    poller.register(fds[0], select.POLLIN)
    return lambda: bool(poller.poll(0))


async def _serve(ops: AgentFS, sm: StateManager, mountpoint: str, on_ready, notifier=None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sm.run_committer)
        nursery.start_soon(sm.run_flusher)
        nursery.start_soon(sm.run_checkpointer)
        nursery.start_soon(sm.run_maintenance)      # prune and gc asked for through the mount
        for task in sm.background:
            nursery.start_soon(task)
        # Combining the per-group packs is part of the storage engine: it runs whatever
        # pack_every says (0 only turns off the commit-count trigger).
        nursery.start_soon(sm.run_packer, ops.opts.pack_every or None, 5.0)
        nursery.start_soon(_watch_signals, sm, ops.ns)
        nursery.start_soon(ops.ns.monitor.run)   # warnings, repository size (fs/monitor.py)
        nursery.start_soon(_watch_sighup, ops.ns.audit)
        nursery.start_soon(ops.ns.run_removals)
        if notifier is not None:  # systemd: READY=1 once the mount answers, watchdog, STATUS
            nursery.start_soon(notifier)
        nursery.start_soon(_ready_when_answering, mountpoint, on_ready)
        nursery.start_soon(ops.ns.warm_up)
        await pyfuse3.main()
        # The FUSE loop ended (unmounted, or terminate() after a signal).
        sdnotify.stopping("unmounted; finishing in-flight commits")
        await ops.ns.settle_removals()
        await sm.quiesce()
        nursery.cancel_scope.cancel()


async def _ready_when_answering(mountpoint: str, on_ready) -> None:
    """Report readiness (the parent of a background mount waits for it) only once a
    ``statvfs`` through the kernel has been answered by this daemon."""
    while True:
        try:
            await trio.to_thread.run_sync(os.statvfs, mountpoint, abandon_on_cancel=True)
            break
        except OSError:
            await trio.sleep(0.01)
    on_ready()


async def _watch_sighup(audit) -> None:
    """SIGHUP reopens the audit log (after logrotate moved it away)."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            if audit is not None:
                audit.reopen()
            else:
                log.info("SIGHUP: nothing to reopen (no -o audit)")


async def _watch_signals(sm: StateManager, ns) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: finishing in-flight commits and unmounting",
                     signal.Signals(signum).name)
            sdnotify.stopping(f"{signal.Signals(signum).name}: finishing in-flight commits, unmounting")
            await ns.settle_removals()
            await sm.quiesce()
            pyfuse3.terminate()
            return


def run(repo: str, mountpoint: str, options: MountOptions, *, foreground: bool,
        debug: bool = False, systemd: bool = False, log_file: str | None = None) -> int:
    repo = os.path.abspath(repo)
    mountpoint = os.path.abspath(mountpoint)
    # Everything the daemon (and libgit2, and git repack) creates is private, whatever
    # the umask it was started with (SPEC 3); the mount's own files get their modes
    # from each caller's umask, not from this one.
    private.restrict_umask()
    if os.geteuid() != 0:
        try:
            check_writable(repo, mountpoint, options.ro)
        except MountError as exc:
            sys.stderr.write(f"agentstatefs: {exc}\n")
            return 1
    ready_w = None
    if not foreground:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(ready_w)
            msg = b""
            while True:
                chunk = os.read(ready_r, 4096)
                if not chunk:
                    break
                msg += chunk
            if msg.startswith(b"OK"):
                return 0
            sys.stderr.write(msg.decode(errors="replace") or "agentstatefs: daemon exited during start-up\n")
            return 1
        os.close(ready_r)
        os.setsid()
        log_path = log_file or os.path.join(repo, "agentstatefs", "daemon.log")
        try:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            hint = "" if log_file else f"; {OWN_REPO_HINT}"
            os.write(ready_w, f"agentstatefs: cannot open the log {log_path}: {exc.strerror}{hint}\n".encode())
            os._exit(1)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)
    elif log_file:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    logs.setup(debug=debug, systemd=systemd)

    def fail(message: str) -> int:
        log.error("%s", message)
        sdnotify.notify(f"STATUS=failed: {message}")
        if ready_w is not None:
            os.write(ready_w, f"agentstatefs: {message}\n".encode())
            os.close(ready_w)
        else:
            sys.stderr.flush()
        return 1

    # libgit2's object cache grows to hundreds of MB at 100,000 agents; our own LRUs
    # (agents, blobs) hold what matters, so keep libgit2's small.
    pygit2.option(pygit2.enums.Option.SET_CACHE_MAX_SIZE, 32 << 20)
    # libgit2 keeps every pack it ever opened open and mapped, also after a repack deleted
    # it; bound the open pack files (it closes the least recently used beyond this).
    pygit2.option(pygit2.enums.Option.SET_MWINDOW_FILE_LIMIT, 64)
    pygit2.option(pygit2.enums.Option.SET_MWINDOW_MAPPED_LIMIT, 256 << 20)
    # The committer and flusher threads hand work back and forth with the trio thread
    # several times per durable write; with the default 5 ms GIL switch interval a hand-off
    # could wait that long behind the event loop (measured: ~0.5 ms per write).
    sys.setswitchinterval(0.0002)
    lock = RepoLock(repo)
    try:
        prepare_mountpoint(mountpoint)
        if options.ro and not options.replica and not os.path.isdir(repo):
            raise RepoError(f"repository {repo} does not exist (read-only mount cannot create it)")
        os.makedirs(repo, mode=0o700, exist_ok=True)
        private.tighten(repo)
        key = repository_key(options.keyfile)
        if not options.ro:
            lock.acquire(mountpoint)
        if options.replica:
            _first_fetch(repo, options.replica)
        store = Store(repo, readonly=options.ro, key=key)
        del key
    except (MountError, RepoError, CredentialError) as exc:
        lock.release()
        return fail(str(exc))
    except OSError as exc:
        lock.release()
        return fail(f"cannot start: {exc}")

    audit = None
    if options.audit:
        try:
            audit = AuditLog(os.path.abspath(options.audit), reads=options.audit_reads)
        except OSError as exc:
            store.close()
            lock.release()
            return fail(f"cannot open the audit log {options.audit}: {exc.strerror}")
    sm = StateManager(store, checkpoint_interval=options.checkpoint_interval)
    ops = AgentFS(store, sm, options, audit)
    replicator = None
    if options.replicate and not options.ro:
        from ..fs.replicate import Replicator
        replicator = Replicator(repo, options.replicate, options.replicate_interval).start()
        sm.replication = replicator.stats
        log.info("replicating main to %s every %g s", replicator.shown, options.replicate_interval)
    if options.replica:
        from ..fs.replica import ReplicaFollower
        follower = ReplicaFollower(store, options.replica, options.replica_interval,
                                   lambda g: sm.on_publish(g), lambda summary: sm.on_rewrite(summary))
        sm.replication = follower.stats
        sm.background.append(follower.run)
    metrics.slow_commit_s = options.slow_commit_ms / 1000
    metrics.slow_fsync_s = options.slow_fsync_ms / 1000
    http = None
    if options.metrics_listen is not None:
        host, port = options.metrics_listen
        try:
            http = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            store.close()
            lock.release()
            return fail(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} (-o metrics_listen)")
        log.info("serving metrics at http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)
    try:
        init_fuse(ops, mountpoint, options.fuse_options(repo))
    except MountError as exc:
        store.close()
        lock.release()
        return fail(str(exc))
    sm.requests_waiting = fuse_queue_probe()
    log.info("mounted %s at %s (%s)%s", repo, mountpoint, ",".join(sorted(options.fuse_options(repo))),
             ", encrypted at rest" if store.codec.encrypted else "")

    def on_ready():
        if ready_w is not None:
            os.write(ready_w, b"OK\n")
            os.close(ready_w)

    clean = False
    try:
        trio.run(_serve, ops, sm, mountpoint, on_ready,
                 functools.partial(sdnotify.run, mountpoint, sdnotify.store_status(store, mountpoint)))
        clean = True
    except BaseException:
        log.exception("FUSE main loop failed")
        raise
    finally:
        try:
            store.close()
        except Exception:
            log.exception("final checkpoint failed (the journal will be replayed at next mount)")
        if replicator is not None:
            replicator.stop(final_push=True)     # the final checkpoint moved the ref: push it
        if audit is not None:
            audit.close()
            if audit.dropped:
                log.warning("audit log %s: %d line(s) were dropped in all", audit.path, audit.dropped)
        pyfuse3.close(unmount=clean)
        if not clean:
            subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True)
        lock.release()
        if http is not None:
            try:
                http[0].shutdown()
            except Exception:
                pass
        log.info("unmounted %s; exiting", mountpoint)
    return 0
