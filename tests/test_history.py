"""@history browsing and restore through a real mount, and the history CLI verbs."""

import errno
import json
import os
import subprocess
import time

import pytest

from conftest import sh
from mounting import CLI


def read(p):
    with open(p, "rb") as f:
        return f.read()


def cli(*args, check=True):
    r = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"agentstatefs {' '.join(args)} failed: {r.stderr}")
    return r


@pytest.fixture
def hist(mounts):
    """A mount with a small known history: a1 config v1..v3, a2 memory."""
    m = mounts().start()
    sh("mkdir a1 a2", cwd=m.mp)
    for v in (1, 2, 3):
        (m / "a1/config.json").write_text(json.dumps({"v": v}))
    (m / "a2/memory.json").write_text('{"m": 1}')
    return m


def test_browse_by_id_prefix_head_and_time(hist):
    m = hist
    commits = m.git("rev-list", "main").split()
    assert os.listdir(m / "@history") == commits  # newest first, full ids
    assert json.loads(read(m / f"@history/{commits[1]}/a1/config.json")) == {"v": 3}
    assert json.loads(read(m / f"@history/{commits[2][:6]}/a1/config.json")) == {"v": 2}
    assert json.loads(read(m / "@history/HEAD~3/a1/config.json")) == {"v": 1}
    assert sorted(os.listdir(m / "@history/HEAD")) == ["a1", "a2"]
    assert os.listdir(m / "@history/HEAD~1") == ["a1", "a2"] and os.listdir(m / "@history/HEAD~1/a2") == []
    assert not (m / "@history/HEAD~1/a2/memory.json").exists()
    # time: the state as of an instant
    ts = int(m.git("log", "-1", "--format=%ct").strip())
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    assert json.loads(read(m / f"@history/{at}/a2/memory.json")) == {"m": 1}
    with pytest.raises(FileNotFoundError):
        os.listdir(m / "@history/2000-01-01T00:00:00Z")
    with pytest.raises(FileNotFoundError):
        os.listdir(m / "@history/HEAD~99")
    with pytest.raises(FileNotFoundError):
        os.listdir(m / "@history/not-a-rev")
    # stable inode numbers, read-only attributes from the version
    st1 = os.stat(m / f"@history/{commits[0]}/a1/config.json")
    st2 = os.stat(m / f"@history/{commits[0]}/a1/config.json")
    assert st1.st_ino == st2.st_ino and st1.st_size == len(b'{"v": 3}')


def test_history_hidden_by_default_and_visible_by_option(mounts):
    m = mounts().start()
    os.mkdir(m / "a1")
    assert os.listdir(m.mp) == ["a1"] and os.listdir(m / "a1") == []
    assert os.path.isdir(m / "@history") and os.path.isdir(m / "a1/@history")
    assert "@history" not in sh("find .", cwd=m.mp).stdout
    m.stop()
    m.start("history=visible")
    assert sorted(os.listdir(m.mp)) == ["@history", "a1"] and os.listdir(m / "a1") == ["@history"]


def test_history_is_read_only(hist):
    m = hist
    targets = [
        lambda: open(m / "@history/HEAD/a1/config.json", "w"),
        lambda: open(m / "@history/HEAD/a1/new.json", "w"),
        lambda: os.mkdir(m / "@history/HEAD/a9"),
        lambda: os.unlink(m / "@history/HEAD/a1/config.json"),
        lambda: os.rmdir(m / "@history/HEAD/a2"),
        lambda: os.rename(m / "@history/HEAD/a1/config.json", m / "@history/HEAD/a1/x.json"),
        lambda: os.truncate(m / "@history/HEAD/a1/config.json", 0),
        lambda: os.chmod(m / "@history/HEAD/a1/config.json", 0o600),
        lambda: os.setxattr(m / "@history/HEAD/a1/config.json", "user.x", b"1"),
        lambda: open(m / "a1/@history/foo", "w"),
        lambda: os.rmdir(m / "@history"),
    ]
    for i, action in enumerate(targets):
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno == errno.EROFS, i
    r = sh("echo '{}' > @history/HEAD/a1/config.json", cwd=m.mp, check=False)
    assert r.returncode != 0 and "Read-only file system" in r.stderr


