"""The namespace in-process, without FUSE: interleavings of requests at their await points.

Each test runs the real store (git + journal in a temp dir) and the real committer in
a trio nursery, starts requests as concurrent tasks, and checks what a caller would
see. ``trio.testing.wait_all_tasks_blocked`` lets every started request reach its
await point (waiting for the committer) before the next step, so the interleavings
here are the ones the daemon meets when several FUSE requests are in flight.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from agentstatefs.daemon.options import MountOptions
from agentstatefs.fs import changes as ch
from agentstatefs.fs.errors import FsError
from agentstatefs.fs.inodes import ROOT
from agentstatefs.fs.namespace import Caller, Namespace
from agentstatefs.fs.statemgr import StateManager
from agentstatefs.fs.store import Store

ALICE = Caller(uid=1000, gid=1000, pid=os.getpid(), umask=0o022)


@asynccontextmanager
async def mounted(tmp_path, inline=False, **opts):
    store = Store(str(tmp_path / "repo"))
    sm = StateManager(store)
    # These tests place requests at the committer's await point (the worker thread);
    # a lone group committed inline (decision 45) has none: test_inline_commits covers it.
    sm.commit_inline = inline
    options = MountOptions()
    for k, v in opts.items():
        setattr(options, k, v)
    ns = Namespace(store, sm, options, root_owner=(ALICE.uid, ALICE.gid))   # alice mounted it
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sm.run_committer)
            nursery.start_soon(sm.run_flusher)
            try:
                yield ns
            finally:
                nursery.cancel_scope.cancel()
    finally:
        store.close()


def run(tmp_path, body, inline=False, **opts):
    async def main():
        async with mounted(tmp_path, inline, **opts) as ns:
            await body(ns)
    trio.run(main)


async def agent(ns, name="a1"):
    attr = await ns.mkdir(ROOT, name, 0o755, ALICE)
    return attr.ino


async def write_file(ns, dino, name, data: bytes, caller=ALICE):
    h, _ = await ns.create(dino, name, 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, caller)
    try:
        await ns.write(h.fh, 0, data)
        await ns.flush(h.fh)
    finally:
        await ns.release(h.fh)


async def read_file(ns, dino, name) -> bytes:
    attr = await ns.lookup(dino, name, ALICE)
    h = await ns.open(attr.ino, os.O_RDONLY, ALICE)
    try:
        return await ns.read(h.fh, 0, 1 << 30)
    finally:
        await ns.release(h.fh)


def test_rename_moves_what_a_queued_close_commits(tmp_path):
    """Defect 3: a close of config.json queued in the same group as `mv config.json
    memory.json` is not lost, and the target keeps the source's mode and owner."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"v": 1}')
        cfg = await ns.lookup(d, "config.json", ALICE)
        await ns.setattr(cfg.ino, ALICE, mode=0o600)
        h = await ns.open(cfg.ino, os.O_WRONLY | os.O_TRUNC, ALICE)
        await ns.write(h.fh, 0, b'{"v": 2}')
        async with trio.open_nursery() as n:
            n.start_soon(ns.flush, h.fh)
            n.start_soon(ns.rename, d, "config.json", d, "memory.json", 0, Caller(uid=0, gid=0))
        await ns.release(h.fh)
        with pytest.raises(FsError) as e:
            await ns.lookup(d, "config.json", ALICE)
        assert e.value.errno == errno.ENOENT
        mem = await ns.lookup(d, "memory.json", ALICE)
        assert mem.ino == cfg.ino                      # the file kept its number
        assert stat.S_IMODE(mem.mode) == 0o600 and mem.uid == ALICE.uid
        assert await read_file(ns, d, "memory.json") == b'{"v": 2}'
    run(tmp_path, body)


def test_rename_exchange_swaps(tmp_path):
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"c": 1}')
        await write_file(ns, d, "memory.json", b'{"m": 1}')
        await ns.rename(d, "config.json", d, "memory.json", 2, ALICE)
        assert await read_file(ns, d, "config.json") == b'{"m": 1}'
        assert await read_file(ns, d, "memory.json") == b'{"c": 1}'
        with pytest.raises(FsError) as e:
            await ns.rename(d, "config.json", d, "memory.json", 4, ALICE)   # RENAME_WHITEOUT
        assert e.value.errno == errno.EINVAL
    run(tmp_path, body)


