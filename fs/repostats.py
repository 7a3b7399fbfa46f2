"""Facts about a repository on disk, read-only: size, head, commits, agents, checkpoint.

Used by the daemon's monitor (in a worker thread, every ``repo_scan_interval``
seconds, never per read) and by ``agentstatefs status`` on an unmounted repository.
It opens its own pygit2 handle and never writes anything.
"""

from __future__ import annotations

import json
import os
import time

import pygit2
from pygit2.enums import ObjectType, SortMode

BRANCH = "refs/heads/main"


def dir_bytes(path: str) -> int:
    """Bytes of every regular file under ``path`` (apparent size; files vanishing
    meanwhile, e.g. packs a repack deletes, are skipped)."""
    total = 0
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def count_agents(repo: pygit2.Repository, tree) -> int:
    """Agents in a root tree (two fan-out levels, then one tree per agent)."""
    n = 0
    for l1 in tree:
        if l1.type != ObjectType.TREE:
            continue
        for l2 in repo[l1.id]:
            if l2.type != ObjectType.TREE:
                continue
            n += sum(1 for e in repo[l2.id] if e.type == ObjectType.TREE)
    return n


def read_checkpoint(repo_dir: str) -> dict | None:
    try:
        with open(os.path.join(repo_dir, "agentstatefs", "checkpoint")) as f:
            cp = json.load(f)
        cp.setdefault("time", os.stat(os.path.join(repo_dir, "agentstatefs", "checkpoint")).st_mtime)
        return cp
    except (OSError, ValueError):
        return None


def journal_records(repo_dir: str, after_seq: int) -> int:
    """Journal records after the checkpoint: what the next mount replays."""
    d = os.path.join(repo_dir, "agentstatefs", "journal")
    if not os.path.isdir(d):
        return 0
    from .journal import Journal
    return sum(1 for _ in Journal(d).read_after(after_seq))


def scan(repo_dir: str, *, head: str | None = None, with_agents: bool = True, with_commits: bool = True) -> dict:
    """``{size_bytes, head, commits, agents, head_time, checkpoint, journal_records,
    scanned}`` for the repository at ``repo_dir``. The daemon, which knows commits and
    agents already, asks for neither (walking 100,000 commits holds the GIL a while). ``head``: count from this commit
    instead of what ``main`` names on disk (the daemon's head may be a few ms ahead)."""
    t0 = time.time()
    out: dict = {"repo": os.path.abspath(repo_dir), "size_bytes": dir_bytes(repo_dir),
                 "head": None, "commits": 0, "agents": None, "head_time": None}
    repo = pygit2.Repository(repo_dir)
    try:
        target = None
        if head:
            try:
                target = repo[head].id
            except (KeyError, ValueError, pygit2.GitError):
                target = None
        if target is None:
            ref = repo.references.get(BRANCH)
            target = ref.target if ref is not None else None
        if target is not None:
            commit = repo[target]
            out["head"] = str(commit.id)
            out["head_time"] = commit.commit_time
            if with_commits:
                out["commits"] = sum(1 for _ in repo.walk(commit.id, SortMode.NONE))
            if with_agents:
                out["agents"] = count_agents(repo, commit.tree)
        elif with_agents:
            out["agents"] = 0
    finally:
        try:
            repo.free()
        except Exception:
            pass
    cp = read_checkpoint(repo_dir)
    out["checkpoint"] = cp
    try:
        out["journal_records"] = journal_records(repo_dir, int((cp or {}).get("seq") or 0))
    except (OSError, ValueError):
        out["journal_records"] = None
    out["scanned"] = t0
    out["scan_seconds"] = round(time.time() - t0, 4)
    return out
