"""A failed journal fdatasync must never let the refused group become durable later.

In-process: a real Journal in a temp dir with ``os.fdatasync`` (and ``os.ftruncate``)
monkeypatched to fail. On a real mount: an LD_PRELOAD shim (tests/faultinject/failsync.c)
makes exactly one fdatasync of the daemon's journal fail with EIO; no test hook exists
in the production code.

Reusable fixture: ``failsync`` (below) builds the shim with gcc into the test's tmp_path
and returns a ``FailSync``; start a mount with ``m.start(..., env=failsync.env())`` and
call ``failsync.arm()`` right before the operation whose sync must fail.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentstatefs.fs.journal import Journal

FAULTINJECT = Path(__file__).parent / "faultinject"


# -- in-process -------------------------------------------------------------------

def records(directory) -> list[tuple[int, bytes]]:
    """What a fresh process (recovery) reads back."""
    return list(Journal(str(directory)).read_after(0))


def all_bytes(directory) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file())


def fail_once(monkeypatch, name: str, err: int = errno.EIO) -> list:
    """Make ``os.<name>`` raise OSError(err) on its next call only; returns the call log."""
    real = getattr(os, name)
    calls = []

    def fake(*args):
        calls.append(args)
        if len(calls) == 1:
            raise OSError(err, os.strerror(err))
        return real(*args)
    monkeypatch.setattr(os, name, fake)
    return calls


def test_failed_fdatasync_discards_the_group_and_continues_in_a_new_segment(tmp_path, monkeypatch, caplog):
    d = tmp_path / "journal"
    j = Journal(str(d))
    assert j.append([b"a", b"b"]) == [1, 2]
    j.sync()
    assert j.append([b"REFUSED-c", b"REFUSED-d"]) == [3, 4]
    fail_once(monkeypatch, "fdatasync")
    with caplog.at_level(logging.ERROR, logger="agentstatefs.fs.journal"):
        with pytest.raises(OSError) as exc:
            j.sync()
    assert exc.value.errno == errno.EIO  # the original error, re-raised
    assert j.failed is None
    assert j.next_seq == 3
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "discarded 2 unsynced record(s) 3..4" in caplog.text
    # the refused records are nowhere, not even in the page cache of the old segment
    assert b"REFUSED" not in all_bytes(d)
    assert records(d) == [(1, b"a"), (2, b"b")]

    # later groups succeed, get the refused numbers (contiguous) and go to a new segment
    assert j.append([b"e"]) == [3]
    j.sync()
    assert j.append([b"f", b"g"]) == [4, 5]
    j.sync()
    assert records(d) == [(1, b"a"), (2, b"b"), (3, b"e"), (4, b"f"), (5, b"g")]
    assert [start for start, _ in j.segments()] == [1, 3]
    j.close()
    fresh = Journal(str(d))
    list(fresh.read_after(0))
    assert fresh.next_seq == 6


def test_failed_fdatasync_of_the_first_group_of_a_segment(tmp_path, monkeypatch):
    """The refused group opens a segment (just after a checkpoint rotation): the emptied
    segment is replaced by a new file of the same name."""
    d = tmp_path / "journal"
    j = Journal(str(d))
    j.append([b"a"])
    j.sync()
    j.open_new_segment()           # as a checkpoint does
    old_inode = os.stat(j.segments()[-1][1]).st_ino
    j.append([b"REFUSED"])
    fail_once(monkeypatch, "fdatasync")
    with pytest.raises(OSError):
        j.sync()
    assert b"REFUSED" not in all_bytes(d)
    assert [start for start, _ in j.segments()] == [1, 2]
    assert os.stat(j.segments()[-1][1]).st_ino != old_inode
    assert not [p for p in d.iterdir() if not p.name.endswith(".log")]
    assert j.append([b"b"]) == [2]
    j.sync()
    assert records(d) == [(1, b"a"), (2, b"b")]


def test_failed_fdatasync_with_nothing_unsynced(tmp_path, monkeypatch):
    d = tmp_path / "journal"
    j = Journal(str(d))
    j.append([b"a"])
    j.sync()
    fail_once(monkeypatch, "fdatasync")
    with pytest.raises(OSError):
        j.sync()
    assert j.append([b"b"]) == [2]
    j.sync()
    assert records(d) == [(1, b"a"), (2, b"b")]


def test_failed_truncate_back_makes_the_journal_unusable(tmp_path, monkeypatch, caplog):
    d = tmp_path / "journal"
    j = Journal(str(d))
    j.append([b"a"])
    j.sync()
    j.append([b"REFUSED"])
    fail_once(monkeypatch, "fdatasync")
    fail_once(monkeypatch, "ftruncate")
    with caplog.at_level(logging.ERROR, logger="agentstatefs.fs.journal"):
        with pytest.raises(OSError) as exc:
            j.sync()
    assert exc.value.errno == errno.EIO
    assert j.failed and "truncating it back" in j.failed
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "until the daemon is restarted" in caplog.text
    # everything later is refused with EIO, even once the disk works again
    for call in (lambda: j.append([b"b"]), j.sync, j.open_new_segment):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EIO
        assert "journal unusable after a failed fdatasync" in str(exc.value)
    assert j.next_seq == 2
    assert records(d)[0] == (1, b"a")  # the synced record is intact


def test_enospc_in_append_leaves_no_partial_record(tmp_path, monkeypatch):
    d = tmp_path / "journal"
    j = Journal(str(d))
    j.append([b"a"])
    j.sync()
    real_write = os.pwrite
    calls = []

    def short_then_enospc(fd, data, off):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:10]), off)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", short_then_enospc)
    with pytest.raises(OSError) as exc:
        j.append([b"x" * 100])
    assert exc.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "pwrite", real_write)
    assert j.failed is None
    assert j.append([b"b"]) == [2]
    j.sync()
    assert records(d) == [(1, b"a"), (2, b"b")]


# -- the LD_PRELOAD shim ----------------------------------------------------------

class FailSync:
    """The built shim: ``env()`` for ``Mount.start(env=...)``, ``arm()`` before the fault."""

    def __init__(self, so: Path, trigger: Path):
        self.so = so
        self.trigger = trigger

    def env(self, match: str | None = "/agentstatefs/journal/") -> dict[str, str]:
        """LD_PRELOAD + trigger; ``match`` limits the fault to fds whose path contains it
        (default: the journal segments; None: any fd)."""
        env = {"LD_PRELOAD": str(self.so), "AGENTSTATEFS_FAILSYNC_TRIGGER": str(self.trigger)}
        if match:
            env["AGENTSTATEFS_FAILSYNC_MATCH"] = match
        return env

    def arm(self) -> None:
        """The next matching fdatasync/fsync fails with EIO (exactly one)."""
        self.trigger.touch()

    @property
    def fired(self) -> bool:
        return not self.trigger.exists()


def build_failsync(dest: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the fault-injection shim (.ci/setup installs it)")
    so = dest / "failsync.so"
    r = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(so),
                        str(FAULTINJECT / "failsync.c"), "-ldl"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return so


@pytest.fixture
def failsync(tmp_path) -> FailSync:
    """Build tests/faultinject/failsync.c into tmp_path (skips only without gcc)."""
    return FailSync(build_failsync(tmp_path), tmp_path / "failsync.trigger")


def test_failsync_shim_fails_exactly_one_sync(failsync, tmp_path):
    target = tmp_path / "f"
    code = ("import os, sys\n"
            "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)\n"
            "open(sys.argv[2], 'w').close()\n"
            "for call in (os.fdatasync, os.fdatasync, os.fsync):\n"
            "    try:\n"
            "        call(fd); print('ok')\n"
            "    except OSError as e:\n"
            "        print('errno', e.errno)\n")
    r = subprocess.run([sys.executable, "-c", code, str(target), str(failsync.trigger)],
                       env={**os.environ, **failsync.env(match=None)}, capture_output=True, text=True)
    assert r.stdout.split("\n")[:3] == [f"errno {errno.EIO}", "ok", "ok"], r.stdout + r.stderr
    assert "failsync: injected EIO into fdatasync" in r.stderr
    assert failsync.fired


# -- on a real mount ----------------------------------------------------------------

def write(path: Path, data: bytes) -> None:
    """Write a whole file; close() (flush) is where the commit's result is reported."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_refused_write_stays_refused_after_a_crash(failsync, mounts):
    """v1 ok; v2's journal fdatasync fails (EIO at close); v3 ok; kill -9; remount without
    the shim: v3 is current, v2 is nowhere in history, every acknowledged commit id is
    unchanged (before the fix v2's records were made durable by v3's sync, so replay
    brought v2 back and gave v3 a new id)."""
    opts = ("checkpoint_interval=3600", "pack_every=0")  # only the journal is synced
    m = mounts().start(*opts, env=failsync.env())
    os.mkdir(m / "a1")
    v1, v2, v3 = (json.dumps({"v": v, "tag": f"version-{v}"}).encode() for v in (1, 2, 3))
    write(m / "a1/config.json", v1)

    failsync.arm()
    with pytest.raises(OSError) as exc:
        write(m / "a1/config.json", v2)
    assert exc.value.errno == errno.EIO
    assert failsync.fired
    assert "failsync: injected EIO into fdatasync" in m.log()
    assert (m / "a1/config.json").read_bytes() == v1  # the refused version is not served

    write(m / "a1/config.json", v3)
    assert (m / "a1/config.json").read_bytes() == v3
    head = m.git("rev-parse", "main").strip()
    acked = m.git("rev-list", "main").split()
    assert len(acked) == 3  # mkdir, v1, v3
    assert b"version-2" not in m.git("log", "-p", "main").encode()
    m.kill9()

    m.start(*opts)  # no shim: recovery replays the journal
    assert (m / "a1/config.json").read_bytes() == v3
    assert m.git("rev-parse", "main").strip() == head
    assert m.git("rev-list", "main").split() == acked
    assert "version-2" not in m.git("log", "-p", "main")
    assert "replaying 3 journal record(s)" in m.log()
    assert "discarded 1 unsynced record(s)" in m.log()  # the journal's error line
    write(m / "a1/config.json", v1)  # and the store carries on
    m.stop()
    fsck = subprocess.run(["git", "-C", str(m.repo), "fsck", "--full"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr


# -- pre-zeroed segments ------------------------------------------------------------

def test_prezeroed_segments_are_used_and_read_across(tmp_path):
    """Records overwrite a pre-zeroed spare; reading stops at its zero rest and goes on
    with the next segment; a torn record inside the zeros still ends reading."""
    j = Journal(str(tmp_path))
    assert j.prepare_spare()
    assert not j.prepare_spare()           # one spare at a time
    spare_size = (tmp_path / "spare.zero").stat().st_size
    assert spare_size >= 1 << 20
    j.append([b"one", b"two"])
    j.sync()
    assert not (tmp_path / "spare.zero").exists()        # it became the first segment
    first = sorted(tmp_path.glob("*.log"))
    assert len(first) == 1 and first[0].stat().st_size == spare_size
    j.prepare_spare()
    j.open_new_segment()                   # rotation takes the new spare
    j.append([b"three"])
    j.sync()
    j.close()
    segs = sorted(tmp_path.glob("*.log"))
    assert len(segs) == 2 and all(s.stat().st_size == spare_size for s in segs)
    assert records(tmp_path) == [(1, b"one"), (2, b"two"), (3, b"three")]
    # A fresh process continues numbering after the last intact record.
    j2 = Journal(str(tmp_path))
    list(j2.read_after(0))
    assert j2.next_seq == 4
    # Garbage in the zero rest of the first segment: a torn tail, reading stops there.
    with open(segs[0], "r+b") as f:
        f.seek(4000)
        f.write(b"\x01")
    assert records(tmp_path) == [(1, b"one"), (2, b"two")]


def test_segment_grows_past_its_spare(tmp_path):
    j = Journal(str(tmp_path))
    j.prepare_spare()
    big = b"x" * (700 << 10)
    for _ in range(3):                      # 2.1 MiB into a 1 MiB spare
        j.append([big])
        j.sync()
    j.close()
    assert [s for s, _ in records(tmp_path)] == [1, 2, 3]
