"""Replication (``-o replicate=URL``) to real git servers started here, and read-only
replicas (``mount --replica URL``) that follow them."""

import errno
import json
import os
import socket
import subprocess
import time

import pytest

from mounting import CLI

WAIT = 60.0      # bounded waits for convergence (never an assertion on speed)


def read(p):
    with open(p) as f:
        return f.read()


def wait_for(pred, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def remote_head(url):
    r = subprocess.run(["git", "ls-remote", url, "refs/heads/main"], capture_output=True, text=True)
    return r.stdout.split()[0] if r.returncode == 0 and r.stdout.split() else None


def xattr_json(path, name):
    return json.loads(os.getxattr(path, name))


@pytest.fixture
def git_daemon(tmp_path):
    """``git daemon --enable=receive-pack`` serving tmp_path/srv on a free port."""
    base = tmp_path / "srv"
    base.mkdir()
    subprocess.run(["git", "init", "-q", "--bare", str(base / "state.git")], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["git", "daemon", "--enable=receive-pack", "--export-all", "--reuseaddr",
                             f"--base-path={base}", "--listen=127.0.0.1", f"--port={port}", str(base)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"git://127.0.0.1:{port}/state.git"

    def answers():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            assert proc.poll() is None, "git daemon exited"
            return False
    try:
        wait_for(answers, "git daemon to listen")
        yield url, base / "state.git"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def settled_head(m):
    m.git_settled()
    return os.getxattr(m.mp, "user.agentstatefs.git-head").decode()


def test_replicate_to_git_daemon_and_replica_follows(mounts, git_daemon):
    url, bare = git_daemon
    w = mounts("w").start(f"replicate={url},replicate_interval=0.2")
    os.mkdir(w / "a1")
    (w / "a1/config.json").write_text('{"v": 1}')
    head = settled_head(w)
    wait_for(lambda: remote_head(url) == head, "the remote to have main")
    st = xattr_json(w.mp, "user.agentstatefs.replication")
    assert st["errors"] == 0 and st["pushed"] == head

    # a replica on another directory serves the same state and history, read-only
    r = mounts("r")
    r.start("replica_interval=0.2", extra=("--replica", url))
    assert json.loads(read(r / "a1/config.json")) == {"v": 1}
    assert len(os.listdir(r / "@history")) == 2
    for attempt in (lambda: open(r / "a1/config.json", "w"), lambda: os.mkdir(r / "a2"),
                    lambda: os.unlink(r / "a1/config.json"), lambda: open(r / "a1/memory.json", "x")):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS

    # a new version on the writer reaches the remote, then the replica
    before = read(r / "a1/config.json")
    (w / "a1/config.json").write_text('{"v": 2}')
    os.mkdir(w / "a2")
    (w / "a2/memory.json").write_text('[1]')
    head = settled_head(w)
    wait_for(lambda: remote_head(url) == head, "the remote to follow")
    wait_for(lambda: os.getxattr(r.mp, "user.agentstatefs.head").decode() == head, "the replica to follow")
    assert before == '{"v": 1}'
    assert json.loads(read(r / "a1/config.json")) == {"v": 2}     # kernel caches were invalidated
    assert json.loads(read(r / "a2/memory.json")) == [1]
    assert sorted(os.listdir(r / "@history")) == sorted(os.listdir(w / "@history"))
    old = sorted(os.listdir(w / "a1" / "@history"))
    assert json.loads(read(r / "a1" / "@history" / "HEAD~1" / "config.json")) == {"v": 1}
    assert [h for h in old if h != "runtime"]
    rs = xattr_json(r.mp, "user.agentstatefs.replication")
    assert rs["head"] == head and rs["updates"] >= 1 and rs["errors"] == 0
    # the writer's replication shows up in @metrics (prometheus text)
    text = read(w / "@metrics")
    assert "agentstatefs_replication_pushes" in text and "agentstatefs_replication_lag_seconds 0.0" in text
    assert w.stop() == 0
    assert r.stop() == 0
    # the remote is a complete, valid copy
    subprocess.run(["git", "-C", str(bare), "fsck", "--full", "--strict", "--no-dangling"], check=True,
                   capture_output=True)


def test_replicate_file_remote_prune_force_with_lease(mounts, tmp_path):
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    url = f"file://{bare}"
    w = mounts("w").start(f"replicate={url},replicate_interval=0.2")
    os.mkdir(w / "a1")
    for i in range(10):
        (w / "a1/config.json").write_text(json.dumps({"i": i}))
    head = settled_head(w)
    wait_for(lambda: remote_head(url) == head, "the first push")
    r = mounts("r")
    r.start("replica_interval=0.2", extra=("--replica", url))
    assert len(os.listdir(r / "@history")) == 11
    oldest = sorted(os.listdir(r / "@history"), key=lambda h: os.stat(r / "@history" / h).st_mtime)[0]
    assert os.path.isdir(r / "@history" / oldest / "a1")      # cached by the kernel (full id: 1 h)
    # a prune rewrites main: force-pushed with lease, and the replica follows the new chain
    subprocess.run(CLI + ["prune", "--repo", str(w.repo), "--keep-last", "3"], check=True, capture_output=True)
    head = settled_head(w)
    wait_for(lambda: remote_head(url) == head, "the forced push after the prune")
    assert subprocess.run(["git", "-C", str(bare), "rev-list", "--count", "main"], capture_output=True,
                          text=True).stdout.strip() == "3"
    assert xattr_json(w.mp, "user.agentstatefs.replication")["forced"] == 1
    wait_for(lambda: os.getxattr(r.mp, "user.agentstatefs.head").decode() == head, "the replica after prune")
    assert len(os.listdir(r / "@history")) == 3
    with pytest.raises(FileNotFoundError):
        os.stat(r / "@history" / oldest)
    assert json.loads(read(r / "a1/config.json")) == {"i": 9}
    # another writer moves the remote: the lease protects its commit, errors are reported
    other = tmp_path / "other"
    subprocess.run(["git", "clone", "-q", "-b", "main", url, str(other)], check=True)
    subprocess.run(["git", "-C", str(other), "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q",
                    "--allow-empty", "-m", "foreign"], check=True)
    subprocess.run(["git", "-C", str(other), "push", "-q", "origin", "HEAD:refs/heads/main"], check=True)
    foreign = remote_head(url)
    (w / "a1/config.json").write_text('{"i": 100}')
    wait_for(lambda: xattr_json(w.mp, "user.agentstatefs.replication")["errors"] >= 1, "a replication error")
    assert remote_head(url) == foreign
    st = xattr_json(w.mp, "user.agentstatefs.replication")
    assert "did not push" in st["last_error"] and st["lag_commits"] >= 1
    assert "replication to" in w.log()
    assert w.stop() == 0


def test_replicate_option_and_replica_refusals(mounts, tmp_path):
    m = mounts("bad")
    for opt in ("replicate=-uhoh", "replicate_interval=0", "replica_interval=nan"):
        r = subprocess.run(CLI + ["mount", "--foreground", "--repo", str(m.repo), str(m.mp), "-o", opt],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "-o" in r.stderr, (opt, r.stderr)
    r = subprocess.run(CLI + ["mount", "--foreground", "--repo", str(tmp_path / "rr"), str(m.mp),
                              "--replica", f"file://{tmp_path}/nothing-here.git"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "replica" in r.stderr
