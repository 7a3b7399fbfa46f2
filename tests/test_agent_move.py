"""mv M/a M/b: one atomic commit moving the agent's subtree, history that follows it,
and the agent's RAM parts (scratch, runtime.json) moved along (issue 12)."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mounting import CLI  # noqa: E402


def log(m, *args) -> list[str]:
    m.git_settled()
    r = subprocess.run(CLI + ["log", "--repo", str(m.repo), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [line.split("  ")[-1].strip() for line in r.stdout.splitlines()]


def test_mv_agent_is_one_commit_and_history_follows(mounts):
    m = mounts().start()
    os.mkdir(m / "a")
    (m / "a/config.json").write_text('{"n": 1}')
    (m / "a/config.json").write_text('{"n": 2}')
    (m / "a/memory.json").write_text("[]")
    (m / "a/runtime.json").write_text('{"rt": 1}')
    (m / "a/notes.tmp").write_text("scratch")
    old_head = m.git("rev-parse", "main").strip()
    ino = os.stat(m / "a/config.json").st_ino
    fd = os.open(m / "a/memory.json", os.O_WRONLY | os.O_TRUNC)
    n = m.commit_count()
    r = subprocess.run(["mv", str(m / "a"), str(m / "b")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert m.commit_count() == n + 1
    assert m.git("log", "-1", "--format=%s").strip() == "move a/ -> b/"
    assert sorted(os.listdir(m.mp)) == ["b"]
    # The store moved the subtree in one commit: same blobs, under b's place.
    assert m.git("rev-parse", f"main:{m.tree_path('b', 'config.json')}") == \
        m.git("rev-parse", f"{old_head}:{m.tree_path('a', 'config.json')}")
    assert m.git("ls-tree", "main", m.tree_path("a"), check=False).strip() == ""
    assert json.loads(m.git("show", f"main:{m.tree_path('b', 'meta.json')}"))["id"] == "b"
    # Everything came along: files (same inode numbers), runtime.json, scratch.
    assert (m / "b/config.json").read_text() == '{"n": 2}'
    assert os.stat(m / "b/config.json").st_ino == ino
    assert (m / "b/runtime.json").read_text() == '{"rt": 1}'
    assert (m / "b/notes.tmp").read_text() == "scratch"
    # A descriptor opened before the move writes to the file where it is now.
    os.write(fd, b'["late"]')
    os.close(fd)
    assert (m / "b/memory.json").read_text() == '["late"]'
    assert m.git("log", "-1", "--format=%s").startswith("write b/memory.json")
    # History follows: log b shows a's commits; b's @history reads them.
    subjects = log(m, "b")
    assert subjects[:2] == ["write b/memory.json (8 bytes)", "move a/ -> b/"]
    assert "mkdir a/" in subjects and subjects.count("write a/config.json (8 bytes)") == 2
    first = m.git("log", "--format=%H", "--reverse").split()[1]      # a's first write
    assert (m / f"b/@history/{first}/config.json").read_text() == '{"n": 1}'
    assert first in os.listdir(m / "b/@history")
    # The old id is free again: a new, empty agent with its own history.
    os.mkdir(m / "a")
    assert log(m, "a") == ["mkdir a/"]
    # It all survives a restart (the index from its file) and a rebuilt index (from git).
    m.stop()
    m.start()
    assert log(m, "b")[:2] == subjects[:2]
    assert (m / f"b/@history/{first}/config.json").read_text() == '{"n": 1}'
    m.stop()
    (m.repo / "agentstatefs/history-index").unlink()
    m.start()
    assert log(m, "b") == subjects
    assert subprocess.run(["git", "-C", str(m.repo), "fsck", "--strict"], capture_output=True).returncode == 0


def test_mv_agent_refusals(mounts):
    m = mounts().start()
    for a in ("a", "b"):
        os.mkdir(m / a)
        (m / f"{a}/config.json").write_text("{}")
    n = m.commit_count()
    with pytest.raises(OSError) as e:
        os.rename(m / "a", m / "b")
    assert e.value.errno == errno.ENOTEMPTY
    for bad in ("@x", ".hidden", "a/b"):
        with pytest.raises(OSError):
            os.rename(m / "a", m / bad)
    assert m.commit_count() == n
    assert sorted(os.listdir(m.mp)) == ["a", "b"]
