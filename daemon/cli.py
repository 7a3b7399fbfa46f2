"""The ``agentstatefs`` command line.

Each group of verbs lives in its own module with a ``register(subparsers)`` function;
``VERB_MODULES`` lists them. This module holds mount and umount.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time

from ..fs.changes import safe_text
from .options import DEFAULT_MOUNTPOINT, DEFAULT_REPO_ROOT, DEFAULT_TENANT, HELP, MountOptions


def _default_repo() -> str:
    return os.path.join(DEFAULT_REPO_ROOT, DEFAULT_TENANT)


def cmd_mount(args) -> int:
    try:
        options = MountOptions.parse(args.options)
    except ValueError as exc:
        print(f"agentstatefs: {exc}", file=sys.stderr)
        return 2
    from . import mount  # pyfuse3 is imported only by verbs that need it
    systemd = args.systemd or bool(os.environ.get("NOTIFY_SOCKET"))
    repo = args.repo
    if args.replica:
        from ..fs.replicate import check_url
        try:
            options.replica = check_url(args.replica)
        except ValueError as exc:
            print(f"agentstatefs: --replica: {exc}", file=sys.stderr)
            return 2
        options.ro = True
        if repo is None:
            import hashlib
            repo = os.path.join(DEFAULT_REPO_ROOT, "replicas", hashlib.sha256(args.replica.encode()).hexdigest()[:16])
    elif options.replicate and options.ro:
        print("agentstatefs: -o replicate needs a writable mount (a read-only one has nothing to push)",
              file=sys.stderr)
        return 2
    return mount.run(repo or _default_repo(), args.mountpoint, options, foreground=args.foreground or systemd,
                     debug=args.debug, systemd=systemd, log_file=args.log_file)


def _daemon_pid(mountpoint: str) -> int | None:
    try:
        return int(os.getxattr(mountpoint, "user.agentstatefs.pid"))
    except (OSError, ValueError):
        return None


def holders(mp: str) -> list[str]:
    """Processes using something under ``mp`` (as ``fuser -m`` would say), from /proc:
    current directory, root, executable, open files and mapped files. Only links are
    read, nothing under the mount is touched (it may be hung). A regular user sees only
    its own processes' descriptors."""
    prefix = mp.rstrip("/") + "/"

    def under(target: str) -> bool:
        target = target.removesuffix(" (deleted)")
        return target == mp or target.startswith(prefix)

    out = []
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        if int(pid) == os.getpid():
            continue
        uses: list[str] = []
        for link, what in (("cwd", "current directory"), ("root", "root directory"), ("exe", "executable")):
            try:
                if under(os.readlink(f"/proc/{pid}/{link}")):
                    uses.append(what)
            except OSError:
                pass
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if under(target):
                    uses.append(f"open file {target}")
        except OSError:
            pass
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
            uses += [f"mapped file {t}" for t in sorted(mapped) if under(t)]
        except OSError:
            pass
        if uses:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            more = f", +{len(uses) - 3} more" if len(uses) > 3 else ""
            out.append(safe_text(f"pid {pid} ({comm}): {', '.join(uses[:3])}{more}", 512))
    return out


def cmd_umount(args) -> int:
    mp = os.path.abspath(args.mountpoint)
    pid = _daemon_pid(mp)
    if pid is None and not os.path.ismount(mp):
        try:
            os.stat(mp)
        except OSError:
            # A stale mount (daemon gone): just detach it.
            subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
            return 0
        print(f"agentstatefs: {mp} is not mounted", file=sys.stderr)
        return 1
    r = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    if r.returncode != 0:
        reason = r.stderr.strip()
        held = holders(mp) if "busy" in reason.lower() else []
        if held:
            reason += "; in use by " + "; ".join(held[:10]) + (f"; and {len(held) - 10} more" if len(held) > 10 else "")
        print(f"agentstatefs: cannot unmount {mp}: {reason}", file=sys.stderr)
        return 1
    if pid is not None:
        deadline = time.monotonic() + args.timeout
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(") ")[-1].startswith("Z"):
                        break  # exited, waiting to be reaped by its parent
            except OSError:
                break
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}/stat") and time.monotonic() >= deadline:
            print(f"agentstatefs: daemon {pid} still running after {args.timeout}s", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agentstatefs",
        description="Durable, versioned, crash-safe agent state as plain files (FUSE).")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    m = sub.add_parser("mount", help="mount a repository (default: tenant 'default' at /mnt/agents)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HELP,
                       description="Mount the agent state repository REPO at MOUNTPOINT. Without "
                                   "--foreground the daemon detaches once the mount answers.")
    m.add_argument("mountpoint", nargs="?", default=DEFAULT_MOUNTPOINT,
                   help=f"where to mount (default {DEFAULT_MOUNTPOINT}; created if missing)")
    m.add_argument("--repo", default=None,
                   help=f"bare git repository holding the state (default {_default_repo()}; created if missing; "
                        f"with --replica the local copy, default {DEFAULT_REPO_ROOT}/replicas/<hash of URL>)")
    m.add_argument("--replica", metavar="URL",
                   help="mount a read-only replica of the git remote URL's main (fetched into --repo, "
                        "followed every replica_interval seconds; writes fail with EROFS)")
    m.add_argument("-o", dest="options", action="append", metavar="OPTS",
                   help="comma-separated mount options, see below")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    m.add_argument("--systemd", action="store_true",
                   help="run under systemd: foreground, journald log priorities "
                        "(implied when NOTIFY_SOCKET is set)")
    m.add_argument("--debug", action="store_true", help="log every request at debug level")
    m.add_argument("--log-file", help="append the log here (background default: REPO/agentstatefs/daemon.log)")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount and wait until the daemon has exited",
                       description="Unmount MOUNTPOINT (refused while files are open there) and wait "
                                   "until the daemon has made every version durable and exited.")
    u.add_argument("mountpoint", nargs="?", default=DEFAULT_MOUNTPOINT)
    u.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the daemon (default 60)")
    u.set_defaults(func=cmd_umount)
    for module in VERB_MODULES:
        importlib.import_module(f"{__package__}.{module}").register(sub)
    return p


# Modules adding verbs (each defines register(subparsers)); keep one per line.
VERB_MODULES: list[str] = [
    "install",
    "history_cli",
    "maint_cli",
    "prune_cli",
    "put_cli",
    "crypto_cli",
    "status_cli",
]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
