"""Restore per SPEC section 4, on a real mount: per-agent revisions (``HEAD~1`` is the
agent's previous version in the CLI and in ``M/<id>/@history``), the time forms, clear
errors, a restore that changes nothing exits non-zero, and only real restores (the
``restore`` verb, a copy out of ``@history``) are labelled restores."""

import errno
import json
import os
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import sh
from mounting import CLI


def cli(*args):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=120)


def subjects(m, n):
    return m.git("log", f"-{n}", "--format=%s").splitlines()


@pytest.fixture
def two_agents(mounts):
    """a1's config v1, v2, v3 (one second apart), then a2 commits after a1."""
    m = mounts().start()
    os.mkdir(m / "a1")
    for v in (1, 2, 3):
        (m / "a1/config.json").write_text(json.dumps({"v": v}))
        time.sleep(1.05)      # distinct commit seconds, so every time form picks one version
    os.mkdir(m / "a2")
    (m / "a2/config.json").write_text('{"other": 1}')
    return m


def cfg(m, agent="a1"):
    return json.loads((m / f"{agent}/config.json").read_text())


def test_head_n_counts_the_agents_commits_everywhere(two_agents):
    m = two_agents
    repo = str(m.repo)
    assert json.loads((m / "a1/@history/HEAD~1/config.json").read_text()) == {"v": 2}
    assert json.loads(cli("show", "HEAD~1", "a1/config.json", "--repo", repo).stdout) == {"v": 2}
    before = m.commit_count()
    # exactly as docs/restore.md prints it (other agents have committed since)
    r = cli("restore", "a1", "config.json", "HEAD~1", "--repo", repo)
    assert r.returncode == 0, r.stderr
    assert "restored a1/config.json from" in r.stdout
    assert cfg(m) == {"v": 2}
    assert m.commit_count() == before + 1                    # one commit, through the daemon
    assert subjects(m, 1)[0].startswith("restore a1/config.json from ")
    author = m.git("log", "-1", "--format=%an")
    assert "agentstatefs" in author or "python" in author    # the CLI process, seen by the mount
    # a1's previous version is now v3 (the restore is a version too)
    assert json.loads((m / "a1/@history/HEAD~1/config.json").read_text()) == {"v": 3}
    # log ID lists the agent's commits only, newest first
    log = cli("log", "a1", "--repo", repo).stdout.splitlines()
    assert len(log) == 5 and "restore a1/config.json" in log[0] and "mkdir a1" in log[-1]


def test_time_forms_in_cli_and_both_history_paths(two_agents):
    m = two_agents
    repo = str(m.repo)
    t_v2 = int(m.git("log", "-1", "--format=%ct", "main~3").strip())   # a1's v2 (then v3, mkdir a2, a2)
    assert json.loads(m.git("show", f"main~3:{m.tree_path('a1', 'config.json')}")) == {"v": 2}
    utc = datetime.fromtimestamp(t_v2, timezone.utc)
    plus2 = utc.astimezone(timezone(timedelta(hours=2)))
    forms = [utc.strftime("%Y-%m-%dT%H:%M:%SZ"), utc.strftime("%Y-%m-%dT%H:%M:%S"),
             plus2.strftime("%Y-%m-%dT%H:%M:%S+02:00")]
    for spec in forms:
        assert json.loads((m / f"@history/{spec}/a1/config.json").read_text()) == {"v": 2}, spec
        assert json.loads((m / f"a1/@history/{spec}/config.json").read_text()) == {"v": 2}, spec
        assert json.loads(cli("show", spec, "a1/config.json", "--repo", repo).stdout) == {"v": 2}, spec
    # a date alone: the end of that day (UTC)
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert json.loads((m / f"a1/@history/{today}/config.json").read_text()) == {"v": 3}
    assert json.loads((m / f"@history/{today}/a2/config.json").read_text()) == {"other": 1}
    r = cli("restore", "a1", "config.json", forms[2], "--repo", repo)
    assert r.returncode == 0, r.stderr
    assert cfg(m) == {"v": 2}


