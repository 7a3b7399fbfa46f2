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
from agentstatefs.fs.access import parse_acl
from agentstatefs.fs.errors import FsError

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
    rc, out, err = in_child_as(NOBODY, NOBODY, lambda: cli_main(["fsck", "--repo", str(m.repo)]))
    assert rc == 1 and "private to the daemon's user" in err, err


# -- access control on the mount, as another uid ----------------------------------------------

def audit_lines(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def wait_audit(path: Path, pred) -> list[dict]:
    """The audit log is written by its own thread: wait until a line matches."""
    for _ in range(500):
        lines = audit_lines(path)
        if any(pred(x) for x in lines):
            return lines
        time.sleep(0.01)
    raise AssertionError(f"no matching audit line in {audit_lines(path)}")


def commit_of(path: Path) -> str:
    return os.getxattr(path, "user.agentstatefs.commit").decode()


@pytest.fixture
def secmount(pub):
    base_audit = []

    def make(*opts):
        m = pub()
        audit = m.base / "audit.jsonl"
        base_audit.append(audit)
        m.start("allow_other", f"audit={audit}", *opts)
        m.audit = audit
        return m
    return make


def test_denied_live_and_in_both_history_forms_after_chmod(secmount):
    m = secmount()
    os.mkdir(m / "a1")
    cfg = m / "a1" / "config.json"
    cfg.write_text('{"secret": 1}')
    c1 = commit_of(cfg)
    r = as_user(f"cat {cfg}")
    assert r.returncode == 0 and "secret" in r.stdout          # 0644: readable
    os.chmod(cfg, 0o600)
    for path in (cfg, m / "@history" / c1 / "a1" / "config.json", m / "a1" / "@history" / c1 / "config.json",
                 m / "@history" / "HEAD~1" / "a1" / "config.json"):
        r = as_user(f"cat {path}")
        assert r.returncode != 0 and "secret" not in r.stdout, path
        assert "Permission denied" in r.stderr
    # xattrs of the past version too
    r = as_user(f"getfattr -n user.agentstatefs.version {m / '@history' / c1 / 'a1' / 'config.json'}")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # access(2) answers the same
    assert as_user(f"test -r {cfg}").returncode == 1
    assert as_user(f"test -r {m / 'a1'}").returncode == 0
    lines = wait_audit(m.audit, lambda x: x["result"] == "denied" and x["path"] == "/a1/config.json")
    d = next(x for x in lines if x["result"] == "denied" and x["path"] == "/a1/config.json")
    assert d["uid"] == NOBODY and d["gid"] == NOBODY and d["op"] == "open" and d["errno"] == "EACCES"
    assert d["command"] == "cat" and d["pid"] > 0
    assert any(x["result"] == "denied" and x["path"] == f"/@history/{c1}/a1/config.json" for x in lines)
    ok = [x for x in lines if x["result"] == "ok"]
    assert [x["op"] for x in ok][:3] == ["mkdir", "write", "chmod"] and ok[2]["uid"] == 0


def test_agent_dir_mode_guards_its_files_and_history(secmount):
    m = secmount()
    os.mkdir(m / "a1")
    (m / "a1" / "memory.json").write_text('{"m": "hidden"}')
    c1 = commit_of(m / "a1" / "memory.json")
    os.chmod(m / "a1", 0o700)
    for cmd in (f"cat {m.mp}/a1/memory.json", f"ls {m.mp}/a1", f"cat {m.mp}/@history/{c1}/a1/memory.json",
                f"ls {m.mp}/@history/{c1}/a1", f"cat {m.mp}/a1/@history/{c1}/memory.json"):
        r = as_user(cmd)
        assert r.returncode != 0 and "hidden" not in r.stdout, cmd
    os.chmod(m / "a1", 0o755)
    r = as_user(f"cat {m.mp}/@history/{c1}/a1/memory.json")
    assert r.returncode == 0 and "hidden" in r.stdout
    # the past agent dir counts too: a version from when the directory was 0700
    (m / "a1" / "memory.json").write_text('{"m": "v2"}')
    os.chmod(m / "a1", 0o700)
    (m / "a1" / "memory.json").write_text('{"m": "v3 made while private"}')
    c3 = commit_of(m / "a1" / "memory.json")
    os.chmod(m / "a1", 0o755)
    r = as_user(f"cat {m.mp}/@history/{c3}/a1/memory.json")
    assert r.returncode != 0 and "private" not in r.stdout
    assert "v3" in as_user(f"cat {m.mp}/a1/memory.json").stdout


def test_acl_allows_then_denies_live_and_in_history(secmount):
    m = secmount()
    os.mkdir(m / "a1")
    cfg = m / "a1" / "runtime.json"
    mem = m / "a1" / "memory.json"
    mem.write_text('{"secret": 1}')
    c1 = commit_of(mem)
    os.chmod(mem, 0o600)
    assert as_user(f"cat {mem}").returncode != 0
    sh(f"setfacl -m u:{NOBODY}:r {mem}")
    r = as_user(f"cat {mem}")
    assert r.returncode == 0 and "secret" in r.stdout
    # the 0644 version: allowed then and (by the ACL) now
    assert "secret" in as_user(f"cat {m.mp}/@history/{c1}/a1/memory.json").stdout
    out = sh(f"getfacl -cp {mem}").stdout
    assert f"user:{NOBODY}:r--" in out or "user:nobody:r--" in out
    assert stat.S_IMODE(os.stat(mem).st_mode) == 0o640            # group bits show the mask
    # a version made while the file was 0600 without ACL stays closed ("those it had then")
    mem.write_text('{"secret": 2}')
    c2 = commit_of(mem)
    os.chmod(mem, 0o600)
    sh(f"setfacl -b {mem}")
    mem.write_text('{"secret": 3}')
    c3 = commit_of(mem)
    sh(f"setfacl -m u:{NOBODY}:r {mem}")
    assert "3" in as_user(f"cat {mem}").stdout
    r = as_user(f"cat {m.mp}/@history/{c3}/a1/memory.json")
    assert r.returncode != 0
    # setfacl denying: today's ACL closes history too, both forms
    sh(f"setfacl -m u:{NOBODY}:- {mem}")
    for p in (mem, f"{m.mp}/@history/{c2}/a1/memory.json", f"{m.mp}/a1/@history/{c2}/memory.json",
              f"{m.mp}/@history/{c1}/a1/memory.json"):
        r = as_user(f"cat {p}")
        assert r.returncode != 0 and "secret" not in r.stdout, p
    wait_audit(m.audit, lambda x: x["uid"] == NOBODY and x["result"] == "denied"
               and x["path"] == f"/@history/{c1}/a1/memory.json")
    assert any(x["op"] == "setfacl" and x["result"] == "ok" for x in audit_lines(m.audit))
    # runtime.json takes ACLs too (RAM, like its mode)
    cfg.write_text('{"r": 1}')
    os.chmod(cfg, 0o600)
    assert as_user(f"cat {cfg}").returncode != 0
    sh(f"setfacl -m u:{NOBODY}:r {cfg}")
    assert as_user(f"cat {cfg}").returncode == 0


def test_acls_versioned_survive_remount_and_default_acl_inherited(secmount):
    m = secmount()
    os.mkdir(m / "a1")
    sh(f"setfacl -m u:{NOBODY}:rx {m.mp}/a1")
    sh(f"setfacl -d -m u:{NOBODY}:r,o::- {m.mp}/a1")
    (m / "a1" / "config.json").write_text('{"c": 1}')            # created under the default ACL
    acl = sh(f"getfacl -cpn {m.mp}/a1/config.json").stdout
    assert f"user:{NOBODY}:r--" in acl and "other::---" in acl, acl
    os.chmod(m / "a1", 0o750)          # others out; the ACL (within the mask r-x) lets nobody in
    assert as_user(f"cat {m.mp}/a1/config.json").returncode == 0
    assert as_user(f"ls {m.mp}/a1").returncode == 0
    os.chmod(m / "a1", 0o700)          # mask ---: the named entry no longer counts (POSIX)
    assert as_user(f"ls {m.mp}/a1").returncode != 0
    os.chmod(m / "a1", 0o750)
    meta = json.loads(m.git("show", f"main:{m.tree_path('a1', 'meta.json')}"))
    assert meta.get("default_acl") and meta.get("acl") and meta["files"]["config.json"].get("acl")
    m.stop()
    m.start("allow_other", f"audit={m.audit}")
    acl = sh(f"getfacl -cpn {m.mp}/a1/config.json").stdout
    assert f"user:{NOBODY}:r--" in acl
    assert f"default:user:{NOBODY}:r--" in sh(f"getfacl -cpn {m.mp}/a1").stdout
    assert as_user(f"cat {m.mp}/a1/config.json").returncode == 0
    # restored with the agent: cp -a out of history keeps ACLs
    c = commit_of(m / "a1" / "config.json")
    sh(f"rm -r {m.mp}/a1")
    sh(f"cp -a {m.mp}/@history/{c}/a1 {m.mp}/")
    acl = sh(f"getfacl -cpn {m.mp}/a1/config.json").stdout
    assert f"user:{NOBODY}:r--" in acl, acl
    assert as_user(f"cat {m.mp}/a1/config.json").returncode == 0


def test_hostile_acl_xattrs_refused(secmount):
    m = secmount()
    os.mkdir(m / "a1")
    f = m / "a1" / "config.json"
    f.write_text("{}")
    import struct
    good = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, 0xFFFFFFFF) for t, p in ((1, 6), (4, 4), (0x20, 4)))
    bad = [b"\x02\x00\x00", struct.pack("<I", 3) + good[4:], good + b"\x00",
           good + struct.pack("<HHI", 0x40, 4, 0), good + struct.pack("<HHI", 2, 9, 5),
           good + struct.pack("<HHI", 2, 4, 5),                  # named entry without mask
           good + struct.pack("<HHI", 0x10, 4, 0) + struct.pack("<HHI", 2, 4, 5) * 2,   # duplicate
           struct.pack("<I", 2) + struct.pack("<HHI", 1, 6, 0) * 3]
    for value in bad:
        with pytest.raises(OSError) as e:
            os.setxattr(f, "system.posix_acl_access", value)
        assert e.value.errno in (22, 95), value        # the kernel may refuse first (EINVAL)
        with pytest.raises(FsError) as e:      # what the kernel lets through meets our parser too
            parse_acl(value)
        assert e.value.errno == 22
    os.setxattr(f, "system.posix_acl_access", good)
    assert json.loads(f.read_text()) == {}
    with pytest.raises(FsError):
        parse_acl(struct.pack("<I", 2) + struct.pack("<HHI", 2, 4, 7) * 2000)     # too many entries
    with pytest.raises(OSError) as e:
        os.setxattr(f, "system.posix_acl_default", good)
    assert e.value.errno == 13                                   # default ACL on a file: EACCES


