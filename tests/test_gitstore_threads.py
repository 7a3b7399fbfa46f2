"""Several threads reading one GitStore at once must not deadlock.

libgit2 holds its odb mutex while it calls a backend's read; the in-memory backend is
Python, so the GIL can pass to another thread inside it, and that thread then waits
for the mutex while holding the GIL: the whole process stops (a daemon hung at mount
with the agent walk in a worker thread; kill -9 could not end it, its FUSE connection
stayed, and every process touching the mount hung). GitStore gives each thread its
own repository handle. The reproduction runs in a subprocess, because a deadlock
holding the GIL would stop this test process too; the timeout is a liveness bound
(three threads x 20,000 lookups take a few seconds even on a loaded machine).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys, threading
    sys.setswitchinterval(0.0002)       # as the daemon runs
    from pygit2.enums import ObjectType
    from agentstatefs.fs.gitstore import GitStore
    g = GitStore(sys.argv[1])
    # Objects only in memory: every lookup goes through the Python backend.
    oids = [g._write(ObjectType.BLOB, b"blob %d" % i) for i in range(200)]
    done = []
    def work():
        for k in range(20000):
            assert g.repo[oids[k % 200]].data == b"blob %d" % (k % 200)
        done.append(1)
    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("done", len(done))
""")


def test_concurrent_reads_through_the_memory_backend_do_not_deadlock(tmp_path):
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "repo")],
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError("threads reading one GitStore deadlocked") from None
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done 3"
