"""Issue 11 through a real mount: compare-and-swap races, refused writes, patches, events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import sh

CAS_INCREMENTER = textwrap.dedent("""
    import errno, json, os, sys
    d, n, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cfg, tmp = os.path.join(d, "config.json"), os.path.join(d, f".tmp-{tag}")
    stale = other = 0
    for _ in range(n):
        while True:
            try:
                v1 = int(os.getxattr(cfg, "user.agentstatefs.version"))
                with open(cfg) as f:
                    doc = json.load(f)
                if int(os.getxattr(cfg, "user.agentstatefs.version")) != v1:
                    continue           # changed while we read it: read again
            except OSError:
                other += 1             # the name moved under us for a moment
                continue
            doc["count"] += 1
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.setxattr(tmp, "user.agentstatefs.if-version", str(v1).encode())
            try:
                os.rename(tmp, cfg)
                break
            except OSError as exc:
                if exc.errno != errno.ESTALE:
                    raise
                stale += 1
    print(json.dumps({"stale": stale, "other": other}))
""")


def test_cas_race_two_processes_lose_nothing(mnt):
    sh(f"mkdir {mnt / 'c1'} && echo '{{\"count\": 0}}' > {mnt / 'c1/config.json'}")
    procs = [subprocess.Popen([sys.executable, "-c", CAS_INCREMENTER, str(mnt / "c1"), "200", t],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for t in ("a", "b")]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    assert json.loads((mnt / "c1/config.json").read_text())["count"] == 400
    stale = sum(o["stale"] for o in outs)
    print(f"\nCAS race: {outs}")
    assert stale > 0, "two racing writers never conflicted"
    # every increment is one version: 1 (initial) + 400
    assert int(sh(f"getfattr --only-values -n user.agentstatefs.version {mnt / 'c1/config.json'}").stdout) == 401


AGENTSTATEFS = [sys.executable, "-m", "agentstatefs.daemon.cli"]


def test_refused_shell_write_is_visible(mnt):
    sh(f"mkdir {mnt / 'a1'} && echo '{{\"v\": 1}}' > {mnt / 'a1/config.json'}")
    r = sh(f"echo '{{oops' > {mnt / 'a1/config.json'}", check=False)
    assert r.returncode == 0            # bash ignores close() errors: hence @rejected and put
    assert (mnt / "a1/config.json").read_text() == '{"v": 1}\n'
    assert (mnt / "a1/@rejected/config.json").read_text() == "{oops\n"
    err = sh(f"getfattr --only-values -n user.agentstatefs.last-error {mnt / 'a1/config.json'}").stdout
    assert err.startswith("line 1 column 2: Expecting property name enclosed in double quotes (EINVAL; ")
    assert " bash; uid 0" in err
    assert "@rejected" not in sh(f"ls -a {mnt / 'a1'}").stdout
    r = sh(f"echo x > {mnt / 'a1/@rejected/config.json'}", check=False)
    assert r.returncode != 0 and "Read-only" in r.stderr
    # a good write through bash leaves no trace of its refused first (empty) close
    sh(f"echo '{{\"v\": 2}}' > {mnt / 'a1/memory.json'}")
    assert not (mnt / "a1/@rejected/memory.json").exists()


def test_put_reports_the_reason(mnt):
    sh(f"mkdir {mnt / 'a1'}")
    run = lambda data, *extra: subprocess.run(  # noqa: E731
        AGENTSTATEFS + ["put", "a1", "config.json", "--mountpoint", str(mnt.mp), *extra],
        input=data, capture_output=True, text=True)
    r = run('{oops')
    assert r.returncode == 1
    assert "a1/config.json not written (EINVAL): line 1 column 2: Expecting property name" in r.stderr
    assert not (mnt / "a1/config.json").exists()
    assert (mnt / "a1/@rejected/config.json").read_text() == "{oops"
    r = run('{"n": 1}')
    assert r.returncode == 0, r.stderr
    assert json.loads((mnt / "a1/config.json").read_text()) == {"n": 1}
    r = run('{"n": 2}', "--if-version", "5")
    assert r.returncode == 3 and "ESTALE" in r.stderr
    r = run('{"n": 2}', "--if-version", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads((mnt / "a1/config.json").read_text()) == {"n": 2}
    assert [n for n in sh(f"ls -a {mnt / 'a1'}").stdout.split() if n not in (".", "..")] == ["config.json"]


PATCH_RACER = textwrap.dedent("""
    import json, sys
    d, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(n):
        if kind == "merge":
            with open(f"{d}/@patch/config.json", "w") as f:
                json.dump({"m": i, f"m{i}": True}, f)
        elif kind == "json":
            with open(f"{d}/@patch/config.json", "w") as f:
                json.dump([{"op": "add", "path": "/list/-", "value": i}], f)
        else:
            with open(f"{d}/config.json", "w") as f:
                json.dump({"w": f"{kind}-{i}", "list": []}, f)
