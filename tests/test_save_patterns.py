"""The save patterns of everyday tools, run for real on a real mount (issue 12).

Each save must be exactly one commit (zero when the new content is refused), and the
file must never be absent: neither afterwards nor, for the backup-by-rename editors,
to another process reading it while the save runs. The programs are the real ones
(vim, emacs, nano, sed, install, tar, rsync, cp, python); strace shows that the
pattern under test really happened (vim renames the file away only outside /tmp,
where 'backupskip' does not apply, so these mounts live under /var/tmp).
"""

import errno
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mounting import Mount  # noqa: E402

for tool in ("vim", "emacs", "nano", "rsync", "strace", "tar", "install", "sed"):
    if shutil.which(tool) is None:
        raise RuntimeError(f"tests/test_save_patterns.py needs {tool}: run .ci/setup")


@pytest.fixture
def base():
    d = Path(tempfile.mkdtemp(prefix="asfs-save-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def vm(base):
    """A mount outside /tmp, with agent a1 holding config.json = {"v": 1}."""
    m = Mount(base, "m")
    try:
        m.start()
        os.mkdir(m / "a1")
        (m / "a1/config.json").write_text('{"v": 1}\n')
        os.chmod(m / "a1/config.json", 0o644)
        yield m
    finally:
        m.cleanup()


def env(base: Path) -> dict:
    home = base / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home), "TERM": "xterm"}


def run(cmd, base, check=True, trace=None, **kw):
    """Run a real program (optionally under strace, syscalls named in ``trace``)."""
    if trace:
        out = base / "strace.out"
        cmd = ["strace", "-f", "-qq", "-e", f"trace={trace}", "-o", str(out)] + list(cmd)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(base), **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stdout} {r.stderr}")
    r.trace = (base / "strace.out").read_text() if trace else ""
    return r


class Watcher:
    """Another process's view during a save: reads the file by name in a loop and
    records every failure (absent, or not one of the allowed contents)."""

    def __init__(self, path: Path, allowed: set):
        self.path, self.allowed = path, allowed
        self.reads, self.problems = 0, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.path.read_bytes()
            except OSError as e:
                self.problems.append(errno.errorcode.get(e.errno, e.errno))
                continue
            self.reads += 1
            if data not in self.allowed:
                self.problems.append(data)

    def __enter__(self):
        self._t.start()
        while self.reads == 0 and not self.problems and self._t.is_alive():
            time.sleep(0.001)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def commits_of(m: Mount, fn) -> list[str]:
    """The subjects of the commits ``fn`` made, oldest first."""
    n0 = m.commit_count()
    fn()
    n = m.commit_count() - n0
    return m.git("log", f"-{n}", "--format=%s").splitlines()[::-1] if n else []


OLD = b'{"v": 1}\n'


# -- vim ------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings,backup_left", [
    ([], False),                      # stock: writebackup, backupcopy=auto
    (["set backupcopy=no"], False),
    (["set backup"], True),
])
def test_vim_save_is_one_commit(vm, base, settings, backup_left):
    cfg = vm / "a1/config.json"
    args = ["vim", "-u", "DEFAULTS", "-N", "-es"]
    for s in settings:
        args += ["-c", s]
    args += ["-c", "%s/1/2/", "-c", "wq", str(cfg)]
    with Watcher(cfg, {OLD, b'{"v": 2}\n'}) as w:
        subjects = commits_of(vm, lambda: run(args, base, trace="rename,renameat,renameat2"))
    assert subjects == ["write a1/config.json (9 bytes)"]
    assert cfg.read_bytes() == b'{"v": 2}\n'
    assert w.problems == [] and w.reads > 0
    assert "config.json~" in last_trace(base)       # vim renamed the file away first
    backup = vm / "a1/config.json~"
    assert backup.exists() == backup_left
    if backup_left:
        assert backup.read_bytes() == OLD
        assert vm.git("log", "-1", "--format=%s").startswith("write")   # the backup is scratch
    assert oct(os.stat(cfg).st_mode & 0o777) == "0o644"


def last_trace(base: Path) -> str:
    return (base / "strace.out").read_text()


