"""`agentstatefs fsck` also runs `git fsck --full --strict`: object syntax is checked.

The repositories are made with git directly (no mount), in the layout the store uses:
main -> root tree -> <l1>/<l2>/<agent>/{meta.json, config.json}.
"""

import json
import os
import pwd
import subprocess
import sys

import pytest

from agentstatefs.fs import fsck

CLI = [sys.executable, "-m", "agentstatefs.daemon.cli"]
ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@x", "GIT_AUTHOR_DATE": "1700000000 +0000",
       "GIT_COMMITTER_DATE": "1700000000 +0000"}


def git(repo, *args, stdin: bytes | str = b"") -> str:
    if isinstance(stdin, str):
        stdin = stdin.encode()
    r = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, env=ENV)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode().strip()


def tree(repo, entries: dict) -> str:
    """entries: name -> blob bytes or a nested dict."""
    lines = []
    for name, value in entries.items():
        if isinstance(value, dict):
            lines.append(f"040000 tree {tree(repo, value)}\t{name}")
        else:
            lines.append(f"100644 blob {git(repo, 'hash-object', '-w', '--stdin', stdin=value)}\t{name}")
    return git(repo, "mktree", stdin="\n".join(lines) + "\n")


@pytest.fixture
def repo(tmp_path):
    """A bare repository with one well-formed commit on main holding agent a1."""
    r = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(r)], check=True)
    config = b'{"v": 1}\n'
    meta = json.dumps({"files": {"config.json": {"size": len(config)}}}).encode()
    root = tree(r, {"a": {"a1": {"a1": {"meta.json": meta, "config.json": config}}}})
    good = git(r, "commit-tree", root, "-m", "a1: create")
    git(r, "update-ref", "refs/heads/main", good)
    return r


def malformed_commit(repo, parent: str) -> str:
    root = git(repo, "rev-parse", f"{parent}^{{tree}}")
    raw = (f"tree {root}\nparent {parent}\n"
           "author Evil\nName <e@x> 1700000000 +0000\n"   # a name broken by a newline
           "committer t <t@x> 1700000000 +0000\n\nbad author\n")
    return git(repo, "hash-object", "-t", "commit", "--literally", "-w", "--stdin", stdin=raw)


def run_fsck(repo) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["fsck", "--repo", str(repo)], capture_output=True, text=True, timeout=120)


def test_clean_repository_is_ok(repo):
    r = run_fsck(repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok: 1 commits") and "1 agents" in r.stdout and "PROBLEM" not in r.stdout


def test_malformed_author_on_main_is_reported(repo):
    good = git(repo, "rev-parse", "main")
    bad = malformed_commit(repo, good)
    git(repo, "update-ref", "refs/heads/main", bad)
    r = run_fsck(repo)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    problems = [line for line in r.stdout.splitlines() if line.startswith("PROBLEM: git fsck:")]
    assert any(bad in p and "author" in p for p in problems), r.stdout
    assert r.stdout.splitlines()[-1].startswith("FAILED: 2 commits")  # the walk went past it


def test_malformed_commit_on_another_branch_is_reported(repo):
    bad = malformed_commit(repo, git(repo, "rev-parse", "main"))
    git(repo, "update-ref", "refs/heads/evil", bad)
    report = fsck.check(str(repo))
    assert not report.ok
    assert any(p.startswith("git fsck:") and bad in p for p in report.problems), report.problems
    assert report.commits == 1  # main itself is fine


def test_git_missing_is_a_problem(repo, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    report = fsck.check(str(repo))
    assert any("git fsck could not run" in p for p in report.problems), report.problems


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the repository to another user")
def test_repository_of_another_user(repo):
    nobody = pwd.getpwnam("nobody")
    subprocess.run(["chown", "-R", f"{nobody.pw_uid}:{nobody.pw_gid}", str(repo)], check=True)
    r = run_fsck(repo)
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stdout + r.stderr
    git(repo, "-c", f"safe.directory={repo}", "update-ref", "refs/heads/main",
        malformed_commit_as_root(repo))
    r = run_fsck(repo)
    assert r.returncode == 1 and "PROBLEM: git fsck:" in r.stdout, r.stdout + r.stderr


def malformed_commit_as_root(repo) -> str:
    env_repo = ["-c", f"safe.directory={repo}"]
    parent = git(repo, *env_repo, "rev-parse", "main")
    root = git(repo, *env_repo, "rev-parse", f"{parent}^{{tree}}")
    raw = f"tree {root}\nparent {parent}\nauthor A\nB <a@x> 1 +0000\ncommitter t <t@x> 1 +0000\n\nx\n"
    return git(repo, *env_repo, "hash-object", "-t", "commit", "--literally", "-w", "--stdin", stdin=raw)
