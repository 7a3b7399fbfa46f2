"""The foundation, used as users do: shell tools, Python file calls, other processes."""

import errno
import json
import mmap
import os
import subprocess

import pytest

from conftest import sh, unpack_to_loose


def read(p):
    with open(p, "rb") as f:
        return f.read()


def test_shell_tour(mnt):
    m = mnt.mp
    sh("mkdir a1 && echo '{\"model\": \"x\"}' > a1/config.json", cwd=m)
    assert json.loads(read(m / "a1/config.json")) == {"model": "x"}
    assert sh("ls", cwd=m).stdout.split() == ["a1"]
    assert sh("ls a1", cwd=m).stdout.split() == ["config.json"]
    st = os.stat(m / "a1/config.json")
    assert st.st_size == len(b'{"model": "x"}\n')
    # cp in, mv a temp file over the state file, jq round trip
    (mnt.base / "src.json").write_text('{"from": "cp"}')
    sh(f"cp {mnt.base}/src.json a1/memory.json", cwd=m)
    assert json.loads(read(m / "a1/memory.json")) == {"from": "cp"}
    sh("echo '{\"v\": 2}' > a1/tmp.json && mv a1/tmp.json a1/config.json", cwd=m)
    assert json.loads(read(m / "a1/config.json")) == {"v": 2}
    assert not (m / "a1/tmp.json").exists()
    sh("jq '.v = 3' a1/config.json > a1/t && mv a1/t a1/config.json", cwd=m)
    assert json.loads(read(m / "a1/config.json")) == {"v": 3}
    assert sorted(os.listdir(m / "a1")) == ["config.json", "memory.json"]
    # stat right after the rename reports the state file, not the old temp file
    st = os.stat(m / "a1/config.json")
    assert st.st_size == len(read(m / "a1/config.json"))
    assert mnt.git("log", "--format=%s").splitlines()[0].startswith("write a1/config.json")


def test_python_json_dump_and_one_commit_per_change(mnt):
    os.mkdir(mnt / "a1")
    before = mnt.commit_count()
    with open(mnt / "a1/memory.json", "w") as f:
        json.dump({"facts": list(range(100))}, f)
    assert mnt.commit_count() == before + 1
    assert json.load(open(mnt / "a1/memory.json")) == {"facts": list(range(100))}
    # identical content: no new commit
    with open(mnt / "a1/memory.json", "w") as f:
        json.dump({"facts": list(range(100))}, f)
    assert mnt.commit_count() == before + 1
    log = mnt.git("log", "-1", "--format=%an%n%ae%n%B")
    assert "uid 0" in log and "Agent: a1" in log and "Op: write" in log
    comm = open(f"/proc/{os.getpid()}/comm").read().strip()
    assert f"Command: {comm}" in log and f"Pid: {os.getpid()}" in log


def test_invalid_json_is_refused_and_loses_nothing(mnt):
    os.mkdir(mnt / "a1")
    (mnt / "a1/config.json").write_text('{"ok": true}')
    n = mnt.commit_count()
    f = open(mnt / "a1/config.json", "w")
    f.write('{"broken": ')
    with pytest.raises(OSError) as e:
        f.close()
    assert e.value.errno == errno.EINVAL
    assert json.loads(read(mnt / "a1/config.json")) == {"ok": True}
    assert mnt.commit_count() == n
    for bad in (b"\xff\xfe{}", b"NaN", b"{} {}", b"\xef\xbb\xbf{}", b""):
        with pytest.raises(OSError) as e:
            with open(mnt / "a1/config.json", "wb") as f:
                f.write(bad)
        assert e.value.errno == errno.EINVAL, bad
    assert json.loads(read(mnt / "a1/config.json")) == {"ok": True}
    assert mnt.commit_count() == n
    lines = [l for l in mnt.log().splitlines() if "a1/config.json" in l and "not committed" in l]
    assert lines and "invalid JSON" in lines[0] and "pid" in lines[0]
    # the daemon still serves
    (mnt / "a1/config.json").write_text('{"ok": 2}')
    assert json.loads(read(mnt / "a1/config.json")) == {"ok": 2}