def test_restore_file_by_cp(hist):
    m = hist
    n = m.commit_count()
    sh("cp @history/HEAD~3/a1/config.json a1/", cwd=m.mp)
    assert json.loads(read(m / "a1/config.json")) == {"v": 1}
    assert m.commit_count() == n + 1
    v1 = m.git("rev-parse", "--short=7", "main~4").strip()
    assert m.git("log", "-1", "--format=%s").strip() == f"restore a1/config.json from {v1} (8 bytes)"
    # history is never rewritten: the old versions are all still there
    assert m.commit_count() == n + 1 and json.loads(read(m / "@history/HEAD~1/a1/config.json")) == {"v": 3}


def test_restore_deleted_agent_by_cp_r(hist):
    m = hist
    sh("echo '{\"c\": 1}' > a2/config.json && chmod 640 a2/config.json", cwd=m.mp)
    before = m.git("rev-parse", "main").strip()
    sh("rm -r a2", cwd=m.mp)
    assert os.listdir(m.mp) == ["a1"]
    sh(f"cp -r @history/{before}/a2 .", cwd=m.mp)
    assert sorted(os.listdir(m / "a2")) == ["config.json", "memory.json"]
    assert json.loads(read(m / "a2/memory.json")) == {"m": 1}
    assert os.stat(m / "a2/config.json").st_mode & 0o777 == 0o640
    subjects = m.git("log", "--format=%s", "-6").splitlines()
    assert any(s.startswith("restore a2/memory.json from") for s in subjects)
    assert any(s.startswith("mkdir a2/") for s in subjects)


def test_per_agent_history_lists_only_its_commits(hist):
    m = hist
    a1 = os.listdir(m / "a1/@history")
    a2 = os.listdir(m / "a2/@history")
    assert len(a1) == 4 and len(a2) == 2    # mkdir + 3 writes; mkdir + 1 write
    assert a1 == [c for c in m.git("rev-list", "main").split() if c in a1]  # newest first
    assert not set(a1) & set(a2)
    assert sorted(os.listdir(m / f"a1/@history/{a1[0]}")) == ["config.json"]
    assert json.loads(read(m / "a1/@history/HEAD~1/config.json")) == {"v": 2}
    assert json.loads(read(m / f"a1/@history/{a1[2][:5]}/config.json")) == {"v": 1}
    with pytest.raises(FileNotFoundError):  # a commit that did not change a1
        os.listdir(m / f"a1/@history/{a2[0]}")


def test_ambiguous_prefix_is_a_clear_error(mounts, tmp_path):
    from agentstatefs.fs.changes import Change, Who, MKDIR, WRITE
    from agentstatefs.fs.store import Store
    repo = tmp_path / "big"
    store = Store(str(repo))
    who = Who(0, 0, 1, "test")
    store.commit_batch([Change(MKDIR, "a1", who, 1)])
    store.commit_batch([Change(WRITE, "a1", who, 2 + i, files={"memory.json": json.dumps([i]).encode()})
                        for i in range(1500)])
    store.close()
    m = mounts(repo=repo).start()
    ids = m.git("rev-list", "main").split()
    seen, prefix = {}, None
    for c in ids:
        if c[:4] in seen:
            prefix = c[:4]
            break
        seen[c[:4]] = c
    assert prefix, "1500 commits always share a 4-hex prefix somewhere"
    with pytest.raises(OSError) as e:
        os.listdir(m / f"@history/{prefix}")
    assert e.value.errno == errno.EINVAL
    assert "ambiguous commit prefix" in m.log()
    assert len(os.listdir(m / f"@history/{ids[0]}/a1")) == 1


