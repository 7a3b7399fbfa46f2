"""Build a repository holding N agents in one commit (git fast-import, or pygit2).

Uses the project's own tree layout (``fs/layout.py``: ``FORMAT`` + ``ab/cd/<id>/``)
and the ``meta.json`` encoding of ``fs/gitstore.py``, so ``fs.store.Store`` and the
daemon open it as if every agent had been created through the mount. Every agent
has a ``meta.json`` (its own blob: it holds the id) and a ``config.json`` (one shared
blob: identical content dedups in git, which does not change the commit path).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import defaultdict

import pygit2
from pygit2.enums import FileMode, ObjectType

from agentstatefs.fs.gitstore import BRANCH, _encode_meta
from agentstatefs.fs.layout import FORMAT_BLOB, FORMAT_NAME, fanout

CONFIG = b'{"model": "small", "temperature": 0.2, "tools": ["search", "code"]}\n'


def agent_ids(n: int) -> list[str]:
    return [f"agent-{i:06d}" for i in range(n)]


def build(path: str, n: int, *, method: str = "fast-import", pack: bool = True) -> dict:
    """Create a bare repo at ``path`` whose ``main`` holds ``n`` agents. Returns timings.

    ``fast-import`` (default) streams the same blobs and paths to ``git fast-import``,
    which writes one pack directly. ``pygit2`` builds every object with pygit2 as loose
    files and then repacks: creating and deleting ~2.7 N loose files right before the
    measurement made later commits in that repo 2-3x slower for minutes, oscillating
    (ext4 busy with the freed inodes and directory blocks), which is not what a store
    that grew over time sees.
    """
    if method == "fast-import":
        return _build_fast_import(path, n)
    t0 = time.perf_counter()
    repo = pygit2.init_repository(path, bare=True, initial_head="main")
    odb = repo.odb
    now = time.time_ns()
    uid, gid = os.getuid(), os.getgid()
    cfg = odb.write(ObjectType.BLOB, CONFIG)
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for agent in agent_ids(n):
        meta = {"id": agent, "created_ns": now, "mode": 0o755, "uid": uid, "gid": gid,
                "files": {"config.json": {"mode": 0o644, "uid": uid, "gid": gid, "size": len(CONFIG),
                                          "mtime_ns": now, "version": 1}},
                "versions": {"config.json": 1}}
        tb = repo.TreeBuilder()
        tb.insert("meta.json", odb.write(ObjectType.BLOB, _encode_meta(meta)), FileMode.BLOB)
        tb.insert("config.json", cfg, FileMode.BLOB)
        a, b = fanout(agent)
        groups[a][b].append((agent, tb.write()))
    root = repo.TreeBuilder()
    root.insert(FORMAT_NAME, odb.write(ObjectType.BLOB, FORMAT_BLOB), FileMode.BLOB)
    for a, subs in groups.items():
        l1 = repo.TreeBuilder()
        for b, agents in subs.items():
            l2 = repo.TreeBuilder()
            for agent, oid in agents:
                l2.insert(agent, oid, FileMode.TREE)
            l1.insert(b, l2.write(), FileMode.TREE)
        root.insert(a, l1.write(), FileMode.TREE)
    sig = pygit2.Signature("bench", "bench@agentstatefs", now // 1_000_000_000, 0)
    repo.create_commit(BRANCH, sig, sig, f"bench: {n} agents\n", root.write(), [])
    t1 = time.perf_counter()
    if pack:
        # A live store is packed in the background with `git repack -d` (fs/fsck.py),
        # delta search included, so the repo is packed the same way.
        subprocess.run(["git", "-C", path, "repack", "-adq"], check=True)
        subprocess.run(["git", "-C", path, "prune-packed"], check=True)
    t2 = time.perf_counter()
    return {"agents": n, "build_s": t1 - t0, "pack_s": t2 - t1}


def _meta(agent: str, now: int, uid: int, gid: int) -> bytes:
    return _encode_meta({"id": agent, "created_ns": now, "mode": 0o755, "uid": uid, "gid": gid,
                         "files": {"config.json": {"mode": 0o644, "uid": uid, "gid": gid,
                                                   "size": len(CONFIG), "mtime_ns": now, "version": 1}},
                         "versions": {"config.json": 1}})


def _build_fast_import(path: str, n: int) -> dict:
    t0 = time.perf_counter()
    pygit2.init_repository(path, bare=True, initial_head="main")
    now = time.time_ns()
    uid, gid = os.getuid(), os.getgid()
    proc = subprocess.Popen(["git", "-C", path, "fast-import", "--quiet", "--done"],
                            stdin=subprocess.PIPE)
    out = proc.stdin

    def blob(mark: int, data: bytes) -> None:
        out.write(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)) + data + b"\n")

    try:
        blob(1, FORMAT_BLOB)
        blob(2, CONFIG)
        ids = agent_ids(n)
        for i, agent in enumerate(ids):
            blob(3 + i, _meta(agent, now, uid, gid))
        msg = f"bench: {n} agents\n".encode()
        out.write(b"commit %s\ncommitter bench <bench@agentstatefs> %d +0000\ndata %d\n%s"
                  % (BRANCH.encode(), now // 1_000_000_000, len(msg), msg))
        out.write(b"M 100644 :1 %s\n" % FORMAT_NAME.encode())
        for i, agent in enumerate(ids):
            a, b = fanout(agent)
            base = f"{a}/{b}/{agent}".encode()
            out.write(b"M 100644 :%d %s/meta.json\nM 100644 :2 %s/config.json\n" % (3 + i, base, base))
        out.write(b"\ndone\n")
        out.close()
    finally:
        if proc.wait() != 0:
            raise RuntimeError(f"git fast-import failed ({proc.returncode})")
    return {"agents": n, "build_s": time.perf_counter() - t0, "pack_s": 0.0}


if __name__ == "__main__":
    import sys
    import tempfile
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        print(build(os.path.join(d, "repo"), n))
