"""``prune`` (retention) and the way ``prune``/``gc`` reach a mounted repository.

Offline (no daemon holds the repository lock) the verb takes the lock, opens the store
(which recovers from any crash), rewrites and closes. While mounted it asks the daemon
through the mount root: it sets ``user.agentstatefs.prune`` (or ``.gc``) to a JSON
request with a token; the daemon's committer does the work (one owner of the head) and
``user.agentstatefs.maintenance`` reports progress and the outcome, which this verb
polls. Progress is drawn on stderr only when it is a terminal.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import sys
import time

from ..fs.errors import FsError, RepoError
from ..fs.prune import Policy
from .credentials import CredentialError, repository_key
from .options import DEFAULT_REPO_ROOT, DEFAULT_TENANT

PRUNE_XATTR = "user.agentstatefs.prune"
GC_XATTR = "user.agentstatefs.gc"
STATUS_XATTR = "user.agentstatefs.maintenance"


def mounted_at(repo: str) -> str | None:
    """The mount point of the daemon holding ``repo``'s lock, None when none does."""
    path = os.path.join(repo, "agentstatefs", "lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)
    _, sep, mp = text.partition(" mounted at ")
    if not sep or not mp.startswith("/"):
        raise RepoError(f"repository {repo} is in use ({text or 'no holder recorded'})")
    return mp


class Meter:
    """One progress line on a terminal (nothing otherwise)."""

    def __init__(self, what: str):
        self.what = what
        self.tty = sys.stderr.isatty()
        self.shown = False

    def __call__(self, p) -> None:
        if not self.tty:
            return
        total = f"/{p.total}" if p.total else ""
        sys.stderr.write(f"\r{self.what}: {p.phase} {p.done}{total}\x1b[K")
        sys.stderr.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


class _P:
    def __init__(self, d: dict):
        self.phase, self.done, self.total = d.get("phase", ""), d.get("done", 0), d.get("total", 0)


def run_online(mp: str, xattr: str, request: dict, what: str) -> dict:
    """Ask the daemon at ``mp`` to run a maintenance job and wait for its outcome."""
    token = secrets.token_hex(8)
    meter = Meter(what)
    try:
        os.setxattr(mp, xattr, json.dumps({**request, "token": token}).encode())
    except OSError as exc:
        raise FsError(exc.errno or errno.EIO, f"the daemon at {mp} refused: {exc.strerror}") from None
    try:
        while True:
            try:
                status = json.loads(os.getxattr(mp, STATUS_XATTR))
            except OSError as exc:
                raise FsError(exc.errno or errno.EIO, f"lost the daemon at {mp}: {exc.strerror}") from None
            if status.get("token") != token:
                raise FsError(errno.EIO, f"another {status.get('kind')} replaced ours at {mp}")
            if status["state"] == "done":
                return status.get("result") or {}
            if status["state"] == "failed":
                raise FsError(errno.EIO, status.get("error") or "failed")
            meter(_P(status))
            time.sleep(0.1)
    finally:
        meter.end()


def prune_offline(repo: str, policy: Policy, on_progress=None, key: bytes | None = None) -> dict:
    """Prune an unmounted repository (recovering it first)."""
    import pygit2

    from ..fs.prune import PruneJob, pause
    from ..fs.repolock import RepoLock
    from ..fs.store import Store
    lock = RepoLock(repo)
    lock.acquire("(offline prune)")
    try:
        store = Store(repo, create=False, key=key)
        try:
            old_head, entries = store.prune_snapshot()
            job = PruneJob(pygit2.Repository(repo), policy, on_progress=on_progress)
            job.build(entries)
            pause("built")
            return store.finish_prune(job)
        finally:
            store.close()
    finally:
        lock.release()


def cmd_prune(args) -> int:
    from ..fs import private
    private.restrict_umask()
    repo = os.path.abspath(args.repo)
    try:
        policy = Policy(args.keep_last, args.keep_days, args.agent).check()
        if not os.path.isdir(os.path.join(repo, "objects")):
            raise RepoError(f"{repo} is not an agentstatefs repository")
        mp = mounted_at(repo)
        if mp is not None:
            summary = run_online(mp, PRUNE_XATTR, policy.to_json(), "prune")
        else:
            meter = Meter("prune")
            try:
                summary = prune_offline(repo, policy, meter, repository_key(args.keyfile))
            finally:
                meter.end()
    except (FsError, RepoError, CredentialError) as exc:
        print(f"agentstatefs: prune: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    if summary.get("noop"):
        print("nothing to prune: every commit is kept")
    else:
        print(f"pruned: kept {summary['kept']} commit(s), dropped {summary['dropped']}; "
              f"main is now {summary['new_head']}{' (through the mount at ' + mp + ')' if mp else ''}; "
              f"run 'agentstatefs gc' to reclaim the space")
    return 0


def _days(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 10**6 or v != v:
        raise ValueError(text)
    return v


def register(sub) -> None:
    default_repo = os.path.join(DEFAULT_REPO_ROOT, DEFAULT_TENANT)
    p = sub.add_parser(
        "prune", help="drop old history (keep the newest N commits and/or those younger than D days)",
        description="Rewrite history into a shorter chain: a commit is kept when it is one of the newest "
                    "N or younger than D days (either rule keeps it); the newest commit always is. With "
                    "ID, the rules apply to that agent's commits only: its older versions are dropped "
                    "and it is absent from the trees of earlier commits. The current state is unchanged. "
                    "Works mounted (through the daemon) and unmounted; crash-safe. Then run gc.")
    p.add_argument("--repo", default=default_repo)
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N commits (N >= 1)")
    p.add_argument("--keep-days", type=_days, metavar="D", help="keep commits younger than D days")
    p.add_argument("agent", nargs="?", metavar="ID", help="prune only this agent's history")
    p.add_argument("--keyfile", help="key of an encrypted store, needed unmounted")
    p.set_defaults(func=cmd_prune)