def test_shell_redirect_first_flush_is_empty(mnt):
    # `echo > f` opens with O_TRUNC, dup2()s and closes the original fd first: that
    # flush sees an empty buffer and must not lose the later, complete one.
    os.mkdir(mnt / "a1")
    sh("echo '[1, 2, 3]' > a1/memory.json", cwd=mnt.mp)
    assert json.loads(read(mnt / "a1/memory.json")) == [1, 2, 3]
    assert "not committed" not in mnt.log()


def test_size_cap(mounts):
    m = mounts().start("max_size=1K")
    os.mkdir(m / "a1")
    (m / "a1/config.json").write_text('{"small": 1}')
    fd = os.open(m / "a1/config.json", os.O_WRONLY)
    with pytest.raises(OSError) as e:
        os.write(fd, json.dumps({"big": "x" * 2000}).encode())
    assert e.value.errno == errno.EFBIG
    os.close(fd)  # nothing was written: nothing to commit
    assert json.loads(read(m / "a1/config.json")) == {"small": 1}
    with pytest.raises(OSError) as e:
        os.truncate(m / "a1/config.json", 4096)
    assert e.value.errno == errno.EFBIG
    assert "exceeds" in m.log()


@pytest.mark.parametrize("bad", ["has space", ".hidden", "@history2", "x" * 129, "semi;colon", "ünï"])
def test_bad_agent_ids(mnt, bad):
    with pytest.raises(OSError) as e:
        os.mkdir(mnt / bad)
    assert e.value.errno == errno.EINVAL
    assert os.listdir(mnt.mp) == []
    assert "invalid agent id" in mnt.log() or "reserved" in mnt.log()


def test_good_agent_ids(mnt):
    for good in ["a", "A-1_b.c", "x" * 128, "0"]:
        os.mkdir(mnt / good)
    assert sorted(os.listdir(mnt.mp)) == sorted(["a", "A-1_b.c", "x" * 128, "0"])
    with pytest.raises(FileExistsError):
        os.mkdir(mnt / "a")


def test_reserved_and_top_level_names(mnt):
    os.mkdir(mnt / "a1")
    with pytest.raises(OSError) as e:
        open(mnt / "a1/@other", "w").close()
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:          # @patch is the patch directory (SPEC section 1)
        open(mnt / "a1/@patch", "w").close()
    assert e.value.errno == errno.EISDIR
    with pytest.raises(OSError) as e:
        os.mkdir(mnt / "a1/@x")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        open(mnt / "loose.json", "w").close()
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.mkdir(mnt / "a1/config.json")
    assert e.value.errno == errno.EINVAL
    assert os.listdir(mnt.mp) == ["a1"]


def test_truncate_append_pwrite(mnt):
    os.mkdir(mnt / "a1")
    p = mnt / "a1/config.json"
    p.write_bytes(b'{"a": 1}     ')
    sh(f"truncate -s 8 {p}")
    assert read(p) == b'{"a": 1}'
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(["truncate", "-s", "3", str(p)], check=True, capture_output=True)
    assert read(p) == b'{"a": 1}'
    # >> append: valid result commits, invalid result is refused
    sh(f"echo >> {p}")
    assert read(p) == b'{"a": 1}\n'
    with pytest.raises(OSError) as e:
        with open(p, "a") as f:
            f.write("{}")
    assert e.value.errno == errno.EINVAL
    assert read(p) == b'{"a": 1}\n'
    # pwrite at an offset and ftruncate on an open descriptor
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"2", 6)
    os.ftruncate(fd, 8)
    assert os.pread(fd, 100, 0) == b'{"a": 2}'  # the writer sees its own buffer
    assert read(p) == b'{"a": 1}\n'            # others see the last committed version
    os.close(fd)
    assert read(p) == b'{"a": 2}'
    # O_TRUNC then write
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"[]")
    os.close(fd)
    assert read(p) == b"[]"


