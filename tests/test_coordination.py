"""Issue 11 in-process: compare-and-swap, refused writes made visible, patches, events."""

from __future__ import annotations

import errno
import json
import os

import pytest
import trio
import trio.testing

from agentstatefs.fs.errors import FsError
from agentstatefs.fs.inodes import ROOT
from agentstatefs.fs.namespace import IF_VERSION

from test_namespace import ALICE, agent, read_file, run, write_file


async def scratch(ns, d, name, data: bytes, if_version=None):
    h, attr = await ns.create(d, name, 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, ALICE)
    await ns.write(h.fh, 0, data)
    await ns.release(h.fh)
    if if_version is not None:
        await ns.setxattr(attr.ino, IF_VERSION, str(if_version).encode(), ALICE)
    return attr.ino


async def version(ns, d, name) -> int:
    attr = await ns.lookup(d, name, ALICE)
    return int(await ns.getxattr(attr.ino, "user.agentstatefs.version", ALICE))


def test_cas_rename_checks_the_version(tmp_path):
    async def body(ns):
        d = await agent(ns)
        await scratch(ns, d, "t", b'{"n": 1}', if_version=0)       # 0: must not exist yet
        await ns.rename(d, "t", d, "config.json", 0, ALICE)
        assert await version(ns, d, "config.json") == 1
        await scratch(ns, d, "t", b'{"n": 2}', if_version=0)
        with pytest.raises(FsError) as e:
            await ns.rename(d, "t", d, "config.json", 0, ALICE)
        assert e.value.errno == errno.ESTALE
        assert await read_file(ns, d, "config.json") == b'{"n": 1}'
        await scratch(ns, d, "t", b'{"n": 2}', if_version=1)
        await ns.rename(d, "t", d, "config.json", 0, ALICE)
        assert await read_file(ns, d, "config.json") == b'{"n": 2}'
        assert await version(ns, d, "config.json") == 2
        # without the xattr, a rename stays unconditional
        await scratch(ns, d, "t", b'{"n": 3}')
        await ns.rename(d, "t", d, "config.json", 0, ALICE)
        assert await version(ns, d, "config.json") == 3
        # runtime.json (RAM) too
        await scratch(ns, d, "t", b'{"r": 1}', if_version=0)
        await ns.rename(d, "t", d, "runtime.json", 0, ALICE)
        await scratch(ns, d, "t", b'{"r": 2}', if_version=5)
        with pytest.raises(FsError) as e:
            await ns.rename(d, "t", d, "runtime.json", 0, ALICE)
        assert e.value.errno == errno.ESTALE
    run(tmp_path, body)


