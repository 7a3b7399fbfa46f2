"""Mount and umount errors say the real reason (SPEC section 7): libfuse's and
fusermount3's own words in background mode, a repository the user cannot write, and
who holds a busy mount. The non-root cases run as another uid (fork + setuid), in a
private mount namespace whose /dev/fuse and /etc/fuse.conf the test controls."""

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pygit2
import pytest

from mounting import CLI

from agentstatefs.daemon import cli as agentstatefs_cli
from agentstatefs.daemon import mount as _mount  # noqa: F401  (loaded before the uid switch)

agentstatefs_cli.build_parser()   # imports every verb module now: after setuid the child may
                                  # not be able to read the interpreter's library directory
import traceback  # noqa: E402,F401

UID = 4242
CLONE_NEWNS = 0x00020000


def as_user_in_namespace(argv: list[str], tmp, dev_fuse_mode: int | None = None,
                         fuse_conf: str | None = None) -> tuple[int, str]:
    """Run ``agentstatefs ARGV`` as uid 4242 in a forked child, in a private mount
    namespace with a /dev/fuse node of ``dev_fuse_mode`` and an /etc/fuse.conf of
    ``fuse_conf`` bound over the real ones. Returns (exit code, stdout + stderr)."""
    with tempfile.TemporaryFile() as out:
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.unshare(CLONE_NEWNS) != 0:
                    raise OSError(ctypes.get_errno(), "unshare")
                run = lambda *c: subprocess.run(c, check=True, capture_output=True)  # noqa: E731
                run("mount", "--make-rprivate", "/")
                if dev_fuse_mode is not None:
                    devdir = tmp / "dev"
                    devdir.mkdir(exist_ok=True)
                    run("mount", "-t", "tmpfs", "-o", "mode=755", "none", str(devdir))
                    run("mknod", str(devdir / "fuse"), "c", "10", "229")
                    os.chmod(devdir / "fuse", dev_fuse_mode)
                    run("mount", "--bind", str(devdir / "fuse"), "/dev/fuse")
                if fuse_conf is not None:
                    conf = tmp / "fuse.conf"
                    conf.write_text(fuse_conf)
                    run("mount", "--bind", str(conf), "/etc/fuse.conf")
                os.setgroups([])
                os.setgid(UID)
                os.setuid(UID)
                os.environ["HOME"] = str(tmp / "home")
                for level in (pygit2.enums.ConfigLevel.GLOBAL, pygit2.enums.ConfigLevel.XDG,
                              pygit2.enums.ConfigLevel.SYSTEM):
                    pygit2.settings.search_path[level] = str(tmp / "home")
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                code = agentstatefs_cli.main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(errors="replace")


@pytest.fixture
def user_dirs():
    """A repository and mount point owned by the test user (under /tmp: pytest's own
    temp root is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="agentstatefs-user-", dir="/tmp"))
    os.chmod(base, 0o755)
    for d in ("home", "repo", "mp"):
        (base / d).mkdir()
        os.chown(base / d, UID, UID)
    yield base
    if os.path.ismount(base / "mp"):
        subprocess.run(["fusermount3", "-uz", str(base / "mp")], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("background", [True, False])
def test_dev_fuse_permission_denied_is_passed_through(user_dirs, background):
    t = user_dirs
    argv = ["mount", "--repo", str(t / "repo"), str(t / "mp")] + ([] if background else ["--foreground"])
    rc, out = as_user_in_namespace(argv, t, dev_fuse_mode=0o600)
    assert rc == 1, out
    assert "/dev/fuse: Permission denied" in out, out
    assert "fuse_session_mount failed" not in out and "Traceback" not in out
    assert not os.path.ismount(t / "mp")


@pytest.mark.parametrize("background", [True, False])
def test_allow_other_without_user_allow_other_is_passed_through(user_dirs, background):
    t = user_dirs
    argv = ["mount", "--repo", str(t / "repo"), str(t / "mp"), "-o", "allow_other"] \
        + ([] if background else ["--foreground"])
    rc, out = as_user_in_namespace(argv, t, dev_fuse_mode=0o666, fuse_conf="# mount_max = 1000\n")
    assert rc == 1, out
    assert "allow_other only allowed if 'user_allow_other' is set in /etc/fuse.conf" in out, out
    assert "add a line user_allow_other to /etc/fuse.conf" in out
    assert "Traceback" not in out
    assert not os.path.ismount(t / "mp")


@pytest.mark.parametrize("background", [True, False])
def test_unwritable_default_repository_suggests_own_repo(user_dirs, background):
    t = user_dirs
    rc, out = as_user_in_namespace(["mount"] + ([] if background else ["--foreground"]), t)
    assert rc == 1, out
    assert "--repo ~/agents" in out and "/var/lib/agentstatefs" in out, out
    assert "Traceback" not in out and out.count("\n") == 1, out
    # a repository created by another user (root) is refused the same way
    os.makedirs(t / "rootrepo/objects")
    rc, out = as_user_in_namespace(["mount", "--repo", str(t / "rootrepo"), str(t / "mp")], t)
    assert rc == 1 and "cannot use the repository" in out and "--repo ~/agents" in out, out


def test_busy_umount_names_what_holds_it(mounts):
    m = mounts().start()
    os.mkdir(m / "a1")
    (m / "a1/config.json").write_text('{"v": 1}')
    sleeper = subprocess.Popen(["sleep", "600"], cwd=m / "a1")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); "
                               "print('open', flush=True); time.sleep(600)", str(m / "a1/config.json")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        r = subprocess.run(CLI + ["umount", str(m.mp)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        err = r.stderr
        assert "busy" in err.lower(), err
        assert f"pid {sleeper.pid} (sleep): current directory" in err, err
        assert f"pid {holder.pid} (python" in err and f"open file {m.mp}/a1/config.json" in err, err
        assert err.count("\n") == 1
    finally:
        for p in (sleeper, holder):
            p.send_signal(signal.SIGKILL)
            p.wait()
    deadline = time.monotonic() + 30
    while True:   # the kernel lets go of the killed processes' references
        r = subprocess.run(CLI + ["umount", str(m.mp)], capture_output=True, text=True, timeout=60)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(m.mp)