def test_concurrent_writers_commit_their_own_content(mnt):
    os.mkdir(mnt / "a1")
    p = mnt / "a1/memory.json"
    f1, f2 = open(p, "w"), open(p, "w")
    f1.write('{"writer": 1, "pad": "' + "x" * 5000 + '"}')
    f2.write('{"writer": 2}')
    f1.flush(), f2.flush()
    f2.close()
    assert json.loads(read(p)) == {"writer": 2}
    f1.close()
    assert json.loads(read(p))["writer"] == 1
    path = mnt.tree_path("a1", "memory.json")
    versions = [json.loads(mnt.git("show", f"main~{i}:{path}"))["writer"] for i in (1, 0)]
    assert versions == [2, 1]


def test_unlink_rmdir_and_rm_r_are_commits(mnt):
    sh("mkdir a1 a2 && echo '{}' > a1/config.json && echo '[]' > a1/memory.json && echo '{}' > a1/runtime.json"
       " && touch a1/scratch.tmp", cwd=mnt.mp)
    n = mnt.commit_count()
    os.unlink(mnt / "a1/config.json")
    assert mnt.commit_count() == n + 1
    assert mnt.git("log", "-1", "--format=%s").startswith("delete a1/config.json")
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "a1")
    assert e.value.errno == errno.ENOTEMPTY
    sh("rm -r a1", cwd=mnt.mp)
    assert os.listdir(mnt.mp) == ["a2"]
    subjects = mnt.git("log", "--format=%s").splitlines()
    assert subjects[0] == "rmdir a1/" and subjects[1].startswith("delete a1/memory.json")
    os.rmdir(mnt / "a2")
    assert os.listdir(mnt.mp) == []


def test_open_to_close_isolation(mnt):
    os.mkdir(mnt / "a1")
    p = mnt / "a1/config.json"
    p.write_text('{"v": 1}')
    w = open(p, "r+")
    w.seek(0)
    w.write('{"v": 2}')
    w.flush()  # reaches the daemon's buffer, not committed
    assert read(p) == b'{"v": 1}'
    w.close()
    assert read(p) == b'{"v": 2}'


def test_scratch_files_behave_like_tmpfs(mnt):
    os.mkdir(mnt / "a1")
    d = mnt / "a1"
    os.mkdir(d / "work")
    (d / "work/notes.txt").write_text("hello")
    os.rename(d / "work/notes.txt", d / "work/renamed.txt")
    assert (d / "work/renamed.txt").read_text() == "hello"
    os.chmod(d / "work/renamed.txt", 0o600)
    assert os.stat(d / "work/renamed.txt").st_mode & 0o777 == 0o600
    with open(d / "blob.bin", "w+b") as f:
        f.truncate(8192)
        mm = mmap.mmap(f.fileno(), 8192)
        mm[100:105] = b"mmapd"
        mm.flush()
        mm.close()
    assert read(d / "blob.bin")[100:105] == b"mmapd"
    # sed -i and editor-style temp + rename onto the state file
    (d / "config.json").write_text('{"name": "old"}')
    sh("sed -i 's/old/new/' a1/config.json", cwd=mnt.mp)
    assert json.loads(read(d / "config.json")) == {"name": "new"}
    # scratch is never versioned
    assert "notes" not in mnt.git("log", "--all", "--stat")
    sh("rm -r a1/work a1/blob.bin", cwd=mnt.mp)


def test_scratch_cap(mounts):
    m = mounts().start("scratch_max=64K")
    os.mkdir(m / "a1")
    with pytest.raises(OSError) as e:
        with open(m / "a1/big.tmp", "wb") as f:
            f.write(b"x" * 100_000)
    assert e.value.errno == errno.ENOSPC
    os.unlink(m / "a1/big.tmp")
    (m / "a1/ok.tmp").write_bytes(b"y" * 1000)  # space came back


def test_rename_invalid_temp_onto_state_file_is_refused(mnt):
    os.mkdir(mnt / "a1")
    (mnt / "a1/config.json").write_text('{"keep": 1}')
    (mnt / "a1/t").write_text("not json")
    with pytest.raises(OSError) as e:
        os.rename(mnt / "a1/t", mnt / "a1/config.json")
    assert e.value.errno == errno.EINVAL
    assert json.loads(read(mnt / "a1/config.json")) == {"keep": 1}
    assert (mnt / "a1/t").read_text() == "not json"