def test_cas_racers_in_one_group_only_one_wins(tmp_path):
    """Two renames expecting the same version queued together: the store checks each
    against the head as of its turn, so exactly one wins."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"n": 0}')
        await scratch(ns, d, "a", b'{"n": "a"}', if_version=1)
        await scratch(ns, d, "b", b'{"n": "b"}', if_version=1)
        outcome = {}

        async def mv(name):
            try:
                await ns.rename(d, name, d, "config.json", 0, ALICE)
                outcome[name] = "ok"
            except FsError as exc:
                outcome[name] = errno.errorcode[exc.errno]
        async with trio.open_nursery() as n:
            n.start_soon(mv, "a")
            n.start_soon(mv, "b")
        assert sorted(outcome.values()) == ["ESTALE", "ok"]
        assert await version(ns, d, "config.json") == 2
    run(tmp_path, body)


def test_if_version_xattr_checked(tmp_path):
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{}')
        ino = await scratch(ns, d, "t", b'{}')
        with pytest.raises(FsError) as e:
            await ns.setxattr(ino, IF_VERSION, b"two", ALICE)
        assert e.value.errno == errno.EINVAL
        cfg = await ns.lookup(d, "config.json", ALICE)
        with pytest.raises(FsError) as e:
            await ns.setxattr(cfg.ino, IF_VERSION, b"1", ALICE)
        assert e.value.errno == errno.EINVAL and "scratch file" in e.value.reason
        await ns.setxattr(ino, IF_VERSION, b"1\n", ALICE)
        assert await ns.getxattr(ino, IF_VERSION, ALICE) == b"1\n"
    run(tmp_path, body)


async def rejected(ns, d, name):
    dino = (await ns.lookup(d, "@rejected", ALICE)).ino
    try:
        attr = await ns.lookup(dino, name, ALICE)
    except FsError as exc:
        assert exc.errno == errno.ENOENT
        return None, None
    h = await ns.open(attr.ino, os.O_RDONLY, ALICE)
    try:
        data = await ns.read(h.fh, 0, 1 << 20)
    finally:
        await ns.release(h.fh)
    return data, (await ns.getxattr(attr.ino, "user.agentstatefs.last-error", ALICE)).decode()


def test_refused_close_is_kept_in_rejected(tmp_path):
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"ok": 1}')
        cfg = await ns.lookup(d, "config.json", ALICE)
        h = await ns.open(cfg.ino, os.O_WRONLY | os.O_TRUNC, ALICE)
        await ns.write(h.fh, 0, b"{oops\n")
        with pytest.raises(FsError) as e:
            await ns.flush(h.fh)
        assert e.value.errno == errno.EINVAL
        # visible as soon as close() returned
        data, err = await rejected(ns, d, "config.json")
        assert data == b"{oops\n"
        assert err.startswith("line 1 column 2: Expecting property name") and "EINVAL" in err
        assert f"pid {os.getpid()}" in err
        await ns.release(h.fh)
        last = await ns.getxattr(cfg.ino, "user.agentstatefs.last-error", ALICE)
        assert last.decode() == err
        assert "user.agentstatefs.last-error" in await ns.listxattr(cfg.ino, ALICE)
        assert await read_file(ns, d, "config.json") == b'{"ok": 1}'
        # read-only, and hidden from the agent's listing
        dino = (await ns.lookup(d, "@rejected", ALICE)).ino
        rej = await ns.lookup(dino, "config.json", ALICE)
        with pytest.raises(FsError) as e:
            await ns.open(rej.ino, os.O_WRONLY, ALICE)
        assert e.value.errno == errno.EROFS
        with pytest.raises(FsError) as e:
            await ns.unlink(dino, "config.json", ALICE)
        assert e.value.errno == errno.EROFS
        fh = await ns.opendir(d, ALICE)
        names = []
        await ns.readdir(fh, 0, lambda name, attr, nxt: names.append(name) or True)
        assert "@rejected" not in names
        fh = await ns.opendir(dino, ALICE)
        names = []
        await ns.readdir(fh, 0, lambda name, attr, nxt: names.append(name) or True)
        assert names == [".", "..", "config.json"]
        # a refused rename of a scratch file too
        await scratch(ns, d, "t", b'[1, 2')
        with pytest.raises(FsError):
            await ns.rename(d, "t", d, "memory.json", 0, ALICE)
        data, err = await rejected(ns, d, "memory.json")
        assert data == b"[1, 2" and "Expecting" in err
    run(tmp_path, body)


def test_dup_close_refusal_taken_back_when_the_handle_commits(tmp_path):
    """`echo '{...}' > f`: the shell's first close (empty buffer) is refused, the last
    one commits: no @rejected entry is left, an earlier one comes back."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"ok": 1}')
        cfg = await ns.lookup(d, "config.json", ALICE)
        h = await ns.open(cfg.ino, os.O_WRONLY | os.O_TRUNC, ALICE)
        with pytest.raises(FsError):
            await ns.flush(h.fh)                  # the dup'ed descriptor, nothing written
        await ns.write(h.fh, 0, b'{"ok": 2}')
        await ns.flush(h.fh)
        await ns.release(h.fh)
        assert await rejected(ns, d, "config.json") == (None, None)
        with pytest.raises(FsError) as e:
            await ns.getxattr(cfg.ino, "user.agentstatefs.last-error", ALICE)
        assert e.value.errno == errno.ENODATA
        # an earlier final refusal survives a later taken-back one
        h = await ns.open(cfg.ino, os.O_WRONLY | os.O_TRUNC, ALICE)
        await ns.write(h.fh, 0, b"nope")
        with pytest.raises(FsError):
            await ns.flush(h.fh)
        await ns.release(h.fh)
        h = await ns.open(cfg.ino, os.O_WRONLY | os.O_TRUNC, ALICE)
        with pytest.raises(FsError):
            await ns.flush(h.fh)
        await ns.write(h.fh, 0, b'{"ok": 3}')
        await ns.flush(h.fh)
        await ns.release(h.fh)
        data, err = await rejected(ns, d, "config.json")
        assert data == b"nope"
        used = ns.scratch.used
        # removing the agent drops its entries (and their charge)
        await ns.unlink(d, "config.json", ALICE)
        await ns.rmdir(ROOT, "a1", ALICE)
        assert ns.scratch.used < used and not ns.rejected.entries
    run(tmp_path, body)