def test_flush_commits_writes_made_while_it_waits(tmp_path):
    """Defect 4: a write to the same descriptor during the flush's commit is committed
    before the flush returns."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"v": 0}')
        cfg = await ns.lookup(d, "config.json", ALICE)
        h = await ns.open(cfg.ino, os.O_WRONLY | os.O_TRUNC, ALICE)
        await ns.write(h.fh, 0, b'{"v": 1}')

        async def late_write():
            await trio.testing.wait_all_tasks_blocked()
            await ns.write(h.fh, 0, b'{"v": 2}')
        async with trio.open_nursery() as n:
            n.start_soon(ns.flush, h.fh)
            n.start_soon(late_write)
        await ns.flush(h.fh) if h.dirty else None
        assert not h.dirty
        await ns.release(h.fh)
        assert await read_file(ns, d, "config.json") == b'{"v": 2}'
    run(tmp_path, body)


def test_inline_commits_only_for_a_lone_small_group_on_a_fast_disk(tmp_path):
    """Decision 45: a group is committed on the trio thread only when nobody else is
    waiting for it, it is small, and the last inline group was not slow."""
    from agentstatefs.fs import statemgr

    async def body(ns):
        sm = ns.sm
        d = await agent(ns)
        base_i, base_t = sm.groups_inline, sm.groups_threaded
        await write_file(ns, d, "config.json", b'{"v": 1}')
        assert (sm.groups_inline, sm.groups_threaded) == (base_i + 1, base_t)
        sm.in_flight = 5            # other requests in flight: they run during the fsync
        try:
            await write_file(ns, d, "config.json", b'{"v": 2}')
        finally:
            sm.in_flight = 0
        assert (sm.groups_inline, sm.groups_threaded) == (base_i + 1, base_t + 1)
        big = json.dumps({"pad": "x" * (statemgr.INLINE_MAX_BYTES + 1)}).encode()
        await write_file(ns, d, "memory.json", big)
        assert sm.groups_threaded == base_t + 2
        sm._inline_paused_until = float("inf")     # as after a slow inline group
        await write_file(ns, d, "config.json", b'{"v": 3}')
        assert (sm.groups_inline, sm.groups_threaded) == (base_i + 1, base_t + 3)
        assert await read_file(ns, d, "config.json") == b'{"v": 3}'
        assert await read_file(ns, d, "memory.json") == big
    run(tmp_path, body, inline=True)


def test_flush_loop_without_second_flush(tmp_path):
    """Defect 4, strictly: the one flush in flight commits the late write itself."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"v": 0}')
        cfg = await ns.lookup(d, "config.json", ALICE)
        h = await ns.open(cfg.ino, os.O_WRONLY, ALICE)
        await ns.write(h.fh, 0, b'{"v": 1}')
        done = trio.Event()

        async def flusher():
            await ns.flush(h.fh)
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(flusher)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            await ns.write(h.fh, 0, b'{"v": 3}')
        assert not h.dirty
        assert await read_file(ns, d, "config.json") == b'{"v": 3}'
        await ns.release(h.fh)
    run(tmp_path, body)


