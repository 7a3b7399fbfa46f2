"""Retention (``agentstatefs prune``) and ``gc``: on real mounts and offline repositories.

Prune keeps exactly what it promises (count, age, per agent), leaves the current state
and a fsck-clean repository, survives kill -9 at every step (offline and while mounted),
and gc then shrinks the repository.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import sh
from mounting import CLI

from agentstatefs.fs import fsck
from agentstatefs.fs.changes import MKDIR, WRITE, Change, Who
from agentstatefs.fs.store import Store

DAY_NS = 86400 * 10**9
WHO = Who(0, 0, 1, "test")


def read(p):
    with open(p) as f:
        return f.read()


def cli(*args, env=None, check=True):
    r = subprocess.run(CLI + list(args), capture_output=True, text=True,
                       env={**os.environ, **env} if env else None)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout


def chain(repo):
    """Subjects (oldest first) and commit times of main."""
    out = git(repo, "log", "--reverse", "--format=%ct %s", "main").splitlines()
    return [line.split(" ", 1)[1] for line in out], [int(line.split(" ", 1)[0]) for line in out]


def agent_commits(repo, agent):
    return [s for s in chain(repo)[0] if f" {agent}/" in s]


def write_history(m, n, agents=("a1", "a2")):
    for a in agents:
        if not (m / a).exists():
            os.mkdir(m / a)
    for i in range(n):
        for a in agents:
            (m / a / "config.json").write_text(json.dumps({"agent": a, "i": i}))


def snapshot(mp, agents=("a1", "a2")):
    return {a: read(Path(mp) / a / "config.json") for a in agents}


def assert_fsck_clean(repo):
    r = fsck.check(str(repo))
    assert r.ok, r.problems


def offline_repo(path, days):
    """A repository with one commit per entry of ``days`` (age in days, oldest first):
    agent a1 writes {"d": age}; then one write of a2 for each, younger."""
    s = Store(str(path))
    now = time.time_ns()
    s.commit_group([Change(MKDIR, "a1", WHO, now - (max(days) + 1) * DAY_NS)])
    for d in days:
        r = s.commit_group([Change(WRITE, "a1", WHO, now - int(d * DAY_NS),
                                   files={"config.json": json.dumps({"d": d}).encode()})])
        assert not isinstance(r.results[0], Exception), r.results
    s.close()


def test_prune_keep_last_online_then_history_and_gc(mounts):
    m = mounts().start()
    write_history(m, 20)                      # 2 mkdir + 40 writes
    m.git_settled()
    assert m.commit_count() == 42
    before = snapshot(m.mp)
    old = m.git("rev-list", "main").split()
    size0 = fsck.repo_bytes(str(m.repo))
    assert os.path.isdir(m / "@history" / old[-1] / "a1")    # the kernel caches full ids for an hour
    r = cli("prune", "--repo", str(m.repo), "--keep-last", "7")
    assert "kept 7 commit(s), dropped 35" in r.stdout and "through the mount" in r.stdout
    assert m.commit_count() == 7
    assert snapshot(m.mp) == before
    # the newest tree is unchanged; subjects of the kept commits are the newest 7
    assert m.git("rev-parse", "main^{tree}") == git(m.repo, "rev-parse", f"{old[0]}^{{tree}}")
    assert chain(m.repo)[0][-1] == "write a2/config.json (24 bytes)"
    # @history: pruned ids are gone (also a full id the kernel had cached), kept ones answer
    pruned = old[-1]
    with pytest.raises(FileNotFoundError):
        os.stat(m / "@history" / pruned)
    new = m.git("rev-list", "main").split()
    assert len(os.listdir(m / "@history")) == 7
    assert json.loads(read(m / "@history" / new[-1] / "a1" / "config.json"))["i"] == 16
    assert os.getxattr(m.mp, "user.agentstatefs.head").decode() == new[0]
    # writes go on on the new chain
    (m / "a1/config.json").write_text('{"after": "prune"}')
    m.git_settled()
    assert m.commit_count() == 8
    assert m.git("rev-parse", "main~1").strip() == new[0]
    # gc while mounted drops the old chain: the repository shrinks
    r = cli("gc", "--repo", str(m.repo))
    assert "through the mount" in r.stdout
    size1 = fsck.repo_bytes(str(m.repo))
    assert size1 < size0 / 2, (size0, size1)
    assert subprocess.run(["git", "-C", str(m.repo), "cat-file", "-e", pruned]).returncode != 0
    (m / "a2/config.json").write_text('{"after": "gc"}')
    assert m.stop() == 0
    assert_fsck_clean(m.repo)
    m.start()
    assert json.loads(read(m / "a1/config.json")) == {"after": "prune"}
    assert json.loads(read(m / "a2/config.json")) == {"after": "gc"}
    assert m.commit_count() == 9


def test_prune_keep_days_offline_exact(tmp_path):
    repo = tmp_path / "repo"
    offline_repo(repo, [30, 20, 10, 5, 2.5, 1, 0.5])
    assert len(chain(repo)[0]) == 8
    r = cli("prune", "--repo", str(repo), "--keep-days", "3")
    assert "kept 3 commit(s), dropped 5" in r.stdout
    subjects, times = chain(repo)
    assert len(subjects) == 3
    now = time.time()
    assert all(now - t < 3 * 86400 for t in times)
    assert json.loads(git(repo, "show", "main:" + _path("a1", "config.json"))) == {"d": 0.5}
    # the oldest kept commit holds the full state of its time (a root commit now)
    assert git(repo, "rev-list", "--max-parents=0", "main").strip() == git(repo, "rev-list", "main").split()[-1]
    # both rules: either keeps a commit
    r = cli("prune", "--repo", str(repo), "--keep-days", "0.75", "--keep-last", "2")
    assert "kept 2 commit(s), dropped 1" in r.stdout
    r = cli("prune", "--repo", str(repo), "--keep-days", "100", "--keep-last", "1")
    assert "nothing to prune" in r.stdout
    assert len(chain(repo)[0]) == 2
    assert_fsck_clean(repo)


def _path(agent, name):
    from agentstatefs.fs.layout import agent_path
    return f"{agent_path(agent)}/{name}"


def test_prune_one_agent(mounts):
    m = mounts().start()
    write_history(m, 6, agents=("a1", "a2", "a3"))
    m.git_settled()
    before_total = m.commit_count()
    a2_before = agent_commits(m.repo, "a2")
    a3_before = agent_commits(m.repo, "a3")
    state = snapshot(m.mp, ("a1", "a2", "a3"))
    tree = m.git("rev-parse", "main^{tree}")
    r = cli("prune", "--repo", str(m.repo), "--keep-last", "2", "a1")
    assert "kept" in r.stdout, r.stdout
    # a1: exactly its newest 2 commits; others untouched
    assert agent_commits(m.repo, "a1") == ["write a1/config.json (23 bytes)"] * 2
    assert agent_commits(m.repo, "a2") == a2_before and agent_commits(m.repo, "a3") == a3_before
    assert m.commit_count() == before_total - 5     # mkdir + 4 old writes of a1
    assert m.git("rev-parse", "main^{tree}") == tree
    assert snapshot(m.mp, ("a1", "a2", "a3")) == state
    # before its oldest kept commit, a1 is absent from the trees; after it, present
    revs = m.git("rev-list", "--reverse", "main").split()
    subjects = chain(m.repo)[0]
    first_a1 = subjects.index("write a1/config.json (23 bytes)")
    for rev in revs[:first_a1]:
        assert m.git("ls-tree", "-r", "--name-only", rev).count("/a1/") == 0
    assert "/a1/" in m.git("ls-tree", "-r", "--name-only", revs[first_a1])
    hist = os.listdir(m / "a1" / "@history")
    assert len([h for h in hist if h != "runtime"]) == 2
    assert len([h for h in os.listdir(m / "a2" / "@history") if h != "runtime"]) == 7
    # per-agent keep-days: a2's commits are all young: nothing to do
    r = cli("prune", "--repo", str(m.repo), "--keep-days", "1", "a2")
    assert "nothing to prune" in r.stdout
    r = cli("prune", "--repo", str(m.repo), "--keep-last", "1", "nobody", check=False)
    assert r.returncode == 1 and "no commits" in r.stderr
    assert m.stop() == 0
    assert_fsck_clean(m.repo)


def test_prune_requests_hostile_and_denied(mounts):
    m = mounts().start("allow_other")
    write_history(m, 2)
    os.chmod(m.mp, 0o755)
    for bad in (b"{", b"[]", b'{"keep_last": 0}', b'{"keep_last": "3"}', b'{"keep_days": -1}',
                b'{"agent": "../x", "keep_last": 1}', b'{"rm": true}', b"\xff\xfe", b"{}"):
        with pytest.raises(OSError) as e:
            os.setxattr(m.mp, "user.agentstatefs.prune", bad)
        assert e.value.errno == errno.EINVAL, bad
    with pytest.raises(OSError) as e:
        os.setxattr(m.mp, "user.agentstatefs.gc", b'{"x": 1}')
    assert e.value.errno == errno.EINVAL
    r = subprocess.run(["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups",
                        sys.executable, "-c",
                        "import os; os.setxattr(%r, 'user.agentstatefs.prune', b'{\"keep_last\": 1}')" % str(m.mp)],
                       capture_output=True, text=True)
    # the kernel refuses first (user.* xattrs need write access to the root), the daemon
    # would answer EPERM to anyone but root and its own user
    assert r.returncode != 0 and ("Operation not permitted" in r.stderr or "Permission denied" in r.stderr), r.stderr
    assert m.commit_count() == 6
    st = json.loads(os.getxattr(m.mp, "user.agentstatefs.maintenance"))
    assert st["state"] == "idle"
    assert snapshot(m.mp)["a1"] == json.dumps({"agent": "a1", "i": 1})


def test_prune_while_writing_loses_nothing(mounts):
    """Writers keep writing through an online prune: every acknowledged write is in the
    current state, and the commits made during the prune are on the new chain."""
    m = mounts().start()
    write_history(m, 30)
    m.git_settled()
    stop = False
    written = []

    def writer():
        i = 0
        while not stop:
            (m / "a1/memory.json").write_text(json.dumps({"w": i}))
            written.append(i)
            i += 1

    import threading
    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.2)
        cli("prune", "--repo", str(m.repo), "--keep-last", "5")
        time.sleep(0.2)
    finally:
        stop = True
        t.join()
    assert json.loads(read(m / "a1/memory.json")) == {"w": written[-1]}
    m.git_settled()
    subjects = chain(m.repo)[0]
    assert len(subjects) >= 5 + 1
    assert m.stop() == 0
    assert_fsck_clean(m.repo)
    m.start()
    assert json.loads(read(m / "a1/memory.json")) == {"w": written[-1]}


STEPS = ["early", "built", "pack", "synced", "checkpoint", "index", "late"]


def _kill_at(proc, step_file, step, rng):
    """kill -9 ``proc`` once ``step`` is reported (early/late: at a random moment)."""
    if step == "early":
        time.sleep(rng.uniform(0.0, 0.4))
    else:
        want = "index" if step == "late" else step
        while proc.poll() is None:
            try:
                if want in step_file.read_text().split():
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.005)
        if step == "late":
            time.sleep(rng.uniform(0.0, 0.25))
    proc.kill()
    proc.wait(timeout=30)


def test_prune_survives_kill9_at_every_step(mounts, tmp_path):
    """>= 20 rounds: kill -9 an offline prune or the daemon running an online one, at each
    step in turn; then mount: the current state is intact, main is either the old or the
    new chain, fsck --full --strict is clean."""
    rng = random.Random(1234)
    steps_file = tmp_path / "steps"
    env = {"AGENTSTATEFS_PRUNE_PAUSE": "0.3", "AGENTSTATEFS_PRUNE_STEPS": str(steps_file)}
    m = mounts()
    m.start()
    write_history(m, 15)
    outcomes = {"old": 0, "new": 0}
    rounds = 0
    for rnd in range(22):
        step = STEPS[rnd % len(STEPS)]
        online = (rnd // len(STEPS)) % 2 == 1 or rnd >= 2 * len(STEPS)
        m.git_settled()
        expected = snapshot(m.mp)
        count_before = m.commit_count()
        keep = rng.randint(2, max(2, count_before - 3))
        steps_file.unlink(missing_ok=True)
        if online:
            m.stop()
            m.start(env=env)
            # the verb polls the daemon; the daemon is the process killed
            verb = subprocess.Popen(CLI + ["prune", "--repo", str(m.repo), "--keep-last", str(keep)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _kill_at(m.proc, steps_file, step, rng)
            m._log.close()
            verb.wait(timeout=30)
        else:
            m.stop()
            verb = subprocess.Popen(CLI + ["prune", "--repo", str(m.repo), "--keep-last", str(keep)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={**os.environ, **env})
            _kill_at(verb, steps_file, step, rng)
        m.start()
        assert snapshot(m.mp) == expected, (rnd, step, online)
        m.git_settled()
        count = m.commit_count()
        assert count in (count_before, keep), (rnd, step, online, count_before, keep, count)
        outcomes["new" if count == keep and keep != count_before else "old"] += 1
        # the history index agrees with main
        assert len([h for h in os.listdir(m / "@history")]) == count
        m.stop()
        assert_fsck_clean(m.repo)
        m.start()
        write_history(m, 2)         # more history for the next round
        rounds += 1
    assert rounds >= 20
    # the switch is the checkpoint: a kill before it keeps the old chain, after it the new
    assert outcomes["old"] >= 6 and outcomes["new"] >= 6, outcomes


def test_gc_offline_shrinks_after_prune(tmp_path):
    repo = tmp_path / "repo"
    s = Store(str(repo))
    now = time.time_ns()
    s.commit_group([Change(MKDIR, "a1", WHO, now)])
    for i in range(300):
        s.commit_group([Change(WRITE, "a1", WHO, now + i, files={"memory.json": json.dumps(
            {"i": i, "pad": "x" * 2000 + str(i)}).encode()})])
    s.close()
    r = cli("gc", "--repo", str(repo))
    size0 = fsck.repo_bytes(str(repo))
    cli("prune", "--repo", str(repo), "--keep-last", "10")
    assert fsck.repo_bytes(str(repo)) >= size0          # prune alone frees nothing
    r = cli("gc", "--repo", str(repo))
    size1 = fsck.repo_bytes(str(repo))
    assert size1 < size0 / 5, (size0, size1, r.stdout)
    assert_fsck_clean(repo)
    assert len(chain(repo)[0]) == 10


def test_prune_in_committer_interleaved_with_writes(tmp_path, monkeypatch):
    """In-process, without FUSE: a prune requested through the root xattr while writes
    keep arriving. Writes committed between its snapshot and its switch are carried to
    the new chain, writes queued during the switch land on it, a second request gets
    EBUSY, and the readers' head is the new chain's."""
    import trio

    from agentstatefs.daemon.options import MountOptions
    from agentstatefs.fs.errors import FsError
    from agentstatefs.fs.inodes import ROOT
    from agentstatefs.fs.namespace import Caller, Namespace
    from agentstatefs.fs.statemgr import StateManager

    monkeypatch.setenv("AGENTSTATEFS_PRUNE_PAUSE", "0.2")
    root = Caller(uid=0, gid=0, pid=os.getpid(), umask=0o022)
    store = Store(str(tmp_path / "repo"))
    sm = StateManager(store)
    ns = Namespace(store, sm, MountOptions())
    written = []
    result = {}

    async def write(dino, name, data):
        h, _ = await ns.create(dino, name, 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, root)
        try:
            await ns.write(h.fh, 0, data)
            await ns.flush(h.fh)
        finally:
            await ns.release(h.fh)

    async def main():
        async with trio.open_nursery() as nursery:
            for task in (sm.run_committer, sm.run_flusher, sm.run_maintenance):
                nursery.start_soon(task)
            d = (await ns.mkdir(ROOT, "a1", 0o755, root)).ino
            for i in range(20):
                await write(d, "config.json", json.dumps({"i": i}).encode())
            await ns.setxattr(ROOT, "user.agentstatefs.prune", b'{"keep_last": 3, "token": "t1"}', root)
            with pytest.raises(FsError) as e:
                await ns.setxattr(ROOT, "user.agentstatefs.gc", b"{}", root)
            assert e.value.errno == errno.EBUSY
            i = 0
            while sm.maintenance.busy:
                await write(d, "memory.json", json.dumps({"m": i}).encode())
                written.append(i)
                i += 1
            st = json.loads(await ns.getxattr(ROOT, "user.agentstatefs.maintenance", root))
            assert st["state"] == "done" and st["token"] == "t1", st
            result.update(st["result"])
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        assert len(written) >= 2                       # writes went on during the prune
        head = store.git.head
        assert store.reader.head == head
        entries = store.history.entries
        assert entries[-1].commit == str(head)
        memory = [e for e in entries if e.files and e.files[0][0] == "memory.json"]
        assert len(memory) == len(written)             # every write made during the prune is kept
        # keep-last counts the commits the prune's snapshot saw (a write or two may have
        # been committed before it was taken); everything after the snapshot is kept
        assert result["kept"] <= len(entries) <= result["kept"] + len(written)
        configs = [e for e in entries if e.files and e.files[0][0] == "config.json"]
        assert len(entries) - len(memory) == len(configs) and len(configs) <= 3
        assert json.loads(store.git.read_file("a1", "memory.json")) == {"m": written[-1]}
        assert json.loads(store.git.read_file("a1", "config.json")) == {"i": 19}
    finally:
        store.close()
    assert_fsck_clean(tmp_path / "repo")
    r = subprocess.run(["git", "-C", str(tmp_path / "repo"), "rev-list", "--count", "main"],
                       capture_output=True, text=True)
    assert int(r.stdout) == len(entries)


def test_gc_while_writing_loses_nothing(mounts):
    """gc through the mount holds new objects in memory while git repacks: writes made
    meanwhile are readable at once, reach git afterwards, and survive a kill -9."""
    import threading
    m = mounts().start()
    write_history(m, 10)
    cli("prune", "--repo", str(m.repo), "--keep-last", "3")
    stop = threading.Event()
    written = []

    def writer():
        i = 0
        while not stop.is_set():
            (m / "a1/memory.json").write_text(json.dumps({"w": i}))
            assert json.loads(read(m / "a1/memory.json")) == {"w": i}
            written.append(i)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        while len(written) < 3:
            time.sleep(0.01)
        before = len(written)
        cli("gc", "--repo", str(m.repo))
        during = len(written) - before
    finally:
        stop.set()
        t.join()
    assert during >= 1, "no write overlapped the gc"
    m.git_settled()
    settled_head = m.git("rev-parse", "main").strip()
    head = os.getxattr(m.mp, "user.agentstatefs.head").decode()
    assert settled_head == head
    assert json.loads(m.git("show", "main:" + _path("a1", "memory.json"))) == {"w": written[-1]}
    m.kill9()
    m.start()
    assert json.loads(read(m / "a1/memory.json")) == {"w": written[-1]}
    assert m.commit_count() == 3 + len(written)
    assert m.stop() == 0
    assert_fsck_clean(m.repo)


def test_prune_progress_only_on_a_terminal(tmp_path):
    """Progress lines go to stderr when it is a terminal, and nowhere otherwise."""
    import pty
    repo = tmp_path / "repo"
    offline_repo(repo, [9, 8, 7, 6, 5, 4, 3, 2, 1])
    r = cli("prune", "--repo", str(repo), "--keep-last", "8")
    assert r.stderr == "" and "kept 8" in r.stdout
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(CLI + ["prune", "--repo", str(repo), "--keep-last", "4"],
                             stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        out = p.stdout.read()
        assert p.wait(timeout=60) == 0
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert "kept 4" in out
    assert b"prune: rewriting" in seen and b"\x1b[K" in seen, seen
