"""Model-based test: random operation sequences on a real mount vs a plain dict.

Hypothesis drives writes (valid and invalid JSON), appends, truncates, unlinks, scratch
temp files renamed onto state files, renames between state files, writes to a file
unlinked while open, ftruncate then append on one descriptor, and flushes of a dup'ed
descriptor while another thread writes; after every step the mount must agree with the
model, and git must hold one commit per accepted change of a durable file.
"""

import errno
import json
import os
import tempfile
import threading
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mounting import Mount

STATE = ("config.json", "memory.json", "runtime.json")
values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                      max_leaves=6)
garbage = st.sampled_from([b"", b"{", b"nul\x00l", b"\xff", b"NaN", b"{} []", b"\xef\xbb\xbf{}"])


def valid(data: bytes) -> bool:
    try:
        if data.startswith(b"\xef\xbb\xbf"):
            return False
        json.loads(data.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        return True
    except (ValueError, UnicodeDecodeError):
        return False


_LIVE: list = []   # every mount made, so none outlives the test even if teardown is skipped


@pytest.fixture(autouse=True)
def _no_stray_mounts():
    yield
    while _LIVE:
        m = _LIVE.pop()
        m.cleanup()
        os.system(f"rm -rf {m.base}")


class FsModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="asfs-model-")
        self.m = Mount(Path(self.tmp))
        _LIVE.append(self.m)
        self.m.start()
        os.mkdir(self.m / "a1")
        self.model: dict[str, bytes] = {}
        self.commits = self.m.commit_count()

    def teardown(self):
        self.m.cleanup()
        os.system(f"rm -rf {self.tmp}")

    def path(self, name):
        return self.m / "a1" / name

    def _expect_commit(self, name, before, after):
        if name != "runtime.json" and before != after:
            self.commits += 1

    @rule(name=st.sampled_from(STATE), value=values)
    def write_valid(self, name, value):
        data = json.dumps(value).encode()
        with open(self.path(name), "wb") as f:
            f.write(data)
        self._expect_commit(name, self.model.get(name), data)
        self.model[name] = data

    @rule(name=st.sampled_from(STATE))
    def rewrite_same(self, name):
        if name in self.model:  # same bytes again: no new commit
            with open(self.path(name), "wb") as f:
                f.write(self.model[name])

    @rule(name=st.sampled_from(STATE), data=garbage)
    def write_invalid(self, name, data):
        try:
            with open(self.path(name), "wb") as f:
                f.write(data)
        except OSError as e:
            assert e.errno == errno.EINVAL
        else:
            raise AssertionError(f"{data!r} accepted")

    @rule(name=st.sampled_from(STATE), extra=st.sampled_from([b"\n", b"  ", b"{}", b"1"]))
    def append(self, name, extra):
        if name not in self.model:
            return
        new = self.model[name] + extra
        try:
            with open(self.path(name), "ab") as f:
                f.write(extra)
        except OSError as e:
            assert e.errno == errno.EINVAL and not valid(new)
            return
        assert valid(new)
        self._expect_commit(name, self.model[name], new)
        self.model[name] = new

    @rule(name=st.sampled_from(STATE), size=st.integers(0, 40))
    def truncate(self, name, size):
        if name not in self.model:
            return
        old = self.model[name]
        new = old[:size] + b"\0" * max(0, size - len(old))
        try:
            os.truncate(self.path(name), size)
        except OSError as e:
            assert e.errno == errno.EINVAL and not valid(new)
            return
        assert valid(new) or new == old
        self._expect_commit(name, old, new)
        self.model[name] = new

    @rule(name=st.sampled_from(STATE))
    def unlink(self, name):
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            assert name not in self.model
            return
        assert self.model.pop(name, None) is not None
        if name != "runtime.json":
            self.commits += 1

    @rule(name=st.sampled_from(STATE), value=values, ok=st.booleans())
    def temp_then_rename(self, name, value, ok):
        data = json.dumps(value).encode() if ok else b"{oops"
        tmp = self.path("edit.tmp")
        tmp.write_bytes(data)
        # The file takes the temp file's mode, as on ext4: a new mode alone is a commit too
        # (e.g. a file made by os.open's default 0o777 & ~umask, replaced by a 0o644 temp).
        mode_changes = name in self.model and os.stat(self.path(name)).st_mode != os.stat(tmp).st_mode
        try:
            os.rename(tmp, self.path(name))
        except OSError as e:
            assert e.errno == errno.EINVAL and not ok
            os.unlink(tmp)
            return
        assert ok
        if mode_changes and name != "runtime.json" and self.model.get(name) == data:
            self.commits += 1
        self._expect_commit(name, self.model.get(name), data)
        self.model[name] = data

    @rule(src=st.sampled_from(STATE[:2]), dst=st.sampled_from(STATE[:2]))
    def rename_state(self, src, dst):
        try:
            os.rename(self.path(src), self.path(dst))
        except FileNotFoundError:
            assert src not in self.model
            return
        assert src in self.model
        if src != dst:
            self.model[dst] = self.model.pop(src)
            self.commits += 1
        # The new name answers at once, with the content just moved.
        assert self.path(dst).read_bytes() == self.model[dst]

    @rule(name=st.sampled_from(STATE), value=values)
    def write_after_unlink(self, name, value):
        """exec 3<>f; rm f; write to 3; close 3: the data goes nowhere, f stays deleted."""
        if name not in self.model:
            return
        fd = os.open(self.path(name), os.O_RDWR)
        try:
            os.unlink(self.path(name))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(value).encode(), 0)
        finally:
            os.close(fd)
        self.model.pop(name)
        if name != "runtime.json":
            self.commits += 1
        assert not self.path(name).exists()

    @rule(name=st.sampled_from(STATE), value=values)
    def ftruncate_then_append(self, name, value):
        if name not in self.model:
            return
        data = json.dumps(value).encode()
        with open(self.path(name), "r+b") as f:
            f.truncate(0)
            f.write(data)
            f.seek(0, 2)
            f.write(b"\n")
        new = data + b"\n"
        self._expect_commit(name, self.model[name], new)
        self.model[name] = new

    @rule(name=st.sampled_from(STATE), v1=values, v2=values)
    def flush_while_writing(self, name, v1, v2):
        """A dup'ed descriptor is closed (flush commits) while another thread writes the
        final content through the original: after the last close, the final content is
        committed, whatever the interleaving (one or two commits)."""
        d1, d2 = json.dumps(v1).encode(), json.dumps(v2).encode()
        d2 += b" " * max(0, len(d1) - len(d2))   # one pwrite replaces all of d1: never invalid
        fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.pwrite(fd, d1, 0)
            dup = os.dup(fd)

            def late():
                os.pwrite(fd, d2, 0)
            t = threading.Thread(target=late)
            t.start()
            os.close(dup)
            t.join()
        finally:
            os.close(fd)
        if name != "runtime.json":
            before, old = self.m.commit_count(), self.commits
            assert 0 <= before - old <= 2
            if d2 != self.model.get(name):
                assert before > old
            self.commits = before
        self.model[name] = d2

    @invariant()
    def agrees(self):
        listed = sorted(os.listdir(self.m / "a1"))
        assert listed == sorted(self.model), (listed, sorted(self.model))
        for name, data in self.model.items():
            assert self.path(name).read_bytes() == data, name
            assert os.stat(self.path(name)).st_size == len(data)
        assert self.m.commit_count() == self.commits


FsModel.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                     suppress_health_check=list(HealthCheck))
test_model = FsModel.TestCase