""")


def test_patches_race_plain_writers_and_lose_nothing(mnt):
    """Merge patches and JSON Patches racing two plain writers: every patch applies to
    the version current at its turn, so each version of the file is exactly the previous
    one with that patch applied (or a plain write)."""
    import pygit2
    n = 40
    sh(f"mkdir {mnt / 'p1'} && echo '{{\"list\": []}}' > {mnt / 'p1/config.json'}")
    procs = [subprocess.Popen([sys.executable, "-c", PATCH_RACER, str(mnt / "p1"), kind, str(n)],
                              stderr=subprocess.PIPE, text=True)
             for kind in ("merge", "json", "w1", "w2")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    mnt.git_settled()
    repo = pygit2.Repository(str(mnt.repo))
    path = mnt.tree_path("p1", "config.json")
    versions = []
    for c in repo.walk(repo.branches["main"].target, pygit2.enums.SortMode.TOPOLOGICAL | pygit2.enums.SortMode.REVERSE):
        try:
            blob = c.tree[path].id
        except KeyError:
            continue
        if not versions or versions[-1][0] != blob:
            versions.append((blob, json.loads(repo[blob].data)))
    merges, appends, plain = [], [], 0
    for (_, prev), (_, cur) in zip(versions, versions[1:]):
        if len(cur.get("list", ())) == len(prev.get("list", ())) + 1 and \
                cur == {**prev, "list": prev["list"] + [cur["list"][-1]]}:
            appends.append(cur["list"][-1])
        elif "m" in cur and cur == {**prev, "m": cur["m"], f"m{cur['m']}": True}:
            merges.append(cur["m"])
        elif set(cur) == {"w", "list"} and cur["list"] == []:
            plain += 1
        else:
            raise AssertionError(f"version not explained by one patch or write:\n{prev}\n-> {cur}")
    assert sorted(merges) == list(range(n)) and sorted(appends) == list(range(n))
    assert plain == 2 * n


def _watch(mnt, *args):
    return subprocess.Popen(AGENTSTATEFS + ["watch", "--mountpoint", str(mnt.mp), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_subscribed(mnt, proc):
    """The watcher has opened @events once an event made now reaches it."""
    import time
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        try:
            if os.listxattr(mnt.mp) is not None and _subscribers(mnt) > 0:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("watcher never subscribed")


def _subscribers(mnt) -> int:
    pid = int(os.getxattr(mnt.mp, "user.agentstatefs.pid"))
    target = str(mnt.mp / "@events")
    n = 0
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == pid:
            continue
        try:
            n += sum(os.readlink(f"/proc/{p}/fd/{fd}") == target for fd in os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return n


def test_subscriber_sees_every_commit_in_order_and_rejections(mnt):
    sh(f"mkdir {mnt / 'e1'}")
    n = 100
    watcher = _watch(mnt, "e1", "--count", str(n + 2))
    _wait_subscribed(mnt, watcher)
    writer = textwrap.dedent(f"""
        import json
        for i in range({n}):
            with open("{mnt / 'e1/config.json'}", "w") as f:
                json.dump({{"i": i}}, f)
    """)
    subprocess.run([sys.executable, "-c", writer], check=True)
    sh(f"echo '{{oops' > {mnt / 'e1/memory.json'}")
    sh(f"echo '{{\"m\": 1}}' > {mnt / 'e1/memory.json'}")
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    writes = [e for e in events if e["file"] == "config.json"]
    assert [e["version"] for e in writes] == list(range(1, n + 1))
    assert all(e["op"] == "write" and e["agent"] == "e1" and len(e["commit"]) == 40 and e["uid"] == 0
               for e in writes)
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    rej, mem = events[-2:]
    assert rej["op"] == "rejected" and rej["file"] == "memory.json"
    assert rej["reason"].startswith("line 1 column 2: Expecting property name")
    assert mem["op"] == "write" and mem["file"] == "memory.json" and mem["version"] == 1
    # every commit of the writer is there: their ids are the branch's, in order
    commits = mnt.git("log", "--format=%H", "--reverse", "main").split()
    assert [e["commit"] for e in writes] == commits[1:1 + n]     # after the mkdir


def test_slow_subscriber_does_not_slow_writers_and_learns_its_loss(mnt):
    import time
    from agentstatefs.fs.events import MAX_EVENTS
    sh(f"mkdir {mnt / 's1'}")
    fd = os.open(mnt / "@events", os.O_RDONLY)     # subscribed, never read while writing
    try:
        t0 = time.monotonic()
        writer = textwrap.dedent(f"""
            for i in range({MAX_EVENTS + 500}):
                with open("{mnt / 's1/runtime.json'}", "w") as f:
                    f.write('{{"i": %d}}' % i)
        """)
        subprocess.run([sys.executable, "-c", writer], check=True, timeout=120)
        slow = time.monotonic() - t0
        data = b""
        while not data.endswith(b"\n") or len(data) < 100:
            data += os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    lines = [json.loads(line) for line in data.splitlines()]
    assert lines[0]["op"] == "lost" and lines[0]["count"] >= 500
    assert lines[-1]["file"] == "runtime.json" and lines[-1]["version"] == MAX_EVENTS + 500
    # the same writes with nobody subscribed
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", writer.replace('{"i": %d}', '{"j": %d}')], check=True, timeout=120)
    base = time.monotonic() - t0
    print(f"\n{MAX_EVENTS + 500} runtime writes: {slow:.2f}s with a stalled subscriber, {base:.2f}s without")
    assert slow < 2 * base + 2


def test_events_poll_and_shutdown_with_a_blocked_reader(mnt):
    import select
    import time
    sh(f"mkdir {mnt / 'q1'}")
    fd = os.open(mnt / "@events", os.O_RDONLY)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(200) == []                          # nothing yet
        sh(f"echo '{{\"a\": 1}}' > {mnt / 'q1/config.json'}")
        ready = p.poll(5000)
        assert ready and ready[0][1] & select.POLLIN
        ev = json.loads(os.read(fd, 1 << 16).splitlines()[0])
        assert ev["op"] == "write" and ev["agent"] == "q1"
        assert p.poll(200) == []
    finally:
        os.close(fd)
    # SIGTERM while a watcher is blocked in read(): the daemon ends the read and exits 0
    watcher = _watch(mnt)
    _wait_subscribed(mnt, watcher)
    t0 = time.monotonic()
    assert mnt.stop() == 0
    out, err = watcher.communicate(timeout=30)
    assert time.monotonic() - t0 < 15