def test_xattrs(hist):
    m = hist
    out = sh("getfattr -d a1/config.json", cwd=m.mp).stdout
    head = m.git("rev-parse", "main~1").strip()  # a2's write came last
    assert 'user.agentstatefs.version="3"' in out
    assert f'user.agentstatefs.commit="{head}"' in out
    assert "user.agentstatefs.time=" in out and "user.agentstatefs.author=" in out
    old = sh("getfattr -d @history/HEAD~3/a1/config.json", cwd=m.mp).stdout
    assert 'user.agentstatefs.version="1"' in old
    assert m.git("rev-parse", "main~3").strip() in old


def test_runtime_versions_in_agent_history(mounts):
    m = mounts().start("runtime_versions=3")
    os.mkdir(m / "a1")
    for i in range(5):
        (m / "a1/runtime.json").write_text(json.dumps({"step": i}))
    assert os.listdir(m / "a1/@history/runtime") == ["5.json", "4.json", "3.json"]
    assert json.loads(read(m / "a1/@history/runtime/3.json")) == {"step": 2}
    with pytest.raises(FileNotFoundError):
        read(m / "a1/@history/runtime/1.json")


def test_history_survives_restart_with_stable_inodes(hist):
    m = hist
    listing = os.listdir(m / "@history")
    ino = os.stat(m / f"@history/{listing[1]}/a1/config.json").st_ino
    m.stop()
    m.start()
    assert os.listdir(m / "@history") == listing
    assert os.stat(m / f"@history/{listing[1]}/a1/config.json").st_ino == ino


def test_cli_log_show_diff_restore_mounted(hist):
    m = hist
    repo = str(m.repo)
    log = cli("log", "--repo", repo).stdout.splitlines()
    assert len(log) == 6 and "write a2/memory.json" in log[0]
    assert len(cli("log", "a1", "--repo", repo).stdout.splitlines()) == 4
    assert len(cli("log", "a1", "config.json", "--repo", repo).stdout.splitlines()) == 3
    # with an agent, HEAD~N counts that agent's commits (mkdir a1, v1, v2, v3)
    assert json.loads(cli("show", "HEAD~2", "a1/config.json", "--repo", repo).stdout) == {"v": 1}
    env = json.loads(cli("show", "HEAD", "a1/config.json", "--envelope", "--repo", repo).stdout)
    assert env["agent_id"] == "a1" and env["state_type"] == "config" and env["version"] == 3
    assert env["data"] == {"v": 3} and env["timestamp"].endswith("Z")
    diff = cli("diff", "HEAD~3", "HEAD", "--repo", repo).stdout
    assert '-{"v": 1}' in diff and '+{"v": 3}' in diff and "+++ b/a2/memory.json" in diff
    assert "a2" not in cli("diff", "HEAD~3", "HEAD", "a1", "--repo", repo).stdout
    r = cli("restore", "a1", "config.json", "HEAD~2", "--repo", repo)
    assert "through" in r.stdout
    assert json.loads(read(m / "a1/config.json")) == {"v": 1}
    assert m.git("log", "-1", "--format=%s").startswith("restore a1/config.json from")
    bad = cli("show", "zzzz", "a1/config.json", "--repo", repo, check=False)
    assert bad.returncode == 1 and "not a revision" in bad.stderr


def test_cli_on_unmounted_repo(hist):
    m = hist
    m.stop()
    repo = str(m.repo)
    assert len(cli("log", "--repo", repo).stdout.splitlines()) == 6
    cli("restore", "a1", "config.json", "HEAD~1", "--repo", repo)    # a1's previous version
    assert json.loads(cli("show", "HEAD", "a1/config.json", "--repo", repo).stdout) == {"v": 2}
    m.start()
    assert json.loads(read(m / "a1/config.json")) == {"v": 2}
    assert m.git("log", "-1", "--format=%s").startswith("restore a1/config.json from")
    assert subprocess.run(["git", "-C", repo, "fsck", "--full"], capture_output=True).returncode == 0