def test_rejected_entries_are_capped(tmp_path):
    async def body(ns):
        for i in range(20):
            d = await agent(ns, f"a{i}")
            await scratch(ns, d, "t", b"[" * 5000)
            with pytest.raises(FsError):
                await ns.rename(d, "t", d, "config.json", 0, ALICE)
            await ns.unlink(d, "t", ALICE)
        assert ns.scratch.used <= 64 << 10
        kept = [e for e in ns.rejected.entries.values() if e.data]
        assert 0 < len(kept) < 20                         # the oldest went first
        assert ns.rejected.get("a19", "config.json").data
    run(tmp_path, body, scratch_max=64 << 10)


async def patch(ns, d, name, data: bytes, caller=ALICE):
    pdir = (await ns.lookup(d, "@patch", caller)).ino
    attr = await ns.lookup(pdir, name, caller)
    h = await ns.open(attr.ino, os.O_WRONLY | os.O_TRUNC, caller)
    try:
        await ns.flush(h.fh)              # a shell's first (empty) close does nothing
        await ns.write(h.fh, 0, data)
        await ns.flush(h.fh)
    finally:
        await ns.release(h.fh)


def test_patches_apply_to_the_current_version(tmp_path):
    async def body(ns):
        d = await agent(ns)
        await patch(ns, d, "config.json", b'{"a": 1, "b": {"c": 2}}')        # a merge patch creates
        assert json.loads(await read_file(ns, d, "config.json")) == {"a": 1, "b": {"c": 2}}
        await patch(ns, d, "config.json", b'{"b": {"c": null, "d": [1]}, "e": "x"}')
        assert json.loads(await read_file(ns, d, "config.json")) == {"a": 1, "b": {"d": [1]}, "e": "x"}
        await patch(ns, d, "config.json", b'[{"op": "add", "path": "/b/d/-", "value": 2},'
                                         b' {"op": "remove", "path": "/a"}]')
        assert json.loads(await read_file(ns, d, "config.json")) == {"b": {"d": [1, 2]}, "e": "x"}
        v = await version(ns, d, "config.json")
        await patch(ns, d, "config.json", b'{"e": "x"}')                     # no change, no version
        assert await version(ns, d, "config.json") == v
        with pytest.raises(FsError) as e:
            await patch(ns, d, "config.json", b'[{"op": "test", "path": "/e", "value": "y"}]')
        assert e.value.errno == errno.ESTALE
        with pytest.raises(FsError) as e:
            await patch(ns, d, "config.json", b'[{"op": "remove", "path": "/nope"}]')
        assert e.value.errno == errno.EINVAL
        with pytest.raises(FsError) as e:
            await patch(ns, d, "config.json", b'42')
        assert e.value.errno == errno.EINVAL
        with pytest.raises(FsError) as e:
            await patch(ns, d, "memory.json", b'[{"op": "add", "path": "/x", "value": 1}]')
        assert e.value.errno == errno.ENOENT
        data, err = await rejected(ns, d, "config.json")
        assert data == b'42' and err.startswith("patch refused: a patch is a JSON object")
        assert await version(ns, d, "config.json") == v
        # runtime.json, in RAM
        await patch(ns, d, "runtime.json", b'{"step": 1}')
        await patch(ns, d, "runtime.json", b'[{"op": "replace", "path": "/step", "value": 2}]')
        assert json.loads(await read_file(ns, d, "runtime.json")) == {"step": 2}
        # write-only
        pdir = (await ns.lookup(d, "@patch", ALICE)).ino
        attr = await ns.lookup(pdir, "config.json", ALICE)
        with pytest.raises(FsError) as e:
            await ns.open(attr.ino, os.O_RDONLY, ALICE)
        assert e.value.errno == errno.EACCES
        with pytest.raises(FsError) as e:
            await ns.lookup(pdir, "other.json", ALICE)
        assert e.value.errno == errno.ENOENT
        # the commit says what it was
        subjects = [c.message.splitlines()[0] for _, c in zip(range(8), ns.git.repo.walk(ns.git.head))]
        assert any(s.endswith("json patch") for s in subjects), subjects
    run(tmp_path, body)