def test_scratch_rename_rechecks_after_await(tmp_path):
    """Defect 5: the scratch name is removed only if it still names the committed node."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "t.json", b'{"t": 1}')

        async def recreate():
            await trio.testing.wait_all_tasks_blocked()
            await ns.unlink(d, "t.json", ALICE)
            await write_file(ns, d, "t.json", b'{"t": "new"}')
            ns.store._commit_lock.release()     # only now may the rename's commit finish
        # Hold the committer so the rename is certainly waiting at its await while the
        # scratch name is unlinked and created again (whatever the machine's load).
        ns.store._commit_lock.acquire()
        async with trio.open_nursery() as n:
            n.start_soon(ns.rename, d, "t.json", d, "config.json", 0, ALICE)
            n.start_soon(recreate)
        assert await read_file(ns, d, "config.json") == b'{"t": 1}'
        assert await read_file(ns, d, "t.json") == b'{"t": "new"}'
    run(tmp_path, body)


def test_unlinked_scratch_keeps_data_until_close_and_frees_space(tmp_path):
    """Defect 6."""
    async def body(ns):
        d = await agent(ns)
        base = ns.scratch.used
        for _ in range(50):
            h, _ = await ns.create(d, "tmpx", 0o600, os.O_RDWR | os.O_CREAT, ALICE)
            await ns.unlink(d, "tmpx", ALICE)
            await ns.write(h.fh, 0, b"x" * (1 << 20))
            assert await ns.read(h.fh, 0, 5) == b"xxxxx"
            await ns.release(h.fh)
        assert ns.scratch.used == base
    run(tmp_path, body, scratch_max=8 << 20)


def test_scratch_cap_counts_names_and_xattrs(tmp_path):
    """Defect 12: many empty files and big xattrs hit the cap."""
    async def body(ns):
        d = await agent(ns)
        with pytest.raises(FsError) as e:
            for i in range(100_000):
                h, _ = await ns.create(d, f"f{i}", 0o600, os.O_WRONLY | os.O_CREAT, ALICE)
                await ns.release(h.fh)
        assert e.value.errno == errno.ENOSPC
    run(tmp_path, body, scratch_max=1 << 20)

    async def body2(ns):
        d = await agent(ns)
        h, attr = await ns.create(d, "x", 0o600, os.O_WRONLY | os.O_CREAT, ALICE)
        await ns.release(h.fh)
        with pytest.raises(FsError) as e:
            for i in range(100):
                await ns.setxattr(attr.ino, f"user.x{i}", b"v" * 65536, ALICE)
        assert e.value.errno == errno.ENOSPC
    run(tmp_path / "b", body2, scratch_max=1 << 20)


def test_truncate_past_cap_is_efbig_without_allocating(tmp_path):
    """Defect 7."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"v": 1}')
        cfg = await ns.lookup(d, "config.json", ALICE)
        with pytest.raises(FsError) as e:
            await ns.setattr(cfg.ino, ALICE, size=100 << 30)
        assert e.value.errno == errno.EFBIG
        h = await ns.open(cfg.ino, os.O_RDWR, ALICE)
        with pytest.raises(FsError) as e:
            await ns.setattr(cfg.ino, ALICE, size=100 << 30, fh=h.fh)
        assert e.value.errno == errno.EFBIG
        await ns.release(h.fh)
        assert await read_file(ns, d, "config.json") == b'{"v": 1}'
    run(tmp_path, body)


def test_ftruncate_answers_with_the_buffer_size(tmp_path):
    """Defect 8: attributes after ftruncate (and while writing) show the writer's size."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"long": "xxxxxxxxxxxxxxxxxxxx"}')
        cfg = await ns.lookup(d, "config.json", ALICE)
        h = await ns.open(cfg.ino, os.O_RDWR, ALICE)
        attr = await ns.setattr(cfg.ino, ALICE, size=0, fh=h.fh)
        assert attr.size == 0
        await ns.write(h.fh, 0, b'{"a":1}')
        assert (await ns.getattr(cfg.ino, ALICE)).size == 7
        await ns.write(h.fh, 7, b"\n")
        await ns.flush(h.fh)
        await ns.release(h.fh)
        assert await read_file(ns, d, "config.json") == b'{"a":1}\n'
    run(tmp_path, body)


def test_write_to_unlinked_state_file_goes_nowhere(tmp_path):
    """Defect 9: `exec 3>f; rm f; echo {} >&3` leaves f deleted."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"v": 1}')
        cfg = await ns.lookup(d, "config.json", ALICE)
        h = await ns.open(cfg.ino, os.O_WRONLY | os.O_TRUNC, ALICE)
        await ns.unlink(d, "config.json", ALICE)
        await ns.write(h.fh, 0, b"{}")
        await ns.flush(h.fh)
        await ns.release(h.fh)
        with pytest.raises(FsError) as e:
            await ns.lookup(d, "config.json", ALICE)
        assert e.value.errno == errno.ENOENT
        # Also for a file created and unlinked before its first close.
        h, _ = await ns.create(d, "memory.json", 0o644, os.O_WRONLY | os.O_CREAT, ALICE)
        await ns.unlink(d, "memory.json", ALICE)
        await ns.write(h.fh, 0, b"{}")
        await ns.flush(h.fh)
        await ns.release(h.fh)
        with pytest.raises(FsError):
            await ns.lookup(d, "memory.json", ALICE)
    run(tmp_path, body)