def test_mv_state_files(mnt):
    os.mkdir(mnt / "a1")
    os.mkdir(mnt / "a2")
    (mnt / "a1/config.json").write_text('{"c": 1}')
    os.rename(mnt / "a1/config.json", mnt / "a1/memory.json")
    assert os.listdir(mnt / "a1") == ["memory.json"]
    assert mnt.git("log", "-1", "--format=%s").startswith("rename a1/config.json -> memory.json")
    sh("mv a1/memory.json a2/config.json && mv a2/config.json a2/backup.json", cwd=mnt.mp)  # EXDEV -> copy
    assert os.listdir(mnt / "a1") == [] and os.listdir(mnt / "a2") == ["backup.json"]
    sh("mv a2 a3", cwd=mnt.mp)
    assert sorted(os.listdir(mnt.mp)) == ["a1", "a3"]


def test_runtime_is_ram_only(mnt):
    os.mkdir(mnt / "a1")
    marker = "runtime-marker-6f1d2c"
    for i in range(15):
        (mnt / "a1/runtime.json").write_text(json.dumps({"m": marker, "i": i}))
    assert json.loads(read(mnt / "a1/runtime.json"))["i"] == 14
    objs = subprocess.run(["git", "-C", str(mnt.repo), "cat-file", "--batch-all-objects", "--batch"],
                          capture_output=True).stdout
    assert marker.encode() not in objs
    for root, _, files in os.walk(mnt.repo):
        for name in files:
            assert marker.encode() not in read(os.path.join(root, name)), name
    with pytest.raises(OSError) as e:
        with open(mnt / "a1/runtime.json", "w") as f:
            f.write("{")
    assert e.value.errno == errno.EINVAL


def test_restart_keeps_durable_state_and_drops_runtime(mounts):
    m = mounts().start()
    sh("mkdir a1 && echo '{\"c\": 1}' > a1/config.json && echo '{\"m\": 1}' > a1/memory.json"
       " && echo '{\"r\": 1}' > a1/runtime.json && echo '{\"c\": 2}' > a1/config.json", cwd=m.mp)
    ino = os.stat(m / "a1/config.json").st_ino
    assert m.stop() == 0
    assert not os.path.ismount(m.mp)
    m.start()
    assert json.loads(read(m / "a1/config.json")) == {"c": 2}
    assert json.loads(read(m / "a1/memory.json")) == {"m": 1}
    assert not (m / "a1/runtime.json").exists()
    assert os.stat(m / "a1/config.json").st_ino == ino
    subjects = m.git("log", "--format=%s").splitlines()
    assert subjects == ["write a1/config.json (9 bytes)", "write a1/memory.json (9 bytes)",
                        "write a1/config.json (9 bytes)", "mkdir a1/"]
    fsck = subprocess.run(["git", "-C", str(m.repo), "fsck", "--full", "--strict"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr


def test_sigint_also_unmounts_cleanly(mounts):
    import signal
    m = mounts().start()
    os.mkdir(m / "a1")
    assert m.stop(signal.SIGINT) == 0
    assert not os.path.ismount(m.mp)


def test_handler_exception_does_not_kill_daemon(mounts):
    m = mounts().start()
    sh("mkdir a1 a2 && echo '{\"secret\": 1}' > a1/config.json && echo '{}' > a2/config.json", cwd=m.mp)
    blob = m.git("rev-parse", "main:" + m.tree_path("a1", "config.json")).strip()
    m.stop()
    unpack_to_loose(m.repo)
    obj = m.repo / "objects" / blob[:2] / blob[2:]
    os.chmod(obj, 0o644)
    obj.write_bytes(b"garbage, not zlib")
    m.start()
    with pytest.raises(OSError) as e:
        read(m / "a1/config.json")
    assert e.value.errno == errno.EIO
    assert "Traceback" in m.log()
    assert read(m / "a2/config.json") == b"{}\n"  # still serving


def test_second_mount_of_same_repo_is_refused(mounts):
    a = mounts("a").start()
    b = mounts("b", repo=a.repo)
    b.start(wait=False)
    assert b.proc.wait(timeout=30) == 1
    assert "already in use" in b.log()
    assert os.path.ismount(a.mp) and not os.path.ismount(b.mp)


def test_stale_mount_is_cleaned_up(mounts):
    m = mounts().start()
    sh("mkdir a1 && echo '{\"x\": 1}' > a1/config.json", cwd=m.mp)
    m.kill9()
    with pytest.raises(OSError) as e:
        os.statvfs(m.mp)
    assert e.value.errno == errno.ENOTCONN
    m.start()
    assert json.loads(read(m / "a1/config.json")) == {"x": 1}
    assert "stale FUSE mount" in m.log()


def test_readonly_mount(mounts):
    m = mounts().start()
    sh("mkdir a1 && echo '{}' > a1/config.json", cwd=m.mp)
    m.stop()
    m.start("ro")
    assert read(m / "a1/config.json") == b"{}\n"
    for action in (lambda: open(m / "a1/config.json", "w"), lambda: os.mkdir(m / "a2"),
                   lambda: os.unlink(m / "a1/config.json")):
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno == errno.EROFS


def test_background_mount_and_umount_cli(tmp_path):
    from mounting import CLI
    repo, mp = tmp_path / "repo", tmp_path / "mnt"
    r = subprocess.run(CLI + ["mount", "--repo", str(repo), str(mp), "-o", "fsname=bgtest"],
                       capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mp)
        assert "bgtest" in open("/proc/mounts").read()
        assert "fuse.agentstatefs" in open("/proc/mounts").read()
        pid = int(os.getxattr(mp, "user.agentstatefs.pid"))
        os.mkdir(mp / "a1")
        (mp / "a1/config.json").write_text("{}")
        busy = open(mp / "a1/config.json")
        r = subprocess.run(CLI + ["umount", str(mp)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "busy" in r.stderr.lower()
        busy.close()
        r = subprocess.run(CLI + ["umount", str(mp)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not os.path.ismount(mp)
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
        assert "mounted" in (repo / "agentstatefs/daemon.log").read_text()
    finally:
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-uz", str(mp)])


def test_bad_options_and_unusable_repo(tmp_path):
    from mounting import CLI
    r = subprocess.run(CLI + ["mount", "--foreground", "--repo", str(tmp_path / "r"), str(tmp_path / "m"),
                              "-o", "bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown mount option 'bogus'" in r.stderr
    notrepo = tmp_path / "notrepo"
    (notrepo / "objects").mkdir(parents=True)
    r = subprocess.run(CLI + ["mount", "--foreground", "--repo", str(notrepo), str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot open git repository" in r.stderr
    assert not os.path.ismount(tmp_path / "m")


def test_other_uid_is_denied(mounts):
    m = mounts().start("allow_other")
    sh("mkdir a1 && echo '{\"secret\": 1}' > a1/config.json && chmod 600 a1/config.json", cwd=m.mp)
    r = subprocess.run(["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", "cat", str(m / "a1/config.json")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = subprocess.run(["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", "mkdir", str(m / "a9")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert m.git("log", "-1", "--format=%s").startswith("chmod a1/config.json")


def test_ls_l_shows_true_attributes_of_agents_not_yet_loaded(mounts):
    m = mounts().start()
    sh("mkdir a1 a2 && chmod 700 a1 && chown 4242:4343 a2", cwd=m.mp)
    m.stop()
    m.start()  # cold caches: readdir lists agents without loading them
    out = sh("ls -ln", cwd=m.mp).stdout.splitlines()
    rows = {line.split()[-1]: line.split() for line in out if line.startswith("d")}
    assert rows["a1"][0] == "drwx------" and rows["a2"][2:4] == ["4242", "4343"]
    assert os.stat(m / "a1").st_mode & 0o777 == 0o700
