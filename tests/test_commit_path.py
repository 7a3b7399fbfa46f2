"""The commit path's parsed fan-out trees (fs/gitstore.py) are an optimisation only.

The writer keeps the head's ``ab/`` and ``cd/`` trees parsed from their raw bytes
(``_Tree.parse``), drops the versions it replaces, and loads agents through them. None
of that may change a byte: trees must read back as git reads them, a store with a cold
cache must make exactly the commits a warm one makes (recovery replays the journal on a
fresh store and relies on it), and an agent loaded through the parsed trees must equal
the one loaded through libgit2's. Real repositories, real git; enough agents (600) that
the upper trees have many entries and changes insert into, replace in and delete from
them.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pygit2
import pytest

from agentstatefs.fs import changes as ch
from agentstatefs.fs.gitstore import GitStore, _Tree
from agentstatefs.fs.store import Store

WHO = ch.Who(1000, 1000, 4242, "test")
N = 600


def agent_ids(n):
    return [f"agent-{i:04d}" for i in range(n)]


def change(op, agent, t, **kw):
    return ch.Change(op, agent, WHO, 1_700_000_000_000_000_000 + t, **kw)


def populate(path) -> Store:
    store = Store(str(path))
    t = 0
    ids = agent_ids(N)
    for i in range(0, N, 100):
        group = []
        for a in ids[i:i + 100]:
            t += 1
            group.append(change(ch.MKDIR, a, t))
            t += 1
            group.append(change(ch.WRITE, a, t, files={"config.json": json.dumps({"a": a}).encode()}))
        out = store.commit_batch(group)
        assert all(isinstance(r, pygit2.Oid) for r in out), out
    return store


def workload(start: int):
    """Writes, new agents, removals, a move: inserts, replaces and deletes in the fan-out."""
    ids = agent_ids(N)
    t = start
    out = []
    for k in range(60):
        t += 1
        a = ids[(k * 37) % N]
        out.append(change(ch.WRITE, a, t, files={"config.json": json.dumps({"k": k}).encode()}))
    for k in range(10):
        t += 1
        out.append(change(ch.MKDIR, f"new-{k}", t))
    for k in range(5):
        a = ids[k * 101 + 3]
        t += 1
        out.append(change(ch.WRITE, a, t, files={"config.json": None}))
        t += 1
        out.append(change(ch.RMDIR, a, t))
    t += 1
    out.append(change(ch.MOVE, ids[7], t, move=(ids[7], "moved-7")))
    return out


def all_trees(repo: pygit2.Repository, tree: pygit2.Tree):
    yield tree
    for e in tree:
        if e.type == pygit2.enums.ObjectType.TREE:
            yield from all_trees(repo, repo[e.id])


def test_parsed_trees_are_what_git_reads(tmp_path):
    store = populate(tmp_path / "repo")
    for c in workload(10_000):
        assert isinstance(store.commit_batch([c])[0], pygit2.Oid)
    store.close()
    repo = pygit2.Repository(str(tmp_path / "repo"))
    root = repo[repo.references["refs/heads/main"].target].tree
    count = 0
    for t in all_trees(repo, root):
        kind, raw = repo.odb.read(t.id)
        parsed = _Tree.parse(raw)
        assert parsed is not None
        assert parsed.encode() == raw
        assert parsed.info == {e.name: (int(e.filemode), e.id.raw) for e in t}
        count += 1
    assert count > 2 * N
    r = subprocess.run(["git", "-C", str(tmp_path / "repo"), "fsck", "--full", "--strict"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_parse_refuses_what_it_would_not_write_back():
    raw = b"\x01" * 20
    assert _Tree.parse(b"040000 ab\x00" + raw) is None          # non-canonical mode
    assert _Tree.parse(b"100644 \xff\xfe\x00" + raw) is None     # not UTF-8
    assert _Tree.parse(b"100644 a\x00" + raw[:19]) is None       # truncated
    assert _Tree.parse(b"100644 a\x00" + raw + b"junk") is None   # bytes left over
    ok = _Tree.parse(b"40000 ab\x00" + raw + b"100644 b\x00" + raw)
    assert ok is not None and ok.info == {"ab": (0o40000, raw), "b": (0o100644, raw)}


def test_cold_and_warm_caches_make_the_same_commits(tmp_path):
    warm = populate(tmp_path / "warm")
    warm.checkpoint(force=True)
    shutil.copytree(tmp_path / "warm", tmp_path / "cold", symlinks=True)
    cold = Store(str(tmp_path / "cold"))
    assert cold.git.head == warm.git.head
    assert not cold.git._tree_cache          # nothing parsed yet
    for c in workload(20_000):
        a, b = warm.commit_batch([c])[0], cold.commit_batch([c])[0]
        assert isinstance(a, pygit2.Oid) and a == b, (c.op, c.agent, a, b)
    # The warm store holds the head's trees only, not the versions it replaced.
    head_trees = {t.id for t in all_trees(warm.git.repo, warm.git.repo[warm.git.head].tree)}
    assert set(warm.git._tree_cache) <= head_trees
    warm.close()
    cold.close()


def test_agents_through_parsed_trees_equal_libgit2s(tmp_path):
    store = populate(tmp_path / "repo")
    for c in workload(30_000):
        store.commit_batch([c])
    g = store.git
    assert g.root_id in g._tree_cache         # the parsed path is the one in use
    root = g.repo[g.head].tree
    names = agent_ids(N) + [f"new-{k}" for k in range(10)] + ["moved-7", "never-made"]
    fresh = GitStore(str(tmp_path / "repo"), create=False)
    for a in names:
        g._agent_cache.pop(a, None)
        got = g.agent(a)
        want = fresh.load_agent(root, a)
        if want is None:
            assert got is None, a
        else:
            assert got is not None and (got.meta, got.files, got.tree) == (want.meta, want.files, want.tree), a
    store.close()


@pytest.mark.parametrize("agents", [1, N])
def test_reopened_store_reads_and_writes(tmp_path, agents):
    """After the journal replay on open (a cold store), reads and the next commit work."""
    store = Store(str(tmp_path / "repo"))
    for i, a in enumerate(agent_ids(agents)):
        store.commit_batch([change(ch.MKDIR, a, 2 * i),
                            change(ch.WRITE, a, 2 * i + 1, files={"config.json": b'{"x": 1}'})])
    store.close()
    store = Store(str(tmp_path / "repo"))
    a = agent_ids(agents)[-1]
    assert store.git.read_file(a, "config.json") == b'{"x": 1}'
    oid = store.commit_batch([change(ch.WRITE, a, 10**6, files={"config.json": b'{"x": 2}'})])[0]
    assert isinstance(oid, pygit2.Oid)
    assert store.git.read_file(a, "config.json") == b'{"x": 2}'
    store.close()