def test_bad_revisions_are_clear(two_agents):
    m = two_agents
    repo = str(m.repo)
    for spec, words in (("HEAD~9", "agent a1 has only 4 commit(s)"),
                        ("2000-01-01", "no commit changing agent a1 at or before 2000-01-01T23:59:59Z"),
                        ("yesterday", "is not a revision"),
                        ("2026-13-45T99:00:00Z", "is not a revision"),
                        ("ffff0000", "no such commit")):
        r = cli("restore", "a1", "config.json", spec, "--repo", repo)
        assert r.returncode == 1 and words in r.stderr, (spec, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
        r = cli("show", spec, "a1/config.json", "--repo", repo)
        assert r.returncode == 1 and words in r.stderr, (spec, r.stderr)
        for path in (f"a1/@history/{spec}", f"@history/{spec}"):
            with pytest.raises(OSError) as e:
                os.listdir(m / path)
            assert e.value.errno == errno.ENOENT
    # a version where the file did not exist yet (a1's first commit is its mkdir)
    r = cli("restore", "a1", "config.json", "HEAD~3", "--repo", repo)
    assert r.returncode == 1 and "a1/config.json does not exist at" in r.stderr
    assert cfg(m) == {"v": 3}


def test_restore_that_changes_nothing_exits_nonzero(two_agents):
    m = two_agents
    repo = str(m.repo)
    before = m.commit_count()
    r = cli("restore", "a1", "config.json", "HEAD", "--repo", repo)
    assert r.returncode == 1 and "nothing to restore" in r.stderr and "already has" in r.stderr
    assert m.commit_count() == before
    m.stop()
    r = cli("restore", "a1", "config.json", "HEAD", "--repo", repo)      # unmounted: the store says so
    assert r.returncode == 1 and "nothing to restore" in r.stderr
    r = cli("restore", "a1", "config.json", "HEAD~1", "--repo", repo)    # and a1's HEAD~1 is v2 there too
    assert r.returncode == 0, r.stderr
    m.start()
    assert cfg(m) == {"v": 2}
    assert subjects(m, 1)[0].startswith("restore a1/config.json from")


def test_only_real_restores_are_labelled_restore(two_agents):
    m = two_agents
    # a plain write of content equal to an old version is a write
    (m / "a1/config.json").write_text(json.dumps({"v": 1}))
    assert subjects(m, 1)[0].startswith("write a1/config.json")
    # so is an editor-style temp + rename of old content
    (m / "a1/t.tmp").write_text(json.dumps({"v": 2}))
    os.rename(m / "a1/t.tmp", m / "a1/config.json")
    assert subjects(m, 1)[0].startswith("write a1/config.json")
    # a copy out of @history is a restore, naming the commit that made that version
    v3_commit = os.getxattr(m / "a1/@history/HEAD~2/config.json", "user.agentstatefs.commit").decode()
    sh("cp @history/HEAD~2/config.json .", cwd=m / "a1")     # a1: ... v3, v1, v2 -> HEAD~2 = v3
    assert cfg(m) == {"v": 3}
    subject = subjects(m, 1)[0]
    assert subject.startswith(f"restore a1/config.json from {v3_commit[:7]}"), subject
    # a deleted agent comes back with cp -r from history: its file is a restore
    sh("rm -r a2", cwd=m.mp)
    assert not os.path.exists(m / "a2")
    # rm -r made two commits (delete, rmdir). HEAD~N moves with every commit, and cp -r
    # commits (mkdir) before it reads the directory: name the commit by its id.
    before_rm = m.git("rev-parse", "main~2").strip()
    sh(f"cp -r @history/{before_rm}/a2 .", cwd=m.mp)
    assert cfg(m, "a2") == {"other": 1}
    last = subjects(m, 2)
    assert last[0].startswith("restore a2/config.json from ") and last[1].startswith("mkdir a2"), last