def test_patches_queued_together_all_apply(tmp_path):
    """Patches racing a plain write in one group: each applies to the head at its turn."""
    async def body(ns):
        d = await agent(ns)
        await write_file(ns, d, "config.json", b'{"n": []}')
        async with trio.open_nursery() as n:
            for i in range(5):
                n.start_soon(patch, ns, d, "config.json",
                             json.dumps([{"op": "add", "path": "/n/-", "value": i}]).encode())
                n.start_soon(patch, ns, d, "config.json", json.dumps({f"k{i}": i}).encode())
        doc = json.loads(await read_file(ns, d, "config.json"))
        assert sorted(doc["n"]) == list(range(5)) and all(doc[f"k{i}"] == i for i in range(5))
    run(tmp_path, body)


def test_events_stream(tmp_path):
    async def body(ns):
        ev = await ns.lookup(ROOT, "@events", ALICE)
        h = await ns.open(ev.ino, os.O_RDONLY, ALICE)
        got = []

        async def reader():
            while len(got) < 6:
                data = await ns.read(h.fh, 0, 1 << 16)
                got.extend(json.loads(line) for line in data.splitlines())
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()      # the read blocks: nothing yet
            assert got == []
            d = await agent(ns)
            await write_file(ns, d, "config.json", b'{"v": 1}')
            await patch(ns, d, "config.json", b'{"w": 2}')
            await write_file(ns, d, "runtime.json", b'{"r": 1}')
            with pytest.raises(FsError):
                await write_file(ns, d, "config.json", b'{oops')
            await ns.rename(d, "config.json", d, "memory.json", 0, ALICE)
        ops = [(e["op"], e["file"], e["version"]) for e in got]
        assert ops == [("mkdir", None, None), ("write", "config.json", 1), ("write", "config.json", 2),
                       ("write", "runtime.json", 1), ("rejected", "config.json", None),
                       ("rename", "memory.json", 1)]
        assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
        assert got[1]["commit"] and len(got[1]["commit"]) == 40 and got[1]["uid"] == ALICE.uid
        assert got[2]["note"] == "merge patch" and got[5]["from"] == "config.json"
        assert got[4]["reason"].startswith("line 1 column 2") and got[4]["errno"] == "EINVAL"
        # a slow reader: the oldest lines are dropped and reported
        from agentstatefs.fs import events
        for i in range(events.MAX_EVENTS + 10):
            ns.events.emit("write", "x", "config.json")
        data = await ns.read(h.fh, 0, 1 << 30)
        lines = [json.loads(line) for line in data.splitlines()]
        assert lines[0]["op"] == "lost" and lines[0]["count"] >= 10
        assert lines[0]["count"] + len(lines) - 1 == events.MAX_EVENTS + 10
        assert len(data) <= events.MAX_BYTES + 200
        # a short read buffer gets the rest of a line next time
        ns.events.emit("write", "x", "config.json")
        a = await ns.read(h.fh, 0, 10)
        b = await ns.read(h.fh, 0, 1 << 16)
        assert len(a) == 10 and json.loads(a + b)["agent"] == "x"
        await ns.release(h.fh)
        assert not ns.events.subs
        h = await ns.open(ev.ino, os.O_RDONLY | os.O_NONBLOCK, ALICE)
        with pytest.raises(FsError) as e:
            await ns.read(h.fh, 0, 100)
        assert e.value.errno == errno.EAGAIN
        await ns.release(h.fh)
    run(tmp_path, body)