def test_vim_stock_renames_the_file_away_and_a_refused_save_keeps_it(vm, base):
    cfg = vm / "a1/config.json"
    vim = ["vim", "-u", "DEFAULTS", "-N", "-es"]
    run(vim + ["-c", "%s/1/2/", "-c", "wq", str(cfg)], base, trace="rename,renameat,renameat2")
    # The pattern really ran: the file went to the backup name and the new one was written.
    assert "config.json~" in last_trace(base)
    with Watcher(cfg, {b'{"v": 2}\n'}) as w:
        subjects = commits_of(vm, lambda: run(vim + ["-c", "%s/}/,/", "-c", "wq", str(cfg)], base,
                                              check=False, trace="rename,renameat,renameat2"))
    assert subjects == []
    assert cfg.read_bytes() == b'{"v": 2}\n'
    assert w.problems == []
    assert "config.json~" in last_trace(base)
    assert not (vm / "a1/config.json~").exists()
    # The refused content is kept where refused writes go.
    assert (vm / "a1/@rejected/config.json").read_bytes() == b'{"v": 2,\n'


# -- emacs ----------------------------------------------------------------------------------
EMACS_EDIT = """
(find-file (car command-line-args-left))
(goto-char (point-min))
(when (re-search-forward "%s" nil t) (replace-match "%s"))
(save-buffer)
"""


def emacs(base, path, find, repl, check=True):
    script = base / "edit.el"
    script.write_text(EMACS_EDIT % (find, repl))
    return run(["emacs", "-Q", "--batch", "-l", str(script), str(path)], base, check=check,
               trace="rename,renameat,renameat2,symlink,symlinkat,unlink,unlinkat")


def test_emacs_backup_by_rename_is_one_commit(vm, base):
    cfg = vm / "a1/config.json"
    with Watcher(cfg, {OLD, b'{"v": 2}\n'}) as w:
        subjects = commits_of(vm, lambda: emacs(base, cfg, "1", "2"))
    assert subjects == ["write a1/config.json (9 bytes)"]
    assert "config.json~" in last_trace(base)            # backup by rename happened
    # It locked the file with a symlink (a scratch symlink, RAM only) and removed it again.
    assert any("symlink" in line and '.#config.json") = 0' in line for line in last_trace(base).splitlines())
    assert w.problems == []
    assert cfg.read_bytes() == b'{"v": 2}\n'
    assert (vm / "a1/config.json~").read_bytes() == OLD  # emacs keeps its backup (scratch)
    assert not os.path.lexists(vm / "a1/.#config.json")  # the lock is gone again
    # A second save in a new session: the backup is renamed over again, still one commit.
    assert commits_of(vm, lambda: emacs(base, cfg, "2", "3")) == ["write a1/config.json (9 bytes)"]
    assert (vm / "a1/config.json~").read_bytes() == b'{"v": 2}\n'


def test_emacs_refused_save_keeps_the_file(vm, base):
    cfg = vm / "a1/config.json"
    with Watcher(cfg, {OLD}) as w:
        subjects = commits_of(vm, lambda: emacs(base, cfg, "}", ",", check=False))
    assert subjects == []
    assert w.problems == []
    assert cfg.read_bytes() == OLD


# -- nano -----------------------------------------------------------------------------------
def nano(base, path, keys: list[bytes], done: bytes):
    """Drive nano on a terminal: each key once the screen settled, then wait for exit."""
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execvpe("nano", ["nano", "--ignorercfiles", str(path)], env(base))
        finally:
            os._exit(127)
    screen = bytearray()

    def pump(until: bytes | None, limit=60.0):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], 0.05)
            if r:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                screen.extend(chunk)
            if until is not None and until in screen:
                return
            if until is None and not r:
                return
        raise AssertionError(f"nano: {until!r} never appeared: {bytes(screen[-2000:])!r}")

    try:
        pump(path.name.encode())
        for k in keys:
            os.write(fd, k)
            pump(None)
        pump(done)
        mark = len(screen)
        os.write(fd, b"\x18")                  # ^X (after a refused save nano asks first)
        answered = False
        end = time.monotonic() + 120
        while time.monotonic() < end:
            p, status = os.waitpid(pid, os.WNOHANG)
            if p:
                return os.waitstatus_to_exitcode(status), bytes(screen)
            pump(None)
            if not answered and b"Save modified buffer" in screen[mark:]:
                os.write(fd, b"n")
                answered = True
        raise AssertionError(f"nano did not exit: {bytes(screen[mark:])!r}")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_nano_save_is_one_commit_and_a_refused_one_none(vm, base):
    cfg = vm / "a1/config.json"
    # [ at the start, ] at the end of the line: [{"v": 1}]
    with Watcher(cfg, {OLD, b'[{"v": 1}]\n'}) as w:
        subjects = commits_of(vm, lambda: nano(base, cfg, [b"[", b"\x05", b"]", b"\x13"], b"Wrote"))
    assert subjects == ["write a1/config.json (11 bytes)"]
    assert cfg.read_bytes() == b'[{"v": 1}]\n'
    with Watcher(cfg, {b'[{"v": 1}]\n'}) as w2:
        subjects = commits_of(vm, lambda: nano(base, cfg, [b"x", b"\x13"], b"Invalid argument"))
    assert subjects == []
    assert cfg.read_bytes() == b'[{"v": 1}]\n'
    assert w.problems == [] and w2.problems == []


