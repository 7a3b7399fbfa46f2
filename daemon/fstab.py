"""``mount.fuse.agentstatefs``: the helper mount(8) runs for type ``fuse.agentstatefs``.

An /etc/fstab line such as

    /var/lib/agentstatefs/default  /mnt/agents  fuse.agentstatefs  allow_other,nofail  0 0

(or a ``.mount`` unit with ``What=``/``Type=``/``Options=``) makes mount(8) run

    /sbin/mount.fuse.agentstatefs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS] [-t fuse.agentstatefs]

SOURCE is the repository. The helper drops the options mount(8) and the kernel's generic
VFS flags add (``nofail``, ``_netdev``, ``user``, ``noatime``, ...), then starts the daemon
in the background and exits 0 once the mount answers (non-zero with the reason otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys

# Options meaningful to mount(8), systemd or the VFS, not to agentstatefs: dropped.
_IGNORED = {
    "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner",
    "group", "rw", "atime", "noatime", "relatime", "norelatime", "strictatime",
    "nostrictatime", "diratime", "nodiratime", "lazytime", "nolazytime", "sync", "async",
    "dirsync", "silent", "loud", "mand", "nomand", "iversion", "noiversion", "exec",
    "noexec", "suid", "nosuid", "dev", "nodev", "bind", "rbind", "nosymfollow",
}
_IGNORED_PREFIXES = ("x-", "comment=", "context=", "fscontext=", "defcontext=", "rootcontext=",
                     "helper=", "_")


def filter_options(text: str) -> str:
    kept = []
    for item in text.split(","):
        item = item.strip()
        key = item.partition("=")[0]
        if not item or key in _IGNORED or item.startswith(_IGNORED_PREFIXES):
            continue
        kept.append(item)
    return ",".join(kept)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mount.fuse.agentstatefs",
        description="mount(8) helper: mount the agentstatefs repository SOURCE at MOUNTPOINT.")
    p.add_argument("source", help="repository directory (created if missing)")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    p.add_argument("-t", dest="type", help="accepted: fuse.agentstatefs")
    p.add_argument("-s", action="store_true", help="ignored (sloppy)")
    p.add_argument("-f", action="store_true", help="fake: check arguments, mount nothing")
    p.add_argument("-n", action="store_true", help="ignored (no mtab)")
    p.add_argument("-v", action="store_true", help="print the command run")
    p.add_argument("-N", dest="namespace", help="not supported")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.type and args.type not in ("fuse.agentstatefs", "agentstatefs"):
        print(f"mount.fuse.agentstatefs: cannot mount type {args.type}", file=sys.stderr)
        return 32  # mount(8): mount failure
    if args.namespace:
        print("mount.fuse.agentstatefs: -N (mount namespace) is not supported", file=sys.stderr)
        return 32
    options = filter_options(",".join(args.options))
    cmd = ["mount", "--repo", os.path.abspath(args.source), os.path.abspath(args.mountpoint)]
    if options:
        cmd += ["-o", options]
    if args.v:
        print("agentstatefs " + " ".join(cmd), file=sys.stderr)
    # mount(8) may run helpers with a minimal environment; the daemon needs fusermount3.
    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    # Under a .mount unit there is no notify socket for us; never inherit one.
    os.environ.pop("NOTIFY_SOCKET", None)
    from .cli import main as cli_main
    if args.f:
        from .options import MountOptions
        try:
            MountOptions.parse([options])
        except ValueError as exc:
            print(f"mount.fuse.agentstatefs: {exc}", file=sys.stderr)
            return 1
        return 0
    rc = cli_main(cmd)  # without --foreground: returns once the mount answers
    return 0 if rc == 0 else 32


if __name__ == "__main__":
    sys.exit(main())
