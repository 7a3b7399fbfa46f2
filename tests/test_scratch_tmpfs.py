"""Scratch files behave like tmpfs (SPEC section 2), driven by real programs on a real
mount: symlinks, hard links, readlink, atime as set, sparse files, EFBIG, O_DIRECT,
and ``.``/``..`` in every directory listing (``ls -la``), history directories included."""

import errno
import json
import os
import socket
import stat
import time

import pytest

from conftest import sh

from agentstatefs.fs.scratch import MAX_FILE_SIZE


def test_symlinks_hard_links_and_readlink(mnt):
    m = mnt
    os.mkdir(m / "a1")
    (m / "a1/config.json").write_text('{"v": 1}')
    sh("echo hello > notes.txt && ln -s config.json cfg && ln -s notes.txt n && ln notes.txt hard "
       "&& mkdir d && ln -s ../notes.txt d/up", cwd=m / "a1")
    assert sh("readlink cfg", cwd=m / "a1").stdout == "config.json\n"
    assert os.readlink(m / "a1/d/up") == "../notes.txt"
    # symlinks resolve (to state files too: the kernel follows them)
    assert sh("cat cfg n d/up", cwd=m / "a1").stdout == '{"v": 1}hello\nhello\n'
    st_link = os.lstat(m / "a1/cfg")
    assert (st_link.st_mode & 0o170000) == 0o120000 and st_link.st_size == len("config.json")
    a, b = os.stat(m / "a1/notes.txt"), os.stat(m / "a1/hard")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    with open(m / "a1/hard", "a") as f:
        f.write("more\n")
    assert (m / "a1/notes.txt").read_text() == "hello\nmore\n"
    os.unlink(m / "a1/notes.txt")
    assert os.stat(m / "a1/hard").st_nlink == 1 and (m / "a1/hard").read_text() == "hello\nmore\n"
    assert not os.path.exists(m / "a1/n")            # dangling now, as on tmpfs
    assert os.path.islink(m / "a1/n")
    # hard links across agents' scratch areas share the node too
    os.mkdir(m / "a2")
    os.link(m / "a1/hard", m / "a2/h")
    assert os.stat(m / "a2/h").st_ino == a.st_ino
    # state files hold JSON under one name: no links to or as them
    for call, want in ((lambda: os.link(m / "a1/config.json", m / "a1/c2"), errno.EPERM),
                       (lambda: os.symlink("x", m / "a1/memory.json"), errno.EPERM),
                       (lambda: os.link(m / "a1/hard", m / "a1/memory.json"), errno.EPERM),
                       (lambda: os.symlink("x", m / "a1/cfg"), errno.EEXIST),
                       (lambda: os.link(m / "a1/d", m / "a1/d2"), errno.EPERM),
                       (lambda: os.symlink("x", m / "@history/x"), errno.EROFS)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == want
    # a symlink is never versioned: no commit for any of this
    assert "cfg" not in m.git("ls-tree", "-r", "--name-only", "main")
    # emacs-style lock symlink (target is arbitrary text)
    os.symlink("root@host.1234:1700000000", m / "a1/.#config.json")
    assert os.readlink(m / "a1/.#config.json") == "root@host.1234:1700000000"
    os.unlink(m / "a1/.#config.json")


def test_atime_and_mtime_as_set(mnt):
    m = mnt
    os.mkdir(m / "a1")
    (m / "a1/f").write_text("x")
    sh("touch -a -d '2020-01-02 03:04:05 UTC' f && touch -m -d '2021-02-03 04:05:06 UTC' f", cwd=m / "a1")
    st = os.stat(m / "a1/f")
    assert st.st_atime == 1577934245 and st.st_mtime == 1612325106
    assert sh("stat -c '%X %Y' f", cwd=m / "a1").stdout.split() == ["1577934245", "1612325106"]
    os.utime(m / "a1/f", ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(m / "a1/f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    # reading updates atime as relatime does on ext4/tmpfs (it is older than mtime here)
    time.sleep(1.1)   # the kernel's attribute cache (1 s) is not what is being tested
    (m / "a1/f").read_text()
    os.utime(m / "a1/f", ns=(5_000_000_000, 6_000_000_000))
    assert os.stat(m / "a1/f").st_atime_ns == 5_000_000_000


def test_sparse_files_are_not_charged_and_efbig_past_the_largest_size(mounts):
    m = mounts().start("scratch_max=8M")
    os.mkdir(m / "a1")
    sh("truncate -s 1T big", cwd=m / "a1")
    st = os.stat(m / "a1/big")
    assert st.st_size == 1 << 40 and st.st_blocks == 0      # a hole: nothing allocated
    # data in the middle of the hole: only that is charged
    sh("dd if=/dev/urandom of=big bs=4096 count=1 seek=1000000 conv=notrunc status=none", cwd=m / "a1")
    st = os.stat(m / "a1/big")
    assert st.st_size == 1 << 40 and 0 < st.st_blocks * 512 <= 128 << 10
    with open(m / "a1/big", "rb") as f:
        f.seek(4096 * 1000000 - 10)
        chunk = f.read(20)
        assert chunk[:10] == bytes(10) and len(chunk) == 20
        f.seek(5 << 30)
        assert f.read(4096) == bytes(4096)
    # a second 1 TiB sparse file still fits in an 8 MiB cap; real data past the cap does not
    sh("truncate -s 1T big2", cwd=m / "a1")
    r = sh("dd if=/dev/zero of=fill bs=1M count=16 status=none", cwd=m / "a1", check=False)
    assert r.returncode != 0 and "No space left on device" in r.stderr
    os.unlink(m / "a1/fill")
    # EFBIG past the largest file size (ext4's, 16 TiB - 4 KiB), not ENOSPC
    r = sh("truncate -s 16T big", cwd=m / "a1", check=False)
    assert r.returncode == 1 and "File too large" in r.stderr
    r = sh(f"dd if=/dev/zero of=big bs=1 count=1 seek={MAX_FILE_SIZE} conv=notrunc status=none",
           cwd=m / "a1", check=False)
    assert r.returncode == 1 and "File too large" in r.stderr
    sh(f"truncate -s {MAX_FILE_SIZE} big", cwd=m / "a1")
    assert os.stat(m / "a1/big").st_size == MAX_FILE_SIZE
    # shrinking frees what was written
    sh("truncate -s 0 big big2", cwd=m / "a1")
    sh("dd if=/dev/zero of=fill bs=1M count=7 status=none", cwd=m / "a1")
    # a sparse file too big for a state file is refused before it is read out
    sh("truncate -s 1T s.tmp", cwd=m / "a1")
    with pytest.raises(OSError) as e:
        os.rename(m / "a1/s.tmp", m / "a1/config.json")
    assert e.value.errno == errno.EFBIG


def test_o_direct_opens(mnt):
    m = mnt
    os.mkdir(m / "a1")
    sh("dd if=/dev/urandom of=d.bin bs=4096 count=8 oflag=direct status=none", cwd=m / "a1")
    assert os.stat(m / "a1/d.bin").st_size == 8 * 4096
    sh("dd if=d.bin of=/dev/null bs=4096 iflag=direct status=none", cwd=m / "a1")
    sh("""printf '{"direct": true}' > /tmp/agentstatefs-direct.json && """
       "dd if=/tmp/agentstatefs-direct.json of=config.json bs=4096 oflag=direct status=none", cwd=m / "a1")
    assert json.loads((m / "a1/config.json").read_text()) == {"direct": True}
    fd = os.open(m / "a1/d.bin", os.O_RDONLY | os.O_DIRECT)
    os.close(fd)


def _ls_la(path) -> list[tuple[str, int]]:
    """(name, inode) of each entry ``ls -lai`` prints, in readdir order (-U)."""
    out = sh(f"ls -laiU {path}").stdout.splitlines()
    rows = []
    for line in out:
        parts = line.split()
        if len(parts) >= 10 and parts[0].isdigit():
            rows.append((parts[-1], int(parts[0])))
    return rows


def test_dot_and_dotdot_in_every_listing(mnt):
    m = mnt
    os.mkdir(m / "a1")
    (m / "a1/config.json").write_text('{"v": 1}')
    (m / "a1/config.json").write_text('{"v": 2}')
    os.makedirs(m / "a1/d/e")
    head = m.git("rev-parse", "main").strip()
    ino = lambda p: os.stat(m / p).st_ino  # noqa: E731
    cases = {
        "": (1, None),   # the mount root's ".." is outside the mount: any number
        "a1": (ino("a1"), 1),
        "a1/d": (ino("a1/d"), ino("a1")),
        "a1/d/e": (ino("a1/d/e"), ino("a1/d")),
        "@history": (ino("@history"), 1),
        f"@history/{head}": (ino(f"@history/{head}"), ino("@history")),
        f"@history/{head}/a1": (ino(f"@history/{head}/a1"), ino(f"@history/{head}")),
        "a1/@history": (ino("a1/@history"), ino("a1")),
        "a1/@history/HEAD~1": (ino("a1/@history/HEAD~1"), ino("a1/@history")),
        "a1/@rejected": (ino("a1/@rejected"), ino("a1")),
        "a1/@patch": (ino("a1/@patch"), ino("a1")),
    }
    for path, (dot, dotdot) in cases.items():
        rows = _ls_la(m / path if path else m.mp)
        assert [r[0] for r in rows[:2]] == [".", ".."], (path, rows)
        assert rows[0][1] == dot, path
        if dotdot is not None:
            assert rows[1][1] == dotdot, path
        assert "." not in [r[0] for r in rows[2:]] and ".." not in [r[0] for r in rows[2:]]
    assert sorted(os.listdir(m / "a1")) == ["config.json", "d"]   # os.listdir leaves them out


def test_history_directory_times_are_commit_times(mnt):
    m = mnt
    os.mkdir(m / "a1")
    for v in range(3):
        (m / "a1/config.json").write_text(json.dumps({"v": v}))
    times = [int(t) for t in m.git("log", "--format=%ct").split()]
    for path in ("@history", "a1/@history", "@history/HEAD", "a1/@history/HEAD~1"):
        st = os.stat(m / path)
        assert st.st_mtime > 1_700_000_000, path         # not 1970
    assert int(os.stat(m / "@history").st_mtime) == times[0]
    assert int(os.stat(m / "a1/@history/HEAD~2").st_mtime) == times[2]
    # ls -t lists commits newest first, even several in one second
    ids = m.git("rev-list", "main").split()
    assert sh("ls -t", cwd=m / "@history").stdout.split() == ids
    assert sh("ls -t", cwd=m / "a1/@history").stdout.split() == ids   # every commit changed a1
    assert sh("ls -U", cwd=m / "a1/@history").stdout.split() == ids   # readdir order: newest first


def test_fifos_and_unix_sockets(mnt):
    m = mnt
    os.mkdir(m / "a1")
    sh("mkfifo a1/pipe", cwd=m.mp)
    assert stat.S_ISFIFO(os.stat(m / "a1/pipe").st_mode)
    r = sh("(echo through-the-pipe > a1/pipe &) ; cat a1/pipe", cwd=m.mp)
    assert r.stdout == "through-the-pipe\n"
    path = str(m / "a1/sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli.connect(path)
    conn, _ = srv.accept()
    cli.sendall(b"hi")
    assert conn.recv(2) == b"hi"
    for s in (conn, cli, srv):
        s.close()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    os.unlink(path)
    os.unlink(m / "a1/pipe")
    for call, want in ((lambda: os.mkfifo(m / "a1/config.json"), errno.EPERM),
                       (lambda: os.mknod(m / "a1/dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3)), errno.EPERM),
                       (lambda: os.mkfifo(m / "@history/p"), errno.EROFS)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == want
    assert sorted(os.listdir(m / "a1")) == []