# -- sed, install, python -------------------------------------------------------------------
def test_sed_in_place(vm, base):
    cfg = vm / "a1/config.json"
    assert commits_of(vm, lambda: run(["sed", "-i", "s/1/2/", str(cfg)], base)) == \
        ["write a1/config.json (9 bytes)"]
    # sed sets the temp file's mode through a minimal ACL: the mode stays 0644.
    assert os.stat(cfg).st_mode & 0o777 == 0o644
    assert commits_of(vm, lambda: run(["sed", "-i", "s/}/,/", str(cfg)], base, check=False)) == []
    assert cfg.read_bytes() == b'{"v": 2}\n'


def test_install_over_a_state_file(vm, base):
    cfg = vm / "a1/config.json"
    good, bad = base / "good.json", base / "bad.json"
    good.write_text('{"installed": 1}\n')
    bad.write_text('{"installed": \n')
    os.chmod(cfg, 0o600)
    vm.commit_count()
    # install unlinks the file, creates it anew (O_EXCL) and writes it: one commit.
    with Watcher(cfg, {OLD, good.read_bytes()}) as w:
        subjects = commits_of(vm, lambda: run(["install", "-m", "600", str(good), str(cfg)], base,
                                              trace="unlink,unlinkat"))
    assert "config.json" in last_trace(base)
    assert subjects == ["write a1/config.json (17 bytes)"]
    assert w.problems == []
    # Invalid content: install fails, the previous version is still there, no commit.
    r = commits_of(vm, lambda: run(["install", "-m", "600", str(bad), str(cfg)], base, check=False))
    assert r == []
    assert cfg.read_bytes() == good.read_bytes()
    assert os.stat(cfg).st_mode & 0o777 == 0o600
    # With another final mode, install creates the file 0600 and chmods it after the
    # close: the write and the mode change are two versions (docs/decisions.md).
    subjects = commits_of(vm, lambda: run(["install", "-m", "644", str(bad), str(cfg)], base, check=False))
    assert subjects == [] and cfg.read_bytes() == good.read_bytes()
    good.write_text('{"installed": 2}\n')
    subjects = commits_of(vm, lambda: run(["install", "-m", "644", str(good), str(cfg)], base))
    assert subjects == ["write a1/config.json (17 bytes)", "chmod a1/config.json"]
    assert os.stat(cfg).st_mode & 0o777 == 0o644


def test_python_tempfile_and_replace(vm, base):
    cfg = vm / "a1/config.json"
    prog = ("import json, os, sys, tempfile\n"
            "fd, tmp = tempfile.mkstemp(dir=os.path.dirname(sys.argv[1]))\n"
            "os.write(fd, sys.argv[2].encode()); os.close(fd)\n"
            "os.replace(tmp, sys.argv[1])\n")
    with Watcher(cfg, {OLD, b'{"py": 1}'}) as w:
        assert commits_of(vm, lambda: run([sys.executable, "-c", prog, str(cfg), '{"py": 1}'], base)) == \
            ["write a1/config.json (9 bytes)"]
    r = []
    assert commits_of(vm, lambda: r.append(run([sys.executable, "-c", prog, str(cfg), '{"py"'], base,
                                                check=False))) == []
    assert r[0].returncode != 0 and "Invalid argument" in r[0].stderr
    assert cfg.read_bytes() == b'{"py": 1}'
    assert w.problems == []


