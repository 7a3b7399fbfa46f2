"""Issue 11 in-process: compare-and-swap, refused writes made visible, patches, events."""

from __future__ import annotations

import errno
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
