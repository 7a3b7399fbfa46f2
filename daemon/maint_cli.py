"""Maintenance verbs: ``fsck`` (check, never modify) and ``gc`` (pack, drop unreachable objects)."""

from __future__ import annotations

import os
import subprocess
import sys

from ..fs import fsck, private
from .credentials import CredentialError, repository_key
from .options import DEFAULT_REPO_ROOT, DEFAULT_TENANT


def _private_message(repo: str) -> str | None:
    """Why another user cannot use ``repo`` (it is private to the daemon's user), or None."""
    from ..fs.errors import RepoError
    from .history_cli import check_readable
    try:
        check_readable(repo)
    except RepoError as exc:
        return str(exc)
    return None


def cmd_fsck(args) -> int:
    private.restrict_umask()
    why = _private_message(args.repo)
    if why:
        print(f"agentstatefs: {why}", file=sys.stderr)
        return 1
    if not os.path.isdir(os.path.join(args.repo, "objects")):
        print(f"agentstatefs: {args.repo} is not an agentstatefs repository", file=sys.stderr)
        return 1
    try:
        key = repository_key(args.keyfile)
    except CredentialError as exc:
        print(f"agentstatefs: {exc}", file=sys.stderr)
        return 1
    r = fsck.check(args.repo, key=key)
    for p in r.problems:
        print(f"PROBLEM: {p}")
    pending = f", {r.journal_records} journal record(s) to replay at next mount" if r.journal_records else ""
    print(f"{'ok' if r.ok else 'FAILED'}: {r.commits} commits, {r.objects} objects verified, "
          f"{r.agents} agents{pending}")
    return 0 if r.ok else 1


def gc_offline(repo: str, key: bytes | None = None) -> tuple[int, int, int, int]:
    """Recover (so the checkpointed commit is what ``main`` names), then pack and prune."""
    from ..fs.repolock import RepoLock
    from ..fs.store import Store
    lock = RepoLock(repo)
    lock.acquire("(offline gc)")
    try:
        Store(repo, create=False, key=key).close()
        loose = fsck.loose_object_count(repo)
        before, after = fsck.gc(repo)
        return before, after, loose, fsck.loose_object_count(repo)
    finally:
        lock.release()


def cmd_gc(args) -> int:
    private.restrict_umask()
    from ..fs.errors import FsError, RepoError
    from .prune_cli import GC_XATTR, mounted_at, run_online
    repo = os.path.abspath(args.repo)
    try:
        if not os.path.isdir(os.path.join(repo, "objects")):
            raise RepoError(f"{repo} is not an agentstatefs repository")
        mp = mounted_at(repo)
        if mp is not None:
            r = run_online(mp, GC_XATTR, {}, "gc")
            before, after = r["bytes_before"], r["bytes_after"]
            loose = None
        else:
            before, after, loose, loose_after = gc_offline(repo, repository_key(args.keyfile))
    except subprocess.CalledProcessError as exc:
        print(f"agentstatefs: gc failed: {exc.stderr.strip()}", file=sys.stderr)
        return 1
    except (OSError, FsError, RepoError, CredentialError) as exc:
        print(f"agentstatefs: gc failed: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    where = f" (through the mount at {mp})" if mp else ""
    print(f"repository objects: {before} bytes before, {after} after{where}"
          + (f"; packed: {loose} loose objects before, {loose_after} after" if loose is not None else ""))
    return 0


def register(sub) -> None:
    default_repo = os.path.join(DEFAULT_REPO_ROOT, DEFAULT_TENANT)
    p = sub.add_parser("fsck", help="verify every object, agent metadata, checkpoint and journal")
    p.add_argument("--repo", default=default_repo)
    p.add_argument("--keyfile", help="key of an encrypted store: every blob and journal record "
                                     "must decrypt (default: the systemd credential 'key')")
    p.set_defaults(func=cmd_fsck)
    p = sub.add_parser("gc", help="pack every object, drop unreachable ones (pruned history); mounted or not")
    p.add_argument("--repo", default=default_repo)
    p.add_argument("--keyfile", help="key of an encrypted store, needed unmounted (recovery replays "
                                     "the journal first)")
    p.set_defaults(func=cmd_gc)