def test_root_mode_1777_lets_users_create_agents_sticky(secmount):
    m = secmount("root_mode=1777")
    assert stat.S_IMODE(os.stat(m.mp).st_mode) == 0o1777
    r = as_user(f"mkdir {m.mp}/mine && echo '{{\"a\": 1}}' > {m.mp}/mine/config.json", umask="027")
    assert r.returncode == 0, r.stderr
    st = os.stat(m / "mine")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o750)
    st = os.stat(m / "mine" / "config.json")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)
    assert m.git("log", "-1", "--format=%an").startswith("bash (uid 65534")
    # another user may not read it, nor remove it (sticky), nor take it over
    r = as_user(f"cat {m.mp}/mine/config.json", uid=4321, gid=4321)
    assert r.returncode != 0
    r = as_user(f"rmdir {m.mp}/mine", uid=4321, gid=4321)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    os.mkdir(m / "roots")
    r = as_user(f"rmdir {m.mp}/roots")
    assert r.returncode != 0 and os.path.isdir(m / "roots")
    # the owner: chmod, chgrp to a group it is in, not chown
    r = as_user(f"chmod 755 {m.mp}/mine && chmod 644 {m.mp}/mine/config.json")
    assert r.returncode == 0, r.stderr
    r = as_user(f"chown 0 {m.mp}/mine/config.json")
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    r = as_user(f"chgrp 4242 {m.mp}/mine/config.json", groups="4242")
    assert r.returncode == 0, r.stderr
    r = as_user(f"chgrp 4243 {m.mp}/mine/config.json", groups="4242")
    assert r.returncode != 0
    m.stop()
    m.start("allow_other", "root_mode=1777", f"audit={m.audit}")
    st = os.stat(m / "mine" / "config.json")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, 4242, 0o644)
    assert stat.S_IMODE(os.stat(m / "mine").st_mode) == 0o755
    r = as_user(f"rmdir {m.mp}/mine 2>&1; rm -r {m.mp}/mine")
    assert r.returncode == 0 and not os.path.exists(m / "mine"), r.stderr
    wait_audit(m.audit, lambda x: x["op"] == "rmdir" and x["path"] == "/mine" and x["uid"] == NOBODY)


