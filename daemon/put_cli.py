"""Verbs that work through the mount, for shell scripts: ``put`` (a write that reports
its refusal: shell builtins ignore close() errors) and ``watch`` (the change stream).

They only use the files of the mount (no daemon internals): the mount point comes
from ``--mountpoint``, else ``$AGENTSTATEFS_MOUNTPOINT``, else the mount holding
``--repo`` (default repository), else the default mount point.
"""

from __future__ import annotations

import errno
import os
import sys

from .options import DEFAULT_MOUNTPOINT, DEFAULT_REPO_ROOT, DEFAULT_TENANT

STATE_FILES = ("config.json", "memory.json", "runtime.json")
LAST_ERROR = "user.agentstatefs.last-error"
IF_VERSION = "user.agentstatefs.if-version"


def find_mountpoint(args) -> str:
    mp = getattr(args, "mountpoint", None) or os.environ.get("AGENTSTATEFS_MOUNTPOINT")
    if not mp:
        repo = getattr(args, "repo", None) or os.path.join(DEFAULT_REPO_ROOT, DEFAULT_TENANT)
        if os.path.isdir(os.path.join(repo, "objects")):
            from .history_cli import _mounted_at
            mp = _mounted_at(repo) or None
    mp = os.path.abspath(mp or DEFAULT_MOUNTPOINT)
    try:
        os.getxattr(mp, "user.agentstatefs.pid")
    except OSError:
        raise SystemExit(f"agentstatefs: no agentstatefs mount at {mp} (use --mountpoint)") from None
    return mp


def _why(path: str, rejected: str, exc: OSError) -> str:
    """The daemon's reason for refusing our write, when it is ours (same pid)."""
    for p in (rejected, path):
        try:
            text = os.getxattr(p, LAST_ERROR).decode("utf-8", "replace")
        except OSError:
            continue
        if f"; pid {os.getpid()} " in text:
            return text
    return os.strerror(exc.errno) if exc.errno else str(exc)


def write_checked(mountpoint: str, agent: str, name: str, data: bytes, if_version: int | None = None) -> None:
    """Write ``data`` to ``agent/name`` through the mount; raise OSError with the reason."""
    d = os.path.join(mountpoint, agent)
    path = os.path.join(d, name)
    rejected = os.path.join(d, "@rejected", name)
    target = path
    if if_version is not None:
        target = os.path.join(d, f".put-{os.getpid()}.tmp")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, os.strerror(exc.errno)) from None
    try:
        os.close(fd)
    except OSError as exc:
        raise OSError(exc.errno, _why(path, rejected, exc)) from None
    if if_version is None:
        return
    try:
        os.setxattr(target, IF_VERSION, str(if_version).encode())
        os.rename(target, path)
    except OSError as exc:
        reason = (f"{agent}/{name} is no longer at version {if_version}" if exc.errno == errno.ESTALE
                  else _why(path, rejected, exc))
        try:
            os.unlink(target)
        except OSError:
            pass
        raise OSError(exc.errno, reason) from None


def cmd_put(args) -> int:
    mp = find_mountpoint(args)
    data = sys.stdin.buffer.read()
    try:
        write_checked(mp, args.agent, args.file, data, args.if_version)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno, str(exc.errno))
        print(f"agentstatefs: {args.agent}/{args.file} not written ({code}): {exc.strerror}", file=sys.stderr)
        return 3 if exc.errno == errno.ESTALE else 1
    return 0


def cmd_watch(args) -> int:
    import json
    import signal
    mp = find_mountpoint(args)
    # A read of @events blocks inside the kernel: let Ctrl-C end the process there.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    fd = os.open(os.path.join(mp, "@events"), os.O_RDONLY)
    seen, rest = 0, b""
    out = sys.stdout.buffer
    try:
        while args.count is None or seen < args.count:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return 0                 # the daemon is stopping
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if args.agent is not None:
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    if ev.get("op") != "lost" and ev.get("agent") != args.agent:
                        continue
                out.write(line + b"\n")
                out.flush()
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
    finally:
        os.close(fd)
    return 0


def register(sub) -> None:
    default_repo = os.path.join(DEFAULT_REPO_ROOT, DEFAULT_TENANT)
    p = sub.add_parser("put", help="write stdin to a state file through the mount; exit 1 with the reason if refused",
                       description="Write standard input to MOUNTPOINT/ID/FILE. Unlike a shell's 'echo >', it "
                                   "reports a refused write (invalid JSON, too large): exit status 1 and the "
                                   "reason on stderr. With --if-version N the write is a compare-and-swap: "
                                   "exit status 3 (ESTALE) unless the file is at version N (0: must not exist).")
    p.add_argument("agent", metavar="ID")
    p.add_argument("file", metavar="FILE", choices=STATE_FILES)
    p.add_argument("--if-version", type=int, metavar="N", help="compare-and-swap: only if the file is at version N")
    p.add_argument("--mountpoint", "-m", help="the mount (default $AGENTSTATEFS_MOUNTPOINT, the mount of "
                                              f"--repo, or {DEFAULT_MOUNTPOINT})")
    p.add_argument("--repo", default=default_repo, help=argparse_suppress())
    p.set_defaults(func=cmd_put)

    p = sub.add_parser("watch", help="print the change stream (M/@events) as JSON lines, optionally of one agent",
                       description="Print every change made through the mount as it is published: one JSON "
                                   "line {seq, time, agent, file, op, commit, version, uid, pid} per change; "
                                   "refused writes as op 'rejected' with the reason; 'lost' when this reader "
                                   "fell behind and events were dropped.")
    p.add_argument("agent", metavar="ID", nargs="?", help="only this agent's events (and 'lost')")
    p.add_argument("--count", "-n", type=int, help="exit after printing N events")
    p.add_argument("--mountpoint", "-m", help="the mount (default as for put)")
    p.add_argument("--repo", default=default_repo, help=argparse_suppress())
    p.set_defaults(func=cmd_watch)


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS
