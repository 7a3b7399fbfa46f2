"""Maintenance verbs: ``fsck`` (check, never modify) and ``gc`` (pack, prune)."""

from __future__ import annotations

import os
import subprocess
import sys

from ..fs import fsck, private
from .options import DEFAULT_REPO_ROOT, DEFAULT_TENANT


def cmd_fsck(args) -> int:
    private.restrict_umask()
    if not os.path.isdir(os.path.join(args.repo, "objects")):
        print(f"agentstatefs: {args.repo} is not an agentstatefs repository", file=sys.stderr)
        return 1
    r = fsck.check(args.repo)
    for p in r.problems:
        print(f"PROBLEM: {p}")
    pending = f", {r.journal_records} journal record(s) to replay at next mount" if r.journal_records else ""
    print(f"{'ok' if r.ok else 'FAILED'}: {r.commits} commits, {r.objects} objects verified, "
          f"{r.agents} agents{pending}")
    return 0 if r.ok else 1


def cmd_gc(args) -> int:
    private.restrict_umask()
    try:
        before, after = fsck.gc(args.repo)
    except subprocess.CalledProcessError as exc:
        print(f"agentstatefs: gc failed: {exc.stderr.strip()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"agentstatefs: gc failed: {exc}", file=sys.stderr)
        return 1
    print(f"packed: {before} loose objects before, {after} after")
    return 0


def register(sub) -> None:
    default_repo = os.path.join(DEFAULT_REPO_ROOT, DEFAULT_TENANT)
    p = sub.add_parser("fsck", help="verify every object, agent metadata, checkpoint and journal")
    p.add_argument("--repo", default=default_repo)
    p.set_defaults(func=cmd_fsck)
    p = sub.add_parser("gc", help="pack loose objects and prune unreachable ones (safe while mounted)")
    p.add_argument("--repo", default=default_repo)
    p.set_defaults(func=cmd_gc)