def test_default_root_mode_and_noop_root_changes(secmount, tmp_path):
    m = secmount()
    st = os.stat(m.mp)
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == os.getuid()
    r = as_user(f"mkdir {m.mp}/x")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # tar -x into the mount: a no-op chown/chmod of the root succeeds
    src = tmp_path / "src"
    (src / "a1").mkdir(parents=True)
    (src / "a1" / "config.json").write_text('{"t": 1}')
    os.chmod(src, 0o755)
    sh(f"tar -C {src} -cf {tmp_path}/a.tar .")
    r = sh(f"tar -C {m.mp} -xpf {tmp_path}/a.tar", check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads((m / "a1" / "config.json").read_text()) == {"t": 1}


def test_admin_group_reads_and_writes_everything(secmount):
    m = secmount("admin_group=4242")
    os.mkdir(m / "a1", 0o700)
    os.chmod(m / "a1", 0o700)
    (m / "a1" / "config.json").write_text('{"secret": 1}')
    os.chmod(m / "a1" / "config.json", 0o600)
    c1 = commit_of(m / "a1" / "config.json")
    r = as_user(f"cat {m.mp}/a1/config.json", uid=4321, gid=4321)
    assert r.returncode != 0
    r = as_user(f"cat {m.mp}/a1/config.json {m.mp}/@history/{c1}/a1/config.json && "
                f"echo '{{\"by\": \"admin\"}}' > {m.mp}/a1/config.json", uid=4321, gid=4321, groups="4242")
    assert r.returncode == 0 and r.stdout.count("secret") == 2, r.stderr
    assert json.loads((m / "a1" / "config.json").read_text()) == {"by": "admin"}


def test_audit_reads_and_sighup_reopen(secmount):
    m = secmount("audit_reads")
    os.mkdir(m / "a1")
    (m / "a1" / "config.json").write_text("{}")
    assert as_user(f"cat {m.mp}/a1/config.json").returncode == 0
    wait_audit(m.audit, lambda x: x["op"] == "read" and x["uid"] == NOBODY and x["path"] == "/a1/config.json")
    os.rename(m.audit, str(m.audit) + ".1")
    m.proc.send_signal(1)   # SIGHUP, as logrotate's postrotate does
    for _ in range(500):
        (m / "a1" / "memory.json").write_text('{"n": %d}' % _)
        if m.audit.exists():
            break
        time.sleep(0.01)
    wait_audit(m.audit, lambda x: x["op"] == "write" and x["path"] == "/a1/memory.json")
    assert m.proc.poll() is None


def test_audit_full_disk_drops_and_counts(tmp_path, caplog):
    from agentstatefs.fs.audit import AuditLog
    from agentstatefs.fs.changes import Who
    a = AuditLog("/dev/full")
    for i in range(100):
        a.record(Who(1, 1, 1, "x"), "write", f"/a/{i}")
    a.close()
    assert a.dropped == 100 and a.written == 0
    assert sum("dropping audit lines" in r.getMessage() for r in caplog.records) == 1
    b = AuditLog(str(tmp_path / "q.jsonl"), queue_max=10)
    b._q.put_nowait(None)
    for i in range(1000):     # never waits, whatever the writer thread does
        b.record(Who(1, 1, 1, "x\n\x1b[31m"), "write", "/a/\udcff\n")
    b.close()
    lines = (tmp_path / "q.jsonl").read_text().splitlines()
    assert b.written + b.dropped == 1000 and len(lines) == b.written
    assert all("\n" not in json.loads(x)["command"] for x in lines)