def test_write_follows_a_renamed_file(tmp_path):
    """An open descriptor writes to its file wherever it was renamed (as on ext4)."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"v": 1}')
        cfg = await ns.lookup(d, "config.json", ALICE)
        h = await ns.open(cfg.ino, os.O_WRONLY | os.O_TRUNC, ALICE)
        await ns.rename(d, "config.json", d, "memory.json", 0, ALICE)
        await ns.write(h.fh, 0, b'{"v": 2}')
        await ns.flush(h.fh)
        await ns.release(h.fh)
        assert await read_file(ns, d, "memory.json") == b'{"v": 2}'
        with pytest.raises(FsError):
            await ns.lookup(d, "config.json", ALICE)
    run(tmp_path, body)


def test_recreated_agent_gets_a_new_inode_while_the_old_is_held(tmp_path):
    """Defect 10."""
    async def body(ns):
        old = await agent(ns)                     # mkdir registers one kernel reference
        await ns.rmdir(ROOT, "a1", ALICE)
        new = await agent(ns)
        assert new != old
        assert (await ns.getattr(old, ALICE)).nlink == 0   # the old one is an orphan
        ns.forget([(old, 1)])
        assert not ns.inodes.has(old)
    run(tmp_path, body)


def test_hostile_command_name_commits_cleanly(tmp_path):
    """Defect 1: a newline, '<' and '>' in the command name never reach git raw."""
    async def body(ns):
        d = await agent(ns)
        who = ch.Who(5, 5, 123, "x\nAgent: evil <a@b>")
        await ns._save("a1", "config.json", b'{"v": 1}', who)
        await write_file(ns, d, "memory.json", b'{"m": 1}')
    run(tmp_path, body)
    repo = str(tmp_path / "repo")
    r = subprocess.run(["git", "-C", repo, "fsck", "--full", "--strict"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    log = subprocess.run(["git", "-C", repo, "log", "--format=%an%n%B"], capture_output=True, text=True,
                         check=True).stdout
    assert "Agent: evil" not in log.splitlines()
    assert "x\\x0aAgent: evil \\x3ca@b\\x3e" in log


def test_history_listing_registers_only_accepted_entries(tmp_path):
    """Defect 12: a listing the kernel does not take leaves no inode behind."""
    async def body(ns):
        d = await agent(ns)
        for i in range(20):
            await write_file(ns, d, "config.json", json.dumps({"i": i}).encode())
        hist = await ns.lookup(ROOT, "@history", ALICE)
        before = len(ns.inodes)
        fh = await ns.opendir(hist.ino, ALICE)
        seen = []
        await ns.readdir(fh, 0, lambda name, attr, nxt: seen.append(name) or len(seen) < 5)
        await ns.releasedir(fh)
        assert len(seen) == 5 and seen[:2] == [".", ".."]   # "." and ".." take no reference
        assert len(ns.inodes) == before + 2
    run(tmp_path, body)


def test_listings_without_lookup_register_nothing_and_number_like_a_lookup(tmp_path):
    """Decision 44: with ``listing_without_lookup`` (the FUSE adapter's readdirplus
    entries without a node) listing agents, at the head or at a past commit, adds no
    inode; the numbers listed are the ones a later lookup gives. Without it (a pyfuse3
    whose layout the adapter does not know) every listed entry is registered."""
    async def body(ns):
        names = [f"ag{i:03d}" for i in range(40)]
        for n in names:
            await agent(ns, n)
        ns.forget([(ns.inodes.peek(("agent", n)), 1) for n in names])   # the kernel forgot them
        hist = await ns.lookup(ROOT, "@history", ALICE)
        head = await ns.lookup(hist.ino, "HEAD", ALICE)
        base = len(ns.inodes)

        async def listing(ino):
            got = []
            fh = await ns.opendir(ino, ALICE)
            await ns.readdir(fh, 0, lambda name, attr, nxt: got.append((name, attr.ino, attr.listed_only)) or True)
            await ns.releasedir(fh)
            return {n: (i, bare) for n, i, bare in got if n not in (".", "..", "@history")}

        ns.listing_without_lookup = True
        for ino, kind in ((ROOT, "agent"), (head.ino, "hist-agent")):
            seen = await listing(ino)
            assert sorted(seen) == names
            assert all(bare for _, bare in seen.values())
            assert len(ns.inodes) == base, kind
            for n in names[:3]:
                assert (await ns.lookup(ino, n, ALICE)).ino == seen[n][0]
            ns.forget([(seen[n][0], 1) for n in names[:3]])
            assert len(ns.inodes) == base
        ns.listing_without_lookup = False
        seen = await listing(ROOT)
        assert not any(bare for _, bare in seen.values())
        assert len(ns.inodes) == base + len(names)
    run(tmp_path, body)


def test_identical_rewrite_makes_no_commit_and_only_copies_from_history_are_restores(tmp_path):
    BOB = Caller(uid=1000, gid=1000, pid=1, umask=0o022)
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"v": 1}')
        await write_file(ns, d, "config.json", b'{"v": 2}')
        n = ns.store.commits
        await write_file(ns, d, "config.json", b'{"v": 2}')
        assert ns.store.commits == n
        await write_file(ns, d, "config.json", b'{"v": 1}')       # equal to v1, but a plain write
        assert ns.store.history.entries[-1].op == ch.WRITE
        v2 = ns.store.history.entries[-2].commit
        hist = await ns.lookup(d, "@history", ALICE)
        prev = await ns.lookup(hist.ino, "HEAD~1", ALICE)
        assert await read_file(ns, prev.ino, "config.json") == b'{"v": 2}'   # ALICE reads v2 ...
        await write_file(ns, d, "config.json", b'{"v": 2}', caller=BOB)      # another process: a write
        assert ns.store.history.entries[-1].op == ch.WRITE
        await write_file(ns, d, "config.json", b'{"v": 1}')
        await write_file(ns, d, "config.json", b'{"v": 2}')                  # ... and writes it: a restore
        e = ns.store.history.entries[-1]
        assert e.op == ch.RESTORE
        assert ns.git.repo[e.commit].message.startswith(f"restore a1/config.json from {v2[:7]}")
    run(tmp_path, body)


def test_file_being_created_survives_other_commits_of_its_agent(tmp_path):
    """A created, not yet closed state file keeps its name (and its first close commits)
    while other writes of the same agent are published."""
    async def body(ns):
        d = await agent(ns)
        h, _ = await ns.create(d, "memory.json", 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, ALICE)
        await ns.write(h.fh, 0, b'{"m": 1}')
        await write_file(ns, d, "config.json", b'{"c": 1}')
        await ns.lookup(d, "memory.json", ALICE)
        await ns.flush(h.fh)
        await ns.release(h.fh)
        assert await read_file(ns, d, "memory.json") == b'{"m": 1}'
    run(tmp_path, body)


def test_temp_rename_of_identical_content_makes_no_commit(tmp_path):
    """Same bytes via temp file + rename: no new version, and the name still answers."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"v": 1}')
        n = ns.store.commits
        await write_file(ns, d, "t", b'{"v": 1}')
        await ns.rename(d, "t", d, "config.json", 0, ALICE)
        assert ns.store.commits == n
        assert await read_file(ns, d, "config.json") == b'{"v": 1}'
        assert (await ns.lookup(d, "config.json", ALICE)).size == 8
    run(tmp_path, body)


def test_open_through_a_dropped_unwritten_file_creates_it_again(tmp_path):
    """A created file closed without valid content vanishes; the kernel may still map the
    name to its inode for a moment, and an open for writing through it creates anew."""
    async def body(ns):
        d = await agent(ns)
        h, attr = await ns.create(d, "memory.json", 0o644, os.O_WRONLY | os.O_CREAT, ALICE)
        await ns.release(h.fh)
        with pytest.raises(FsError):
            await ns.getattr(attr.ino, ALICE)
        with pytest.raises(FsError):
            await ns.open(attr.ino, os.O_RDONLY, ALICE)
        h = await ns.open(attr.ino, os.O_WRONLY | os.O_TRUNC, ALICE)
        await ns.write(h.fh, 0, b'{"m": 2}')
        await ns.flush(h.fh)
        await ns.release(h.fh)
        assert await read_file(ns, d, "memory.json") == b'{"m": 2}'
    run(tmp_path, body)
