"""Parked removals (fs/removals.py), driven in-process with explicit interleavings, and
their durability on a real mount (kill -9 inside the window).

P is the process saving a file (this test process, alive); Q is any other process.
"""

import errno
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent))

from agentstatefs.daemon.options import MountOptions  # noqa: E402
from agentstatefs.fs.errors import FsError  # noqa: E402
from agentstatefs.fs.inodes import ROOT  # noqa: E402
from agentstatefs.fs.namespace import Caller, Namespace  # noqa: E402
from agentstatefs.fs.statemgr import StateManager  # noqa: E402
from agentstatefs.fs.store import Store  # noqa: E402

P = Caller(uid=1000, gid=1000, pid=os.getpid(), umask=0o022)
Q = Caller(uid=1000, gid=1000, pid=1, umask=0o022)     # another process (init: alive, never P)


@asynccontextmanager
async def mounted(tmp_path, window=60.0):
    store = Store(str(tmp_path / "repo"))
    sm = StateManager(store)
    options = MountOptions()
    options.removal_window = window
    ns = Namespace(store, sm, options, root_owner=(P.uid, P.gid))   # P mounted it
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sm.run_committer)
            nursery.start_soon(sm.run_flusher)
            nursery.start_soon(ns.run_removals)
            try:
                yield ns
            finally:
                nursery.cancel_scope.cancel()
    finally:
        store.close()


def run(tmp_path, body, **kw):
    async def main():
        async with mounted(tmp_path, **kw) as ns:
            await body(ns)
    trio.run(main)


async def setup(ns, content=b'{"v": 1}'):
    d = (await ns.mkdir(ROOT, "a1", 0o755, P)).ino
    await write(ns, d, "config.json", content, P)
    return d