# -- cp -a, tar, rsync ----------------------------------------------------------------------
def test_cp_a_keeps_times_and_copies_once(vm, base):
    src = base / "src.json"
    src.write_text('{"cp": 1}\n')
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    cfg = vm / "a1/config.json"
    assert commits_of(vm, lambda: run(["cp", "-a", str(src), str(cfg)], base)) == \
        ["write a1/config.json (10 bytes)"]
    st = os.stat(cfg)
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert st.st_atime_ns == 1_600_000_000_000_000_000       # the atime cp -a found and set
    # Again: same bytes, same mtime: nothing to commit (reading src moved its atime: an
    # access time alone is not a new version).
    assert commits_of(vm, lambda: run(["cp", "-a", str(src), str(cfg)], base)) == []


def tree(base: Path, name: str, files: dict) -> Path:
    root = base / name
    for rel, (data, mtime) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, 0o644)
        os.utime(p, (mtime, mtime))
    return root


def test_tar_extract_over_existing_files(vm, base):
    (vm / "a1/memory.json").write_text("[]\n")
    src = tree(base, "src", {"a1/config.json": (b'{"tar": 1}\n', 1_500_000_000),
                             "a1/memory.json": (b'[1]\n', 1_500_000_100)})
    os.chmod(src / "a1", 0o755)
    archive = base / "a.tar"
    run(["tar", "-c", "-f", str(archive), "-C", str(src), "."], base)
    subjects = commits_of(vm, lambda: run(["tar", "-x", "-f", str(archive), "-C", str(vm.mp)], base,
                                          trace="unlink,unlinkat"))
    assert sorted(subjects) == ["write a1/config.json (11 bytes)", "write a1/memory.json (4 bytes)"]
    assert "a1/config.json" in last_trace(base)       # tar removed the old files first
    assert os.stat(vm / "a1/config.json").st_mtime == 1_500_000_000
    # Again: the same files and times, nothing to commit, and tar still exits 0.
    assert commits_of(vm, lambda: run(["tar", "-x", "-f", str(archive), "-C", str(vm.mp)], base)) == []
    # Round trip out of the mount and back into another agent.
    os.mkdir(vm / "a2")
    r = subprocess.run(f"tar -c -C {vm.mp}/a1 config.json memory.json | tar -x -C {vm.mp}/a2",
                       shell=True, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (vm / "a2/config.json").read_bytes() == b'{"tar": 1}\n'
    assert os.stat(vm / "a2/memory.json").st_mtime == 1_500_000_100


def test_rsync_twice_copies_nothing_the_second_time(base):
    m = Mount(base, "r")
    try:
        m.start()
        os.mkdir(m / "a1")
        src = tree(base, "src", {"a1/config.json": (b'{"rs": 1}\n', 1_400_000_000),
                                 "a1/memory.json": (b'["x"]\n', 1_400_000_050)})
        stats = lambda: run(["rsync", "-a", "--stats", f"{src}/", f"{m.mp}/"], base).stdout  # noqa: E731
        out = []
        subjects = commits_of(m, lambda: out.append(stats()))
        assert sorted(subjects) == ["write a1/config.json (10 bytes)", "write a1/memory.json (6 bytes)"]
        assert "Number of regular files transferred: 2" in out[0]
        for _ in range(2):
            out.clear()
            assert commits_of(m, lambda: out.append(stats())) == []
            assert "Number of regular files transferred: 0" in out[0]
            # The times rsync set are versioned: they survive a remount.
            m.stop()
            m.start()
        assert os.stat(m / "a1/config.json").st_mtime == 1_400_000_000
        meta = json.loads(m.git("show", f"main:{m.tree_path('a1', 'meta.json')}"))
        assert meta["files"]["config.json"]["mtime_ns"] == 1_400_000_000 * 10**9
        # touch -d on the state file itself: one "touch" commit, kept after remount.
        assert commits_of(m, lambda: run(["touch", "-d", "2001-02-03T04:05:06Z", str(m / "a1/config.json")],
                                         base)) == ["touch a1/config.json"]
        assert commits_of(m, lambda: run(["touch", "-d", "2001-02-03T04:05:06Z", str(m / "a1/config.json")],
                                         base)) == []
        m.stop()
        m.start()
        assert os.stat(m / "a1/config.json").st_mtime == 981173106
        assert (m / "a1/config.json").read_bytes() == b'{"rs": 1}\n'
    finally:
        m.cleanup()
