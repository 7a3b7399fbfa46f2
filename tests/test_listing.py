"""Listings through the real mount: ``ls`` of many agents, at the head and at a past
commit, leaves no inode in the daemon (readdirplus entries without a node, decision 44)
and shows the numbers and types that ``stat`` gives."""

from __future__ import annotations

import json
import os
import stat
import subprocess


def inodes(mp) -> int:
    return json.loads((mp / "@stats").read_bytes())["metrics"]["inodes"]


def test_ls_of_agents_and_of_a_past_commit_keeps_no_inodes(mounts):
    m = mounts().start()
    names = [f"agent-{i:03d}" for i in range(150)]
    for n in names:
        os.mkdir(m.mp / n)
    (m.mp / "agent-000" / "config.json").write_text('{"v": 1}')
    m.stop()
    m.start()           # a fresh daemon: the kernel holds none of the agents
    mp = m.mp
    before = inodes(mp)
    out = subprocess.run(["ls", mp], capture_output=True, text=True, check=True).stdout.split()
    assert out == names
    assert inodes(mp) <= before + 1
    entries = {e.name: e for e in os.scandir(mp / "@history" / "HEAD~1")}
    assert sorted(entries) == names
    assert inodes(mp) <= before + 4   # @history and HEAD~1 themselves (and @stats)
    # Listed numbers and types are the ones stat gives; stat then registers the names.
    for n in names[:5]:
        st = os.stat(mp / n)
        assert stat.S_ISDIR(st.st_mode)
        e = next(x for x in os.scandir(mp) if x.name == n)
        assert e.inode() == st.st_ino and e.is_dir(follow_symlinks=False)
        past = os.stat(mp / "@history" / "HEAD~1" / n)
        assert entries[n].inode() == past.st_ino and entries[n].is_dir(follow_symlinks=False)
    # ls -l stats every entry: each answers (LOOKUP per name), then the kernel holds them.
    long = subprocess.run(["ls", "-l", mp], capture_output=True, text=True, check=True).stdout
    assert sum(1 for line in long.splitlines() if line.startswith("d")) == len(names)
    assert inodes(mp) >= before + len(names)
    assert json.loads((mp / "agent-000" / "config.json").read_text()) == {"v": 1}
