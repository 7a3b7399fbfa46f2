"""Read-only replica: a local bare copy of a remote's ``main``, followed over time.

``agentstatefs mount --replica URL MOUNTPOINT`` fetches the remote's ``main`` into a
local bare repository (``--repo``), serves it read-only (writes: EROFS) with its whole
``@history``, and every ``replica_interval`` seconds fetches again. When ``main`` moved,
the follower works out which agents changed (a walk of the fan-out trees that descends
only where the two roots differ), brings the commit index up to the new head (only the
new commits are read; a history rewritten by a prune on the writer is read anew) and
publishes the new head through the same path the committer uses
(``Namespace.publish``), so kernel caches of changed files are invalidated.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time

import pygit2
import trio
from pygit2.enums import ObjectType

from .monitor import redact_url
from .replicate import BRANCH, check_url, git_env, read_main
from .store import Group

log = logging.getLogger(__name__)


def fetch_command(repo_dir: str, url: str) -> list[str]:
    # Forced: the writer's prune rewrites main. --update-head-ok: main is HEAD's branch.
    return ["git", "-C", repo_dir, "fetch", "--quiet", "--no-tags", "--update-head-ok", "--",
            url, f"+{BRANCH}:{BRANCH}"]


def fetch(repo_dir: str, url: str, timeout: float = 600.0) -> str | None:
    """Create the local bare repository if needed and fetch the remote's main into it.
    Returns the fetched head (None: the remote has no main yet)."""
    check_url(url)
    if not os.path.isdir(os.path.join(repo_dir, "objects")):
        os.makedirs(repo_dir, mode=0o700, exist_ok=True)
        pygit2.init_repository(repo_dir, bare=True, initial_head="main")
    r = subprocess.run(fetch_command(repo_dir, url), capture_output=True, text=True, errors="replace",
                       env=git_env(), stdin=subprocess.DEVNULL, timeout=timeout)
    if r.returncode != 0:
        err = r.stderr.strip()
        if "couldn't find remote ref" in err:
            return read_main(repo_dir)
        raise RuntimeError(f"git fetch {redact_url(url)} failed: {err[-500:]}")
    return read_main(repo_dir)


def changed_agents(repo: pygit2.Repository, old, new, depth: int = 3) -> set[str]:
    """Agent ids whose subtree differs between root trees ``old`` and ``new`` (either
    may be None), descending only into differing fan-out trees."""
    def entries(tree):
        return {} if tree is None else {e.name: e for e in tree}

    out: set[str] = set()
    a, b = entries(old), entries(new)
    for name in set(a) | set(b):
        ea, eb = a.get(name), b.get(name)
        if ea is not None and eb is not None and ea.id == eb.id:
            continue
        if depth == 1:
            out.add(name)
            continue
        ta = repo[ea.id] if ea is not None and ea.type == ObjectType.TREE else None
        tb = repo[eb.id] if eb is not None and eb.type == ObjectType.TREE else None
        if ta is None and tb is None:
            continue         # a blob at the top (FORMAT)
        out |= changed_agents(repo, ta, tb, depth - 1)
    return out


class ReplicaStats:
    def __init__(self, url: str):
        self.url = url
        self.head: str | None = None
        self.fetches = 0
        self.updates = 0
        self.errors = 0
        self.last_fetch = 0.0          # time of the last successful fetch
        self.last_update = 0.0         # time main last moved here
        self.last_error: str | None = None

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["url"] = redact_url(self.url)
        d["behind_seconds"] = round(time.time() - self.last_fetch, 3) if self.last_fetch else None
        return d


class ReplicaFollower:
    """Fetches ``url`` every ``interval`` seconds and publishes a moved ``main``."""

    def __init__(self, store, url: str, interval: float, publish, rewrite=lambda summary: None):
        self.store = store
        self.url = check_url(url)
        self.interval = interval
        self.publish = publish           # Namespace.publish, via the state manager
        self.rewrite = rewrite           # Namespace.rewrite: drop cached @history of vanished commits
        self.stats = ReplicaStats(url)
        self.stats.head = str(store.git.head) if store.git.head is not None else None

    def _prepare(self, new_hex: str) -> tuple[Group, bool]:
        """Worker thread: the changed agents' views at the new head, the commit index
        brought up to it, the store's own head moved."""
        store = self.store
        git = store.git
        new = pygit2.Oid(hex=new_hex)
        old_root = git.repo[git.head].tree if git.head is not None else None
        new_root = git.repo[new].tree
        agents = changed_agents(git.repo, old_root, new_root)
        views = {a: git.load_agent(new_root, a) for a in agents}
        _, rewritten = store.history.advance(new)
        git.rewind(new, agents)
        store.flushed_head = new
        return Group([], new, views, []), rewritten

    async def run(self) -> None:
        s = self.stats
        while True:
            await trio.sleep(self.interval)
            try:
                r = await trio.run_process(fetch_command(self.store.repo_dir, self.url), capture_stdout=True,
                                           capture_stderr=True, check=False, env=git_env(),
                                           stdin=subprocess.DEVNULL)
            except OSError as exc:
                r = subprocess.CompletedProcess([], 1, b"", str(exc).encode())
            if r.returncode != 0:
                s.errors += 1
                s.last_error = r.stderr.decode(errors="replace").strip()[-500:]
                log.error("replica: fetching %s failed: %s", redact_url(self.url), s.last_error)
                continue
            s.fetches += 1
            s.last_fetch = time.time()
            new = read_main(self.store.repo_dir)
            if new is None or new == s.head:
                continue
            try:
                group, rewritten = await trio.to_thread.run_sync(self._prepare, new)
                self.publish(group)
                if rewritten:      # a prune on the writer: cached @history names may be gone
                    self.rewrite({"new_head": new})
            except Exception:
                s.errors += 1
                log.exception("replica: moving to %s failed (will retry)", new)
                continue
            log.info("replica: main moved to %s (%d agent(s) changed)", new, len(group.views))
            s.head, s.updates, s.last_update = new, s.updates + 1, time.time()