async def write(ns, d, name, data, caller, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
    h, _ = await ns.create(d, name, 0o644, flags, caller)
    try:
        await ns.write(h.fh, 0, data)
        await ns.flush(h.fh)
    finally:
        await ns.release(h.fh)


async def read(ns, d, name, caller) -> bytes:
    attr = await ns.lookup(d, name, caller)
    h = await ns.open(attr.ino, os.O_RDONLY, caller)
    try:
        return await ns.read(h.fh, 0, 1 << 20)
    finally:
        await ns.release(h.fh)


async def absent(ns, d, name, caller) -> bool:
    try:
        await ns.lookup(d, name, caller)
    except FsError as e:
        assert e.errno == errno.ENOENT
        return True
    return False


def test_backup_by_rename_folds_into_one_write_and_others_always_see_the_file(tmp_path):
    async def body(ns):
        d = await setup(ns)
        n0 = ns.store.commits
        await ns.rename(d, "config.json", d, "config.json~", 0, P)
        assert await read(ns, d, "config.json~", P) == b'{"v": 1}'     # the backup (scratch)
        assert await absent(ns, d, "config.json", P)                    # gone for P ...
        assert await read(ns, d, "config.json", Q) == b'{"v": 1}'      # ... not for Q
        h, attr = await ns.create(d, "config.json", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, P)
        assert attr.entry_timeout == 0
        await ns.write(h.fh, 0, b'{"v": 2}')
        assert await read(ns, d, "config.json", Q) == b'{"v": 1}'      # Q: still the committed one
        q_attr = await ns.lookup(d, "config.json", Q)                   # Q looked it up just before...
        await ns.flush(h.fh)                                            # ... P's close commits
        await ns.release(h.fh)
        assert ns.store.commits == n0 + 1                               # one commit, a write
        assert ns.store.history.entries[-1].op == "write"
        qh = await ns.open(q_attr.ino, os.O_RDONLY, Q)                  # Q opens what it looked up:
        assert await ns.read(qh.fh, 0, 100) == b'{"v": 1}'             # the version it found (ext4)
        await ns.release(qh.fh)
        for c in (P, Q):
            assert await read(ns, d, "config.json", c) == b'{"v": 2}'
        await ns.unlink(d, "config.json~", P)
        assert not ns.removals.all()
        await ns.settle_removals()
        assert ns.store.commits == n0 + 1
    run(tmp_path, body)


def test_refused_rewrite_keeps_the_previous_version_and_commits_nothing(tmp_path):
    async def body(ns):
        d = await setup(ns)
        n0 = ns.store.commits
        await ns.unlink(d, "config.json", P)                    # install(1): unlink, O_EXCL create
        h, _ = await ns.create(d, "config.json", 0o600, os.O_WRONLY | os.O_CREAT | os.O_EXCL, P)
        await ns.write(h.fh, 0, b'{"v": ')
        with pytest.raises(FsError) as e:
            await ns.flush(h.fh)
        assert e.value.errno == errno.EINVAL
        await ns.release(h.fh)
        # Until it settles, P still sees the name gone (its chmod after the failed close
        # changes nothing); Q sees the previous version throughout.
        assert await absent(ns, d, "config.json", P)
        assert await read(ns, d, "config.json", Q) == b'{"v": 1}'
        await ns.settle_removals()
        assert await read(ns, d, "config.json", P) == b'{"v": 1}'
        assert ns.store.commits == n0
    run(tmp_path, body)


def test_unlinked_and_not_rewritten_is_a_delete_once_the_window_passes(tmp_path):
    async def body(ns):
        d = await setup(ns)
        n0 = ns.store.commits
        await ns.unlink(d, "config.json", P)
        assert await read(ns, d, "config.json", Q) == b'{"v": 1}'
        while ns.removals.all():              # the background task commits it
            await trio.sleep(0.01)
        assert ns.store.commits == n0 + 1
        assert ns.store.history.entries[-1].op == "delete"
        assert await absent(ns, d, "config.json", Q) and await absent(ns, d, "config.json", P)
    run(tmp_path, body, window=0.05)


def test_a_rewrite_in_progress_holds_the_window_open(tmp_path):
    async def body(ns):
        d = await setup(ns)
        n0 = ns.store.commits
        await ns.unlink(d, "config.json", P)
        h, _ = await ns.create(d, "config.json", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, P)
        await ns.write(h.fh, 0, b'{"v": 3}')
        await trio.sleep(0.2)                 # four windows: still parked, P still writing
        assert ns.removals.all()
        await ns.flush(h.fh)
        await ns.release(h.fh)
        assert ns.store.commits == n0 + 1 and not ns.removals.all()
        assert await read(ns, d, "config.json", Q) == b'{"v": 3}'
    run(tmp_path, body, window=0.05)


def test_removal_by_a_finished_process_is_committed_before_others_look(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    R = Caller(uid=1000, gid=1000, pid=gone.pid)       # `rm` that has exited

    async def body(ns):
        d = await setup(ns)
        n0 = ns.store.commits
        await ns.unlink(d, "config.json", R)
        assert await absent(ns, d, "config.json", Q)    # rm; ls: gone
        assert ns.store.commits == n0 + 1
        # The same for a listing.
        await write(ns, d, "memory.json", b"[]", P)
        await ns.unlink(d, "memory.json", R)
        fh = await ns.opendir(d, Q)
        names = []
        await ns.readdir(fh, 0, lambda name, attr, nxt: names.append(name) or True)
        assert "memory.json" not in names
    run(tmp_path, body)


def test_other_writers_and_rmdir_settle_a_parked_removal_first(tmp_path):
    async def body(ns):
        d = await setup(ns)
        n0 = ns.store.commits
        attr = await ns.lookup(d, "config.json", Q)
        await ns.unlink(d, "config.json", P)
        # Q opens the file it sees for writing: the removal came first, so it is gone.
        with pytest.raises(FsError) as e:
            await ns.open(attr.ino, os.O_WRONLY | os.O_TRUNC, Q)
        assert e.value.errno == errno.ENOENT
        assert ns.store.commits == n0 + 1
        await write(ns, d, "memory.json", b"[]", P)
        await ns.unlink(d, "memory.json", P)
        await ns.rmdir(ROOT, "a1", P)                    # rm -r: delete, then rmdir
        ops = [e.op for e in ns.store.history.entries[-2:]]
        assert ops == ["delete", "rmdir"]
    run(tmp_path, body)


def test_write_through_a_descriptor_opened_before_the_unlink_goes_nowhere(tmp_path):
    async def body(ns):
        d = await setup(ns)
        attr = await ns.lookup(d, "config.json", P)
        h = await ns.open(attr.ino, os.O_WRONLY | os.O_TRUNC, P)
        await ns.unlink(d, "config.json", P)
        await ns.write(h.fh, 0, b'{"late": 1}')
        await ns.flush(h.fh)
        await ns.release(h.fh)
        # ... and a new file under the name is still one write.
        n0 = ns.store.commits
        await write(ns, d, "config.json", b'{"v": 4}', P)
        assert ns.store.commits == n0 + 1
        assert await read(ns, d, "config.json", Q) == b'{"v": 4}'
    run(tmp_path, body)


def test_kill_9_inside_the_window_brings_the_file_back(mounts):
    """An unlink not yet committed is not durable (docs/decisions.md): after a crash
    the file is there, as an unlink not yet synced may be on ext4."""
    m = mounts().start()
    os.mkdir(m / "a1")
    (m / "a1/config.json").write_text('{"keep": 1}')
    m.commit_count()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import os, sys, time\n"
                               "os.unlink(sys.argv[1]); print('gone', flush=True); time.sleep(600)",
                               str(m / "a1/config.json")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "gone\n"
        assert (m / "a1/config.json").read_text() == '{"keep": 1}'    # others still see it
        m.kill9()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    subprocess.run(["fusermount3", "-uz", str(m.mp)], capture_output=True)
    m.start()
    assert (m / "a1/config.json").read_text() == '{"keep": 1}'
    # Once committed (here: the head is read), the delete is durable.
    os.unlink(m / "a1/config.json")
    m.commit_count()
    m.kill9()
    subprocess.run(["fusermount3", "-uz", str(m.mp)], capture_output=True)
    m.start()
    assert not (m / "a1/config.json").exists()


def test_rm_then_ls_from_the_shell(mounts):
    m = mounts().start()
    os.mkdir(m / "a1")
    (m / "a1/config.json").write_text("{}")
    r = subprocess.run("rm a1/config.json && ls a1 && test ! -e a1/config.json", shell=True,
                       cwd=m.mp, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "", r
    assert m.git("log", "-1", "--format=%s").startswith("delete a1/config.json")
