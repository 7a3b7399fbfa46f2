"""Durability proofs and faults: power-cut simulation, group commit, disk full, bad repos."""

import errno
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import sh, unpack_to_loose
from mounting import CLI


def read(p):
    with open(p, "rb") as f:
        return f.read()


def test_power_cut_keeps_every_acknowledged_version(mounts):
    """Lose everything git wrote after the last checkpoint (unsynced), keep the fsynced
    journal: the next mount must rebuild every acknowledged version."""
    m = mounts().start()
    sh("mkdir p1 p2", cwd=m.mp)
    m.stop()  # a clean stop checkpoints
    m.start("checkpoint_interval=3600")  # from now on only the journal is synced
    acked = {}
    for i in range(40):
        for a in ("p1", "p2"):
            data = json.dumps({"a": a, "i": i}).encode()
            (m / a / "memory.json").write_bytes(data)
            acked[(a, i)] = data
    expected_head = m.git("rev-parse", "main").strip()
    m.kill9()
    cp = json.loads((m.repo / "agentstatefs/checkpoint").read_text())
    cp_mtime = (m.repo / "agentstatefs/checkpoint").stat().st_mtime
    # Simulate the power cut: the ref and every object file newer than the checkpoint
    # (the per-group packs, written unsynced) vanish.
    (m.repo / "refs/heads/main").write_text(cp["commit"] + "\n")
    lost = 0
    for obj in (m.repo / "objects").rglob("*"):
        if obj.is_file() and obj.stat().st_mtime > cp_mtime and obj.parent.name != "info":
            obj.unlink()
            lost += 1
    assert lost >= 2  # at least one pack (.pack + .idx)
    gone = subprocess.run(["git", "-C", str(m.repo), "cat-file", "-e", expected_head], capture_output=True)
    assert gone.returncode != 0  # the acknowledged head really is lost from git
    m.start()
    assert json.loads(read(m / "p1/memory.json")) == {"a": "p1", "i": 39}
    assert m.git("rev-parse", "main").strip() == expected_head  # replay is deterministic
    assert m.commit_count() == 2 + 80  # two mkdirs, 80 writes
    fsck = subprocess.run(["git", "-C", str(m.repo), "fsck", "--full"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr
    assert "replaying" in m.log()


def test_group_commit_shares_fdatasync(mounts):
    """16 concurrent writers: fewer journal fdatasyncs than commits (strace counts them)."""
    m = mounts().start()
    agents = [f"g{i}" for i in range(16)]
    for a in agents:
        os.mkdir(m / a)
    pid = m.proc.pid
    trace = m.base / "strace.out"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=fdatasync", "-o", str(trace), "-p", str(pid)])
    try:
        import time
        time.sleep(1.0)  # attached
        before = m.commit_count()
        barrier = threading.Barrier(16)

        def writer(a):
            barrier.wait()
            for i in range(25):
                (m / a / "config.json").write_text(json.dumps({"i": i}))
        threads = [threading.Thread(target=writer, args=(a,)) for a in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        commits = m.commit_count() - before
    finally:
        tracer.terminate()
        tracer.wait(timeout=30)
    syncs = sum(1 for line in trace.read_text().splitlines() if "fdatasync(" in line)
    assert commits == 16 * 25
    assert 1 <= syncs < commits, (syncs, commits)
    print(f"{commits} commits, {syncs} fdatasync calls")


@pytest.fixture
def small_fs(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)])


def test_disk_full_gives_enospc_and_recovers(small_fs, mounts):  # small_fs outlives the mount
    m = mounts(repo=small_fs / "repo").start("pack_every=0")
    os.mkdir(m / "a1")
    (m / "a1/config.json").write_text('{"v": 1}')
    filler = small_fs / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
    errors = set()
    for i in range(20):  # whatever still fits is committed; then ENOSPC
        try:
            with open(m / "a1/config.json", "w") as f:
                f.write(json.dumps({"v": 2 + i, "pad": "y" * 20000}))
        except OSError as e:
            errors.add(e.errno)
    assert errno.ENOSPC in errors, errors
    last_good = read(m / "a1/config.json")
    json.loads(last_good)  # never half a version
    assert "No space left" in m.log() or "ENOSPC" in m.log()
    filler.unlink()
    (m / "a1/config.json").write_text('{"v": "after"}')  # service resumes
    assert json.loads(read(m / "a1/config.json")) == {"v": "after"}
    m.stop()
    m.start("pack_every=0")
    assert json.loads(read(m / "a1/config.json")) == {"v": "after"}
    fsck = subprocess.run(["git", "-C", str(m.repo), "fsck", "--full"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr


def _start_fails(m, *opts) -> str:
    m.start(*opts, wait=False)
    assert m.proc.wait(timeout=60) == 1
    assert not os.path.ismount(m.mp)
    return m.log()


def test_corrupt_repo_refuses_to_mount(mounts):
    m = mounts().start()
    sh("mkdir a1 && echo '{}' > a1/config.json", cwd=m.mp)
    m.stop()
    cp = json.loads((m.repo / "agentstatefs/checkpoint").read_text())["commit"]
    unpack_to_loose(m.repo)
    obj = m.repo / "objects" / cp[:2] / cp[2:]
    obj.chmod(0o644)
    obj.write_bytes(b"\x00garbage")
    log = _start_fails(m)
    assert "missing or corrupt" in log and "fsck" in log
    r = subprocess.run(CLI + ["fsck", "--repo", str(m.repo)], capture_output=True, text=True)
    assert r.returncode == 1 and "PROBLEM" in r.stdout


def test_garbage_ref_refuses_to_mount(mounts):
    m = mounts().start()
    os.mkdir(m / "a1")
    m.stop()
    (m.repo / "agentstatefs/checkpoint").unlink()
    (m.repo / "refs/heads/main").write_text("not a commit id\n")
    assert "branch main" in _start_fails(m)


def test_read_only_repo_refuses_to_mount_but_serves_ro(mounts):
    m = mounts().start()
    sh("mkdir a1 && echo '{\"v\": 1}' > a1/config.json", cwd=m.mp)
    m.stop()
    subprocess.run(["mount", "--bind", str(m.repo), str(m.repo)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(m.repo)], check=True)
        assert "not writable" in _start_fails(m)
        m.start("ro")
        assert json.loads(read(m / "a1/config.json")) == {"v": 1}
        m.stop()
    finally:
        subprocess.run(["umount", "-l", str(m.repo)])


def test_stale_git_lock_after_crash_is_removed(mounts):
    m = mounts().start()
    os.mkdir(m / "a1")
    m.kill9()
    (m.repo / "refs/heads/main.lock").write_text("half\n")
    m.start()
    (m / "a1/config.json").write_text('{"ok": 1}')
    assert not (m.repo / "refs/heads/main.lock").exists()
    assert "stale git lock" in m.log()


def test_torn_journal_tail_is_ignored(mounts):
    m = mounts().start("checkpoint_interval=3600")
    os.mkdir(m / "a1")
    (m / "a1/config.json").write_text('{"v": 1}')
    m.kill9()
    seg = sorted((m.repo / "agentstatefs/journal").iterdir())[-1]
    with open(seg, "ab") as f:
        f.write(b"ASJ1\xff\xff\x00")  # a record cut short by the crash
    m.start()
    assert json.loads(read(m / "a1/config.json")) == {"v": 1}
    (m / "a1/config.json").write_text('{"v": 2}')
    m.kill9()
    m.start()
    assert json.loads(read(m / "a1/config.json")) == {"v": 2}


def test_fsck_and_gc_cli(mounts):
    m = mounts().start("pack_every=0")
    sh("mkdir a1 a2 && echo '{}' > a1/config.json && echo '[1]' > a2/memory.json", cwd=m.mp)
    r = subprocess.run(CLI + ["fsck", "--repo", str(m.repo)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok:") and "2 agents" in r.stdout
    r = subprocess.run(CLI + ["gc", "--repo", str(m.repo)], capture_output=True, text=True)
    assert r.returncode == 0 and "bytes before" in r.stdout and "through the mount" in r.stdout, r.stdout + r.stderr
    (m / "a1/config.json").write_text('{"after": "gc"}')  # mounted daemon reads from the pack
    assert json.loads(read(m / "a2/memory.json")) == [1]
    m.stop()
    m.start()
    assert json.loads(read(m / "a1/config.json")) == {"after": "gc"}
    # corrupt one (loose, written after the gc) blob: fsck names it
    (m / "a2/memory.json").write_text('[2, "loose"]')
    blob = m.git("rev-parse", "main:" + m.tree_path("a2", "memory.json")).strip()
    m.stop()
    unpack_to_loose(m.repo)
    obj = m.repo / "objects" / blob[:2] / blob[2:]
    obj.chmod(0o644)
    obj.write_bytes(b"broken")
    r = subprocess.run(CLI + ["fsck", "--repo", str(m.repo)], capture_output=True, text=True)
    assert r.returncode == 1 and blob in r.stdout


def test_background_packing(mounts):
    m = mounts().start("pack_every=50")
    os.mkdir(m / "a1")
    for i in range(60):
        (m / "a1/memory.json").write_text(json.dumps({"i": i}))
    import time
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "combined" not in m.log():
        time.sleep(0.2)
    assert "combined" in m.log()
    assert list((m.repo / "objects/pack").glob("*.pack"))
    (m / "a1/memory.json").write_text('{"i": "after pack"}')
    assert json.loads(read(m / "@history/HEAD~30/a1/memory.json"))["i"] == 30
    m.stop()
    fsck = subprocess.run(["git", "-C", str(m.repo), "fsck", "--full"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr
