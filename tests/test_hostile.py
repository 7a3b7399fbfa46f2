"""Hostile and racy use of a real mount: each test names the defect it pins down.

These describe the fixed behaviour (SPEC sections 2, 3 and 6): hostile process names,
renames between state files, flush racing writes, rename racing unlink, unlinked
scratch files, huge truncates, truncate-then-seek, writes through a deleted name,
inode numbers, deep JSON, bounded daemon memory and bad mount options. After every
hostile action the daemon must still run and serve a normal write and read.
"""

import ctypes
import errno
import json
import os
import resource
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import sh
from mounting import is_live_mount


# -- helpers ---------------------------------------------------------------------------
def read(p):
    with open(p, "rb") as f:
        return f.read()


def write(p, data: bytes):
    with open(p, "wb") as f:
        f.write(data)


def assert_serving(m, agent="alive-check"):
    """The daemon is still running and a normal write + read round-trips."""
    assert m.proc.poll() is None, f"daemon exited with {m.proc.returncode}:\n{m.log()[-4000:]}"
    os.makedirs(m / agent, exist_ok=True)
    payload = json.dumps({"alive": time.time_ns()}).encode()
    write(m / agent / "config.json", payload)
    assert read(m / agent / "config.json") == payload


def errno_of(fn, *args) -> int:
    """Run ``fn(*args)``; the errno it raised, or 0 if it returned."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def file_commits(m, agent: str, name: str) -> int:
    """How many commits on main touched ``agent/name``."""
    return int(m.git("rev-list", "--count", "main", "--", m.tree_path(agent, name)).strip())


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fsck_strict(m):
    if hasattr(m, "git_settled"):
        m.git_settled()  # the daemon may write git's ref just after acknowledging
    r = subprocess.run(["git", "-C", str(m.repo), "fsck", "--full", "--strict"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # warnings (e.g. badly formed author lines) are printed without failing the exit code
    assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD = -100
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4


def renameat2(a, b, flags: int) -> int:
    """renameat2(2); 0 on success, else the errno."""
    r = _libc.renameat2(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), flags)
    return 0 if r == 0 else ctypes.get_errno()


# A writer that renames itself (prctl PR_SET_NAME) before writing a state file.
NAMED_WRITER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
name = bytes.fromhex(sys.argv[1])
if libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0) != 0:
    sys.exit(3)
with open("/proc/self/comm", "rb") as f:
    if f.read().rstrip(b"\n") != name[:15]:
        sys.exit(4)   # the kernel did not take the name: the test would prove nothing
print(os.getpid(), flush=True)
try:
    fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, bytes.fromhex(sys.argv[3]))
    os.close(fd)
except OSError as e:
    print("errno", e.errno, flush=True)
    sys.exit(1)
"""


def named_write(name: bytes, path, data: bytes) -> tuple[int, int, int]:
    """Write ``data`` to ``path`` from a process named ``name``: (exit code, pid, errno)."""
    r = subprocess.run([sys.executable, "-c", NAMED_WRITER, name.hex(), str(path), data.hex()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode not in (3, 4), f"could not set the process name: {r.stderr}"
    lines = r.stdout.split("\n")
    pid = int(lines[0])
    err = int(lines[1].split()[1]) if r.returncode == 1 else 0
    return r.returncode, pid, err


# -- 1. process names --------------------------------------------------------------------
HOSTILE_NAME = b"a\nb<c>"


def test_process_name_with_newline_and_angle_brackets_commits(mnt):
    """Defect 1: a writer named 'a\\nb<c>' must commit; the repo stays clean."""
    os.mkdir(mnt / "a1")
    data = b'{"from": "hostile name"}'
    rc, pid, err = named_write(HOSTILE_NAME, mnt / "a1/config.json", data)
    assert rc == 0, f"close failed with {errno.errorcode.get(err, err)}"
    assert read(mnt / "a1/config.json") == data
    fsck_strict(mnt)
    log = mnt.git("log", "--format=%H %an <%ae>%n%B")
    assert "a1/config.json" in log
    assert mnt.git("show", "main:" + mnt.tree_path("a1", "config.json")).encode() == data
    # another, normal process still commits
    write(mnt / "a1/memory.json", b'{"normal": true}')
    assert read(mnt / "a1/memory.json") == b'{"normal": true}'
    fsck_strict(mnt)
    assert_serving(mnt)


def test_process_name_cannot_forge_log_lines(mnt):
    """Defect 1: a newline in the caller's command name never starts a new daemon log line."""
    os.mkdir(mnt / "a1")
    write(mnt / "a1/config.json", b'{"v": 1}')
    named_write(HOSTILE_NAME, mnt / "a1/config.json", b'{"v": 2}')  # its fate is another test's
    # an invalid write makes the daemon log a line naming the caller
    rc_bad, pid_bad, err = named_write(HOSTILE_NAME, mnt / "a1/config.json", b'{"broken": ')
    assert rc_bad == 1 and err == errno.EINVAL
    assert_serving(mnt)
    log = mnt.log()
    forged = [l for l in log.splitlines() if l.startswith("b<c>")]
    assert not forged, f"forged log lines: {forged}"
    mentions = [l for l in log.splitlines() if str(pid_bad) in l and "config.json" in l]
    assert mentions, f"no log line names the refused write of pid {pid_bad}:\n{log[-3000:]}"


def test_process_name_cannot_forge_commit_trailers(mnt):
    """Defect 1: a command name 'x\\nAgent: evil' cannot add trailers to the commit message."""
    os.mkdir(mnt / "a1")
    rc, pid, err = named_write(b"x\nAgent: evil", mnt / "a1/config.json", b'{"v": 1}')
    assert rc == 0, f"close failed with {errno.errorcode.get(err, err)}"
    body = mnt.git("log", "-1", "--format=%B")
    assert "Agent: a1" in body.splitlines()
    assert "Agent: evil" not in body.splitlines(), body
    author = mnt.git("log", "-1", "--format=%an%n%ae")
    assert len(author.strip().splitlines()) == 2, f"the author header was split: {author!r}"
    fsck_strict(mnt)
    assert_serving(mnt)


def test_process_name_survives_restart(mounts):
    """Defect 1: after a hostile-named commit, stop/start works and the content is there."""
    m = mounts().start()
    os.mkdir(m / "a1")
    rc, pid, err = named_write(HOSTILE_NAME, m / "a1/config.json", b'{"v": "hostile"}')
    assert rc == 0, f"close failed with {errno.errorcode.get(err, err)}"
    rc, pid, err = named_write(b"x\nAgent: evil", m / "a1/memory.json", b'{"v": "evil"}')
    assert rc == 0, f"close failed with {errno.errorcode.get(err, err)}"
    assert m.stop() == 0
    m.start()
    assert read(m / "a1/config.json") == b'{"v": "hostile"}'
    assert read(m / "a1/memory.json") == b'{"v": "evil"}'
    fsck_strict(m)
    m.git("log")
    assert_serving(m)


# -- 3. rename between state files -----------------------------------------------------------
@pytest.mark.parametrize("target_exists", [False, True])
def test_rename_state_to_state_is_visible_at_once(mnt, target_exists):
    """Defect 3: mv config.json memory.json: memory.json readable at once with config's
    content, mode and owner; config.json gone."""
    os.mkdir(mnt / "a1")
    if target_exists:
        write(mnt / "a1/memory.json", b'{"old": "memory"}')
        os.stat(mnt / "a1/memory.json")  # the kernel knows the target's inode
    src, dst = mnt / "a1/config.json", mnt / "a1/memory.json"
    write(src, b'{"from": "config"}')
    os.chmod(src, 0o600)
    os.chown(src, 4321, 4322)
    st = os.stat(src)  # the kernel now caches the source's dentry and attributes
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 4321, 4322)
    os.rename(src, dst)
    assert read(dst) == b'{"from": "config"}'
    st = os.stat(dst)
    assert st.st_mode & 0o777 == 0o600
    assert (st.st_uid, st.st_gid) == (4321, 4322)
    assert st.st_size == len(b'{"from": "config"}')
    assert errno_of(os.stat, src) == errno.ENOENT
    assert errno_of(read, src) == errno.ENOENT
    assert sorted(os.listdir(mnt / "a1")) == ["memory.json"]
    tree = mnt.git("ls-tree", "--name-only", "main", mnt.tree_path("a1") + "/").split()
    assert not any(t.endswith("config.json") for t in tree), tree
    assert_serving(mnt)


def test_write_after_state_rename_lands_in_target(mnt):
    """Defect 3: a write to memory.json right after mv config.json memory.json goes to memory.json."""
    os.mkdir(mnt / "a1")
    src, dst = mnt / "a1/config.json", mnt / "a1/memory.json"
    write(src, b'{"v": 1}')
    os.stat(src)
    os.rename(src, dst)
    write(dst, b'{"v": 2}')
    assert read(dst) == b'{"v": 2}'
    assert errno_of(os.stat, src) == errno.ENOENT
    assert sorted(os.listdir(mnt / "a1")) == ["memory.json"]
    assert mnt.git("show", "main:" + mnt.tree_path("a1", "memory.json")) == '{"v": 2}'
    ls = mnt.git("ls-tree", "--name-only", "main", mnt.tree_path("a1") + "/").split()
    assert not any(t.endswith("config.json") for t in ls), ls
    assert_serving(mnt)


def test_state_rename_races_with_writer(mnt):
    """Defect 3: renames racing a writer of config.json always leave an acknowledged,
    valid version in memory.json, readable at once."""
    os.mkdir(mnt / "a1")
    src, dst = mnt / "a1/config.json", mnt / "a1/memory.json"
    acked: set[int] = set()
    writer_errors: list = []
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                write(src, json.dumps({"v": i, "pad": "p" * (i % 50)}).encode())
                acked.add(i)
            except OSError as e:
                writer_errors.append((i, errno.errorcode.get(e.errno, e.errno)))

    t = threading.Thread(target=writer)
    t.start()
    seen, bad, renames, refused = [], [], 0, {}
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and len(bad) < 5:
            try:
                os.rename(src, dst)
            except OSError as e:  # refusing is allowed (config.json may be absent or busy), EIO is not
                name = errno.errorcode.get(e.errno, str(e.errno))
                refused[name] = refused.get(name, 0) + 1
                if e.errno == errno.EIO:
                    bad.append(repr(e))
                continue
            renames += 1
            try:
                seen.append(json.loads(read(dst))["v"])
            except (OSError, ValueError) as e:
                bad.append(repr(e))
    finally:
        stop.set()
        t.join()
    print(f"\n{renames} renames, refused: {refused}, {len(acked)} writes")
    assert renames > 0, f"no rename succeeded: {refused}"
    assert not bad, f"memory.json unreadable/invalid right after a successful rename: {bad}"
    assert not writer_errors, f"writer failed: {writer_errors[:5]}"
    assert set(seen) <= acked, f"never acknowledged versions seen: {sorted(set(seen) - acked)[:5]}"
    assert_serving(mnt)


def test_rename_exchange_swaps_or_fails(mnt):
    """Defect 3: renameat2(RENAME_EXCHANGE) of two state files swaps for real or fails;
    never returns 0 without swapping."""
    os.mkdir(mnt / "a1")
    a, b = mnt / "a1/config.json", mnt / "a1/memory.json"
    write(a, b'{"was": "config"}')
    write(b, b'{"was": "memory"}')
    os.stat(a), os.stat(b)
    r = renameat2(a, b, RENAME_EXCHANGE)
    if r == 0:
        assert read(a) == b'{"was": "memory"}'
        assert read(b) == b'{"was": "config"}'
    else:
        assert r != errno.EIO, "EIO"
        assert read(a) == b'{"was": "config"}'
        assert read(b) == b'{"was": "memory"}'
    # scratch <-> state exchange: the same rule
    write(mnt / "a1/t.json", b'{"was": "scratch"}')
    before = read(a)
    r = renameat2(mnt / "a1/t.json", a, RENAME_EXCHANGE)
    if r == 0:
        assert read(a) == b'{"was": "scratch"}'
        assert read(mnt / "a1/t.json") == before
    else:
        assert r != errno.EIO, "EIO"
        assert read(a) == before
        assert read(mnt / "a1/t.json") == b'{"was": "scratch"}'
    assert_serving(mnt)


@pytest.mark.parametrize("kind", ["state", "scratch", "scratch-to-state"])
def test_rename_whiteout_is_refused(mnt, kind):
    """Defect 3: renameat2(RENAME_WHITEOUT) fails with EINVAL and changes nothing."""
    os.mkdir(mnt / "a1")
    write(mnt / "a1/config.json", b'{"v": "config"}')
    write(mnt / "a1/t.tmp", b'{"v": "scratch"}')  # valid JSON: refused for the flag alone
    src, dst = {"state": ("config.json", "memory.json"), "scratch": ("t.tmp", "u.tmp"),
                "scratch-to-state": ("t.tmp", "memory.json")}[kind]
    n = mnt.commit_count()
    r = renameat2(mnt / "a1" / src, mnt / "a1" / dst, RENAME_WHITEOUT)
    assert r == errno.EINVAL, f"renameat2(RENAME_WHITEOUT) gave {errno.errorcode.get(r, r) if r else 0}"
    assert sorted(os.listdir(mnt / "a1")) == ["config.json", "t.tmp"]
    assert read(mnt / "a1/config.json") == b'{"v": "config"}'
    assert read(mnt / "a1/t.tmp") == b'{"v": "scratch"}'
    assert mnt.commit_count() == n
    assert_serving(mnt)


# -- 4. flush racing writes on one open file ------------------------------------------------------
def test_flush_racing_a_write_loses_nothing(mnt):
    """Defect 4: a flush (close of a dup) racing a pwrite on the same open file must not
    drop that write: after each round the committed content is the last write."""
    os.mkdir(mnt / "a1")
    p = mnt / "a1/memory.json"
    write(p, json.dumps({"v": "00000000"}).encode())
    fd = os.open(p, os.O_RDWR)
    try:
        barrier = threading.Barrier(2)
        for rnd in range(300):
            pre = json.dumps({"p": f"{rnd:08d}"}).encode()  # all documents the same length
            doc = json.dumps({"v": f"{rnd:08d}"}).encode()
            os.pwrite(fd, pre, 0)  # dirty: the racing flush below really commits something

            def writer(doc=doc):
                barrier.wait()
                os.pwrite(fd, doc, 0)

            t = threading.Thread(target=writer)
            t.start()
            barrier.wait()
            os.close(os.dup(fd))   # flush (commits pre or doc), racing the pwrite of doc
            t.join()
            os.close(os.dup(fd))   # flush again: whatever was written is committed now
            now = read(p)
            assert now == doc, f"round {rnd}: committed {now!r}, the last write was {doc!r}"
    finally:
        os.close(fd)
    assert_serving(mnt)


def test_flush_during_a_write_stream_keeps_the_last_write(mnt):
    """Defect 4: one thread pwrites whole documents while another keeps flushing (closing
    dups); after the final close the file holds the last write. Three streams."""
    os.mkdir(mnt / "a1")
    p = mnt / "a1/memory.json"
    write(p, json.dumps({"v": "00000000"}).encode())
    for stream in range(3):
        fd = os.open(p, os.O_RDWR)
        stop = threading.Event()
        flush_errors = []

        def flusher():
            while not stop.is_set():
                try:
                    os.close(os.dup(fd))
                except OSError as e:
                    flush_errors.append(e.errno)

        t = threading.Thread(target=flusher)
        t.start()
        try:
            for i in range(1, 201):
                last = json.dumps({"v": f"{stream}{i:07d}"}).encode()
                os.pwrite(fd, last, 0)
        finally:
            stop.set()
            t.join()
            os.close(fd)
        assert not flush_errors, flush_errors
        assert read(p) == last, f"stream {stream}: the last write before the final close was lost"
    assert_serving(mnt)


# -- 5. rename scratch -> state racing unlink / re-create of the scratch name ---------------------------
def test_rename_racing_unlink_and_recreate_of_scratch(mnt):
    """Defect 5: rename a1/t.json -> a1/config.json racing unlink + re-create of a1/t.json:
    never EIO, no internal error, and a re-created t.json is never silently lost."""
    os.mkdir(mnt / "a1")
    t_path, c_path = mnt / "a1/t.json", mnt / "a1/config.json"
    write(c_path, b'{"k": 0}')
    stop = threading.Event()
    rename_errors, moved, created, unlinked, renames = [], set(), [], set(), [0]

    def renamer():
        while not stop.is_set():
            try:
                os.rename(t_path, c_path)
            except OSError as e:
                # ENOENT: t.json is gone; EINVAL: caught between its creation and its write
                # (an empty file is not JSON); EBUSY: being written. Anything else is a bug.
                if e.errno not in (errno.ENOENT, errno.EINVAL, errno.EBUSY):
                    rename_errors.append(errno.errorcode.get(e.errno, e.errno))
                continue
            renames[0] += 1
            try:  # only this thread changes config.json: it holds what was just moved
                moved.add(json.loads(read(c_path))["k"])
            except (OSError, ValueError) as e:
                rename_errors.append(f"read after rename: {e!r}")

    def recreator():
        k = 0
        while not stop.is_set():
            try:
                os.unlink(t_path)
                if created:
                    unlinked.add(created[-1])  # only we create t.json: it held our last one
            except FileNotFoundError:
                pass
            except OSError as e:
                rename_errors.append(f"unlink: {e!r}")
                return
            k += 1
            try:
                fd = os.open(t_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            except OSError as e:
                rename_errors.append(f"re-create: {e!r}")
                return
            try:
                os.write(fd, json.dumps({"k": k}).encode())
            finally:
                os.close(fd)
            created.append(k)

    threads = [threading.Thread(target=renamer), threading.Thread(target=recreator)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline and not rename_errors:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f"\n{renames[0]} renames, {len(created)} re-creations")
    assert renames[0] > 0
    assert not rename_errors, f"rename errors: {rename_errors[:5]}"
    assert "internal error" not in mnt.log(), mnt.log()[-3000:]
    final = None
    try:
        final = json.loads(read(t_path))["k"]
    except FileNotFoundError:
        pass
    lost = [k for k in created if k not in moved and k not in unlinked and k != final]
    assert not lost, f"re-created scratch files lost without a trace: {lost[:10]} (of {len(created)})"
    assert_serving(mnt)


# -- 6. unlinked scratch files --------------------------------------------------------------------
def test_unlinked_scratch_file_keeps_data_until_close(mnt):
    """Defect 6: an open, unlinked scratch file keeps its data (old and new) until the last close."""
    os.mkdir(mnt / "a1")
    p = mnt / "a1/tmpx"
    f = open(p, "w+")
    os.unlink(p)
    f.write("hello")
    f.seek(0)
    assert f.read() == "hello"
    f.close()
    g = open(p, "w+")
    g.write("before unlink")
    g.flush()
    os.unlink(p)
    assert errno_of(os.stat, p) == errno.ENOENT
    g.seek(0)
    assert g.read() == "before unlink"
    g.write(" and after")
    g.seek(0)
    assert g.read() == "before unlink and after"
    assert os.fstat(g.fileno()).st_size == len("before unlink and after")
    g.close()
    assert_serving(mnt)


def test_temporary_files_return_their_space(mounts):
    """Defect 6: 600 x 1 MiB tempfile.TemporaryFile with scratch_max=64M never gets ENOSPC."""
    m = mounts().start("scratch_max=64M")
    os.mkdir(m / "a1")
    chunk = b"t" * (1 << 20)
    for i in range(600):
        try:
            with tempfile.TemporaryFile(dir=m / "a1") as f:
                f.write(chunk)
                f.flush()
        except OSError as e:
            pytest.fail(f"iteration {i}: {e!r} (space of closed temporary files is not returned)")
    assert os.listdir(m / "a1") == []
    write(m / "a1/big.tmp", b"x" * (60 << 20))  # the whole cap is free again
    os.unlink(m / "a1/big.tmp")
    assert_serving(m)


# -- 7. huge truncate --------------------------------------------------------------------------------
def test_truncate_to_100g_is_efbig(mnt):
    """Defect 7: truncate -s 100G / os.truncate / ftruncate of a state file give EFBIG,
    the daemon stays up and the previous content is intact."""
    # Should the daemon try to build a 100 GiB buffer, let that fail with MemoryError
    # rather than summon the OOM killer on hosts with vm.overcommit_memory=1.
    resource.prlimit(mnt.proc.pid, resource.RLIMIT_AS, (16 << 30, resource.RLIM_INFINITY))
    os.mkdir(mnt / "a1")
    p = mnt / "a1/config.json"
    write(p, b'{"keep": 1}')
    n = mnt.commit_count()
    r = subprocess.run(["truncate", "-s", "100G", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr
    assert read(p) == b'{"keep": 1}'
    assert errno_of(os.truncate, p, 100 << 30) == errno.EFBIG
    assert read(p) == b'{"keep": 1}'
    fd = os.open(p, os.O_RDWR)
    try:
        assert errno_of(os.ftruncate, fd, 100 << 30) == errno.EFBIG
    finally:
        os.close(fd)
    assert read(p) == b'{"keep": 1}'
    assert mnt.commit_count() == n
    assert "internal error" not in mnt.log()
    assert_serving(mnt)


# -- 8. truncate, then seek to the end -------------------------------------------------------------
def test_truncate_then_seek_end_appends_at_new_end(mnt):
    """Defect 8: f.truncate(0); write; seek(0, 2); write -> the file holds exactly what was written."""
    os.mkdir(mnt / "a1")
    p = mnt / "a1/config.json"
    write(p, b'{"previous": "content that is longer"}')
    os.stat(p)
    f = open(p, "r+")
    f.truncate(0)
    f.write('{"a":1}')
    f.seek(0, 2)
    f.write("\n")
    f.close()
    assert read(p) == b'{"a":1}\n'
    assert_serving(mnt)


def test_ftruncate_shorter_then_fstat(mnt):
    """Defect 8: after ftruncate to a shorter size, fstat on that descriptor reports it."""
    os.mkdir(mnt / "a1")
    p = mnt / "a1/config.json"
    write(p, b'{"a": 1}          ')
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 8)
        assert os.fstat(fd).st_size == 8
        assert os.lseek(fd, 0, os.SEEK_END) == 8
        os.ftruncate(fd, 12)
        assert os.fstat(fd).st_size == 12
        os.ftruncate(fd, 8)
    finally:
        os.close(fd)
    assert read(p) == b'{"a": 1}'
    assert os.stat(p).st_size == 8
    assert_serving(mnt)


# -- 9. writing through a deleted name -------------------------------------------------------------
@pytest.mark.parametrize("existed", [True, False])
def test_write_through_deleted_state_file_does_not_resurrect_it(mnt, existed):
    """Defect 9: exec 3>f; rm f; echo {} >&3; exec 3>&- leaves f deleted, no commit re-creates it."""
    os.mkdir(mnt / "a1")
    if existed:
        write(mnt / "a1/config.json", b'{"v": 1}')
    sh("exec 3>a1/config.json; rm a1/config.json; echo {} >&3; exec 3>&-", cwd=mnt.mp)
    assert errno_of(os.stat, mnt / "a1/config.json") == errno.ENOENT
    assert os.listdir(mnt / "a1") == []
    tree = mnt.git("ls-tree", "-r", "--name-only", "main", mnt.tree_path("a1") + "/").split()
    assert not any(t.endswith("config.json") for t in tree), tree
    assert not mnt.git("log", "-1", "--format=%s").startswith("write a1/config.json")
    assert_serving(mnt)


# -- 10. inode numbers --------------------------------------------------------------------------
def test_recreated_agent_dir_gets_a_new_inode(mnt):
    """Defect 10: rm -r a1; mkdir a1 while an fd on the old a1 is open -> a different st_ino."""
    os.mkdir(mnt / "a1")
    write(mnt / "a1/config.json", b"{}")
    old_ino = os.stat(mnt / "a1").st_ino
    dfd = os.open(mnt / "a1", os.O_RDONLY | os.O_DIRECTORY)
    try:
        sh("rm -r a1 && mkdir a1", cwd=mnt.mp)
        new_ino = os.stat(mnt / "a1").st_ino
        assert new_ino != old_ino, "the new a1 reuses the inode number of the removed one"
        assert os.listdir(mnt / "a1") == []
    finally:
        os.close(dfd)
    assert_serving(mnt)


def test_renamed_state_file_inode_is_consistent(mnt):
    """Defect 10: after echo {} > a1/t; mv a1/t a1/config.json, stat and readdir agree on
    config.json's inode number, every time."""
    os.mkdir(mnt / "a1")
    sh("echo {} > a1/t && mv a1/t a1/config.json", cwd=mnt.mp)
    inos = set()
    for _ in range(5):
        inos.add(os.stat(mnt / "a1/config.json").st_ino)
        with os.scandir(mnt / "a1") as it:
            for e in it:
                if e.name == "config.json":
                    inos.add(e.inode())
        time.sleep(0.4)  # across the kernel's 1 s entry timeout
    assert len(inos) == 1, f"config.json has several inode numbers: {sorted(inos)}"
    assert_serving(mnt)


# -- 11. deep and big JSON --------------------------------------------------------------------------
def _refused_write_logs(m, path, data) -> list[str]:
    """Write ``data`` (expected to be refused); the daemon log lines it produced."""
    before = len(m.log().splitlines())
    with pytest.raises(OSError) as e:
        write(path, data)
    assert e.value.errno == errno.EINVAL, errno.errorcode.get(e.value.errno)
    assert_serving(m)
    return m.log().splitlines()[before:]


def test_deeply_nested_json_is_einval_not_eio(mnt):
    """Defect 11: '['*1000 + ']'*1000 is refused with EINVAL (no traceback, one log line),
    the previous version kept."""
    os.mkdir(mnt / "a1")
    p = mnt / "a1/config.json"
    write(p, b'{"keep": true}')
    n = file_commits(mnt, "a1", "config.json")
    # control: an ordinary invalid document gives EINVAL and one log line
    new = _refused_write_logs(mnt, p, b'{"broken": ')
    assert len([l for l in new if "config.json" in l]) == 1, "\n".join(new)
    new = _refused_write_logs(mnt, p, b"[" * 1000 + b"]" * 1000)
    assert not any("Traceback" in l for l in new), "\n".join(new)
    assert len([l for l in new if "config.json" in l]) == 1, "\n".join(new)
    assert read(p) == b'{"keep": true}'
    assert file_commits(mnt, "a1", "config.json") == n
    # deeper still, and as runtime.json (validated too)
    new = _refused_write_logs(mnt, p, b'{"a": ' * 100_000 + b"1" + b"}" * 100_000)
    assert not any("Traceback" in l for l in new), "\n".join(new)
    new = _refused_write_logs(mnt, mnt / "a1/runtime.json", b"[" * 5000 + b"]" * 5000)
    assert not any("Traceback" in l for l in new), "\n".join(new)
    assert read(p) == b'{"keep": true}'
    assert file_commits(mnt, "a1", "config.json") == n


def test_big_integer_and_moderate_nesting_are_accepted(mnt):
    """Defect 11: a 5000-digit integer (valid RFC 8259) and 64-deep nesting are accepted."""
    os.mkdir(mnt / "a1")
    p = mnt / "a1/config.json"
    big = b'{"n": ' + b"7" * 5000 + b"}"
    write(p, big)
    assert read(p) == big
    deep = b'{"d": ' + b"[" * 63 + b"1" + b"]" * 63 + b"}"
    write(p, deep)
    assert read(p) == deep
    assert_serving(mnt)


# -- 12. bounded daemon memory ------------------------------------------------------------------------
MIB = 1 << 20


def test_many_readers_of_a_big_file_keep_memory_bounded(mounts):
    """Defect 12: 50 simultaneous readers of a 16 MiB state file grow the daemon by < 200 MB."""
    m = mounts().start()
    os.mkdir(m / "a1")
    k = (16 * MIB - 64) // 2
    data = b"[" + b"1," * k + b"1]"
    assert len(data) < 16 * MIB
    write(m / "a1/memory.json", data)
    assert read(m / "a1/memory.json") == data
    time.sleep(0.5)
    base = rss_kib(m.proc.pid)
    fds = [os.open(m / "a1/memory.json", os.O_RDONLY) for _ in range(50)]  # all open at once
    try:
        for fd in fds:  # each reads the whole file
            off = 0
            while True:
                n = len(os.pread(fd, 1 << 20, off))
                if not n:
                    break
                off += n
            assert off == len(data)
        peak = rss_kib(m.proc.pid)
    finally:
        for fd in fds:
            os.close(fd)
    grow_mb = (peak - base) / 1024
    print(f"\n50 readers of 16 MiB: daemon RSS {base / 1024:.0f} MB -> {peak / 1024:.0f} MB (+{grow_mb:.0f} MB)")
    assert grow_mb < 200
    assert_serving(m)


def test_many_writers_are_capped_by_buffer_max(mounts):
    """Defect 12: 20 writers each holding 16 MiB of uncommitted buffer are capped by
    buffer_max (ENOSPC for the writes past it), not an OOM; closing frees the space."""
    m = mounts().start("buffer_max=64M")
    os.mkdir(m / "a1")
    time.sleep(0.3)
    base = rss_kib(m.proc.pid)
    chunk = b" " * MIB
    fds, refused = [], 0
    try:
        for i in range(20):
            fd = os.open(m / "a1/memory.json", os.O_WRONLY | os.O_CREAT)
            fds.append(fd)
            try:
                for j in range(15):
                    os.pwrite(fd, chunk, j * MIB)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                refused += 1
        peak = rss_kib(m.proc.pid)
    finally:
        for fd in fds:
            try:
                os.close(fd)   # all-blank buffers are not JSON: EINVAL, nothing committed
            except OSError:
                pass
    grow_mb = (peak - base) / 1024
    print(f"\n20 writers x 15 MiB, buffer_max=64M: daemon RSS {base / 1024:.0f} MB -> "
          f"{peak / 1024:.0f} MB (+{grow_mb:.0f} MB), {refused} writers got ENOSPC")
    assert refused >= 15
    assert grow_mb < 200
    write(m / "a1/memory.json", b'{"after": 1}')   # the space came back
    assert_serving(m)


def test_history_listings_keep_memory_bounded(mounts):
    """Defect 12: listing @history/HEAD~N for N=0..199 grows the daemon by < 100 MB."""
    m = mounts().start()
    agents = [f"ag{i:02d}" for i in range(50)]
    for a in agents:
        os.mkdir(m / a)
    for i in range(150):
        write(m / agents[i % 50] / "config.json", json.dumps({"i": i, "pad": "x" * 200}).encode())
    assert m.commit_count() >= 200
    time.sleep(0.5)
    base = rss_kib(m.proc.pid)
    for n in range(200):
        d = m / "@history" / f"HEAD~{n}"
        with os.scandir(d) as it:  # like ls -l: list, then stat every entry
            names = [(e.name, e.stat()) for e in it]
        assert 1 <= len(names) <= 50
    time.sleep(2)  # a gc-like pause
    after = rss_kib(m.proc.pid)
    grow_mb = (after - base) / 1024
    print(f"\n200 history listings: daemon RSS {base / 1024:.0f} MB -> {after / 1024:.0f} MB (+{grow_mb:.0f} MB)")
    assert grow_mb < 100
    assert_serving(m)


def test_scratch_names_count_against_the_cap(mounts):
    """Defect 12: creating up to 120,000 empty scratch files with scratch_max=8M hits ENOSPC
    before the end: names and inodes count against the cap. The names are 250 bytes, so
    the names alone pass the cap at 33,554 files; we give up at 1.5 times that."""
    m = mounts().start("scratch_max=8M")
    os.mkdir(m / "a1")
    base = rss_kib(m.proc.pid)
    namelen, workers = 250, 4
    total = min(120_000, int(1.5 * (8 << 20) / namelen))
    made, errs = [0] * workers, [None] * workers
    stop = threading.Event()

    def creator(w):
        d = m / f"a1/many{w}"  # one directory per thread: the kernel does not serialize them
        os.mkdir(d)
        for i in range(total // workers):
            if stop.is_set():
                return
            try:  # an empty file, in one request (like touch)
                os.mknod(d / f"{i:07d}".ljust(namelen, "n"), 0o644 | stat.S_IFREG)
            except OSError as e:
                errs[w] = e.errno
                stop.set()
                return
            made[w] += 1

    threads = [threading.Thread(target=creator, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = rss_kib(m.proc.pid)
    print(f"\nempty scratch files: {sum(made)} made; daemon RSS {base / 1024:.0f} MB -> {after / 1024:.0f} MB")
    assert errno.ENOSPC in errs, f"no ENOSPC after {sum(made)} files (errnos {errs})"
    assert sum(made) < total
    sh("rm -rf a1/many*", cwd=m.mp)
    write(m / "a1/after.tmp", b"x" * (4 << 20))  # the space came back
    assert_serving(m)


def test_scratch_xattrs_count_against_the_cap(mounts):
    """Defect 12: 64 KiB xattrs on many scratch files with scratch_max=8M end in ENOSPC."""
    m = mounts().start("scratch_max=8M")
    os.mkdir(m / "a1")
    value = b"v" * 65536
    err, done = None, 0
    for i in range(1000):  # 1000 x 64 KiB = 62.5 MiB, far past the cap
        p = m / f"a1/x{i:04d}.tmp"
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
            os.close(fd)
            os.setxattr(p, "user.x", value)
        except OSError as e:
            err = e.errno
            break
        done += 1
    print(f"\n64 KiB xattrs set on {done} scratch files before {errno.errorcode.get(err, err)}")
    assert err == errno.ENOSPC, f"no ENOSPC after {done} x 64 KiB xattrs (errno {err})"
    assert_serving(m)


# -- 14. mount options ------------------------------------------------------------------------------
@pytest.mark.parametrize("opt,name", [("checkpoint_interval=0", "checkpoint_interval"),
                                      ("checkpoint_interval=-1", "checkpoint_interval"),
                                      ("max_size=abc", "max_size")])
def test_bad_option_values_refuse_to_mount(mounts, opt, name):
    """Defect 14: bad option values exit non-zero with a message naming the option, unmounted."""
    m = mounts()
    m.start(opt, wait=False)
    deadline = time.monotonic() + 30
    while m.proc.poll() is None and time.monotonic() < deadline:
        if is_live_mount(m.mp):
            pytest.fail(f"-o {opt} was accepted: the filesystem got mounted")
        time.sleep(0.05)
    rc = m.proc.wait(timeout=30)
    log = m.log()
    assert rc != 0
    assert not os.path.ismount(m.mp)
    assert name in log, log
    assert "Traceback" not in log, f"not a clear message:\n{log}"
    assert " mounted " not in log, f"it mounted first:\n{log}"
