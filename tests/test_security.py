"""Security on a real mount (issue 10, SPEC 3 and 6): a private repository whatever
the umask; ownership, modes and ACLs checked by the daemon for other users (really
another uid, via setpriv); history never more permissive than the present; the audit
log of writes and denials."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import sh
from mounting import CLI, Mount

from agentstatefs.daemon.cli import build_parser, main as cli_main

# A child that became another user may not reach the interpreter's library (e.g. under
# /root): everything the CLI imports lazily is imported here, before any fork.
build_parser()
import queue  # noqa: E402,F401

NOBODY = 65534


def private_violations(repo: Path) -> list[str]:
    """Entries of ``repo`` (itself included) that group or others may use."""
    bad = []
    for root, dirs, files in os.walk(repo):
        for p in [root] + [os.path.join(root, n) for n in files]:
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                bad.append(f"{p} {oct(stat.S_IMODE(st.st_mode))}")
    return bad


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def pub(tmp_path):
    """Mount factory in a directory other users can traverse (pytest's tmp is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="asfs-sec-"))
    os.chmod(base, 0o755)
    made = []

    def make(name="m", repo=None):
        m = Mount(base, name, repo)
        os.chmod(m.mp, 0o755)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()
    shutil.rmtree(base, ignore_errors=True)


def as_user(cmd: str, uid: int = NOBODY, gid: int = NOBODY, groups: str | None = None,
            umask: str = "022") -> subprocess.CompletedProcess:
    """Run a shell command as another user (a real uid: the kernel and the daemon see it)."""
    g = ["--groups", groups] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", *g, "--",
                           "bash", "-c", f"umask {umask}; {cmd}"],
                          capture_output=True, text=True, timeout=60)


def in_child_as(uid: int, gid: int, fn) -> tuple[int, str, str]:
    """Run ``fn()`` in a forked child that became ``uid``/``gid`` (no supplementary
    groups); returns (its return value or 99 on an exception, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                code = int(fn() or 0)
            except BaseException as exc:
                print(repr(exc), file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


# -- private on disk ------------------------------------------------------------------------

def test_repository_private_under_umask_022(mounts, umask022):
    m = mounts().start()
    os.mkdir(m / "a1")
    (m / "a1" / "config.json").write_text('{"secret": 1}')
    (m / "a1" / "memory.json").write_text('{"m": 1}')
    m.git_settled()
    assert m.stop() == 0
    assert (m.repo / "objects").is_dir() and (m.repo / "agentstatefs").is_dir()
    assert private_violations(m.repo) == []
    # CLI verbs that write the repository keep it private too.
    r = subprocess.run(CLI + ["gc", "--repo", str(m.repo)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(CLI + ["restore", "--repo", str(m.repo), "a1", "config.json", "HEAD"],
                       capture_output=True, text=True)
    assert private_violations(m.repo) == []


def test_existing_repository_tightened_at_mount(mounts, umask022):
    m = mounts().start()
    os.mkdir(m / "a1")
    (m / "a1" / "config.json").write_text('{"secret": 1}')
    m.git_settled()
    assert m.stop() == 0
    sh(f"chmod -R go+rwX {m.repo}")
    assert private_violations(m.repo) != []
    m.start()
    assert private_violations(m.repo) == []
    assert json.loads((m / "a1" / "config.json").read_text()) == {"secret": 1}


def test_background_daemon_log_private(tmp_path, umask022):
    repo, mp = tmp_path / "r", tmp_path / "mp"
    r = subprocess.run(CLI + ["mount", "--repo", str(repo), str(mp)], capture_output=True, text=True)
    try:
        assert r.returncode == 0, r.stderr
        log = repo / "agentstatefs" / "daemon.log"
        assert log.exists() and stat.S_IMODE(log.stat().st_mode) == 0o600
    finally:
        subprocess.run(CLI + ["umount", str(mp)], capture_output=True)
        subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
    assert private_violations(repo) == []


def test_other_user_cannot_read_repository_and_cli_says_why(pub):
    m = pub().start("allow_other")
    os.mkdir(m / "a1")
    (m / "a1" / "config.json").write_text('{"secret": 1}')
    m.git_settled()
    r = as_user(f"git -C {m.repo} show main:{m.tree_path('a1', 'config.json')}")
    assert r.returncode != 0 and "secret" not in r.stdout
    # The CLI as that user (the interpreter may live where nobody can reach it, e.g. under
    # /root: run the CLI's code in a forked child that became the other user).
    rc, out, err = in_child_as(NOBODY, NOBODY, lambda: cli_main(["show", "--repo", str(m.repo), "HEAD",
                                                                  "a1/config.json"]))
    assert rc == 1 and "secret" not in out, err
    assert "private to the daemon's user" in err and "@history" in err
