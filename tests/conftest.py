"""Shared fixtures: a real agentstatefs mount per test, torn down even on failure."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mounting import Mount  # noqa: E402


def pytest_sessionstart(session):
    missing = [t for t in ("fusermount3", "git") if shutil.which(t) is None]
    if missing or not os.path.exists("/dev/fuse"):
        raise pytest.UsageError(f"FUSE tests need /dev/fuse and {missing}: run .ci/setup first")


@pytest.fixture
def mounts(tmp_path):
    """Factory for Mount objects; every one is cleaned up at the end of the test."""
    made = []

    def make(name="m", repo=None):
        m = Mount(tmp_path, name, repo)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()


@pytest.fixture
def mnt(mounts):
    """A started mount with default options."""
    return mounts().start()


def sh(cmd: str, cwd=None, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd!r} failed ({r.returncode}): {r.stderr}")
    return r


def unpack_to_loose(repo) -> None:
    """Turn every pack of a stopped repository into loose objects (so a test can corrupt
    one object file): the daemon writes packs, one per commit group."""
    repo = Path(repo)
    for p in sorted((repo / "objects/pack").glob("*.pack")):
        moved = repo / p.name
        p.rename(moved)
        p.with_suffix(".idx").unlink()
        with open(moved, "rb") as f:
            subprocess.run(["git", "-C", str(repo), "unpack-objects", "-q"], stdin=f, check=True)
        moved.unlink()
