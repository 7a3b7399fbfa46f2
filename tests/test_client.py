"""agentstatefs.client through a real mount: the helper agents use (issue 11)."""

from __future__ import annotations

import errno
import math
import os
import threading

import pytest

from agentstatefs import client
from agentstatefs.client import Client, Conflict, Refused


def test_read_write_cas_update_patch(mnt):
    c = Client(str(mnt.mp))
    os.mkdir(mnt / "a1")
    assert c.read("a1", "config.json") == (None, 0)
    c.cas_write("a1", "config.json", {"n": 0}, 0)
    assert c.read("a1", "config.json") == ({"n": 0}, 1)
    with pytest.raises(Conflict) as e:
        c.cas_write("a1", "config.json", {"n": 9}, 0)
    assert e.value.errno == errno.ESTALE
    c.write("a1", "config.json", {"n": 1})
    assert c.read("a1", "config.json") == ({"n": 1}, 2)
    with pytest.raises(Refused) as e:
        c.write("a1", "config.json", {"x": math.nan})      # refused before anything is written
    c.write_bytes("a1", "memory.json", b'{"a": 1}')
    with pytest.raises(Refused) as e:
        c.write_bytes("a1", "memory.json", b"{oops")
    assert e.value.errno == errno.EINVAL and e.value.reason.startswith("line 1 column 2:")
    assert c.last_error("a1", "memory.json").startswith("line 1 column 2:")
    c.patch("a1", "config.json", {"m": True})
    c.patch("a1", "config.json", [{"op": "add", "path": "/l", "value": [1]}])
    assert c.read("a1", "config.json")[0] == {"n": 1, "m": True, "l": [1]}
    with pytest.raises(Conflict):
        c.patch("a1", "config.json", [{"op": "test", "path": "/n", "value": 5}])
    with pytest.raises(Refused) as e:
        c.patch("a1", "config.json", [{"op": "remove", "path": "/zz"}])
    assert "does not apply" in e.value.reason

    # concurrent updates from threads lose nothing
    def bump():
        for _ in range(25):
            c.update("a1", "config.json", lambda d: {**d, "n": d["n"] + 1})
    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.read("a1", "config.json")[0]["n"] == 101
    assert sorted(n for n in os.listdir(mnt / "a1")) == ["config.json", "memory.json"]   # no temp left


def test_watch(mnt):
    os.mkdir(mnt / "w1")
    os.mkdir(mnt / "w2")
    events = client.watch("w1", mountpoint=str(mnt.mp))
    got = []

    def consume():
        for ev in events:
            got.append(ev)
            if len(got) == 3:
                return
    t = threading.Thread(target=consume)
    t.start()
    import time
    target, deadline = str(mnt.mp / "@events"), time.monotonic() + 10
    while time.monotonic() < deadline:                 # until the generator has subscribed
        if any(os.readlink(f"/proc/self/fd/{fd}") == target for fd in os.listdir("/proc/self/fd")
               if os.path.islink(f"/proc/self/fd/{fd}")):
            break
        time.sleep(0.02)
    client.write("w2", "config.json", {"other": 1}, mountpoint=str(mnt.mp))   # filtered out
    for i in range(3):
        client.write("w1", "config.json", {"i": i}, mountpoint=str(mnt.mp))
    t.join(timeout=20)
    assert [(e["agent"], e["file"], e["version"]) for e in got] == [("w1", "config.json", v) for v in (1, 2, 3)]
