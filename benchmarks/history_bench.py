#!/usr/bin/env python3
"""History at scale: `ls M/@history` and per-agent history listing at 100,000 commits.

    .venv/bin/python benchmarks/history_bench.py [--commits 100000] [--agents 1000]

Builds a repository with real agentstatefs commits (``Store.commit_batch``, the same
code path the daemon uses; cached under the base directory between runs), mounts it,
and times, each over several runs (median): the first mount's start-up (index load),
`os.listdir(M/@history)`, `os.listdir(M/<agent>/@history)`, reading a file through
`@history/HEAD~N` and through a 6-hex prefix, and a time-spec lookup. Target (SPEC
section 8): `ls @history` under 1 s at 100,000 commits. Never fails on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # for a checkout not installed as agentstatefs

from agentstatefs.fs.changes import MKDIR, WRITE, Change, Who  # noqa: E402
from agentstatefs.fs.store import Store  # noqa: E402


def build(repo: Path, commits: int, agents: int) -> float:
    marker = repo / "agentstatefs" / f"built-{commits}-{agents}"
    if marker.exists():
        return 0.0
    subprocess.run(["rm", "-rf", str(repo)], check=True)
    t0 = time.monotonic()
    store = Store(str(repo))
    who = Who(0, 0, os.getpid(), "history_bench")
    ids = [f"agent-{i:05d}" for i in range(agents)]
    t = 1_700_000_000 * 10**9
    store.commit_batch([Change(MKDIR, a, who, t + i) for i, a in enumerate(ids)])
    done, batch = agents, []
    while done < commits:
        a = ids[done % agents]
        batch.append(Change(WRITE, a, who, t + done * 1_000_000_000 // 10,
                            files={"memory.json": json.dumps({"seq": done}).encode()}))
        done += 1
        if len(batch) == 2000 or done == commits:
            store.commit_batch(batch)
            batch = []
    store.close()
    subprocess.run(["git", "-C", str(repo), "gc", "-q", "--aggressive"], check=False)
    marker.write_text("ok\n")
    return time.monotonic() - t0


def timed(fn, runs: int) -> float:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=100_000)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--base", default="/var/tmp/agentstatefs-history-bench")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args(argv)
    base = Path(a.base)
    base.mkdir(parents=True, exist_ok=True)
    repo, mp = base / f"repo-{a.commits}", base / "mnt"
    mp.mkdir(exist_ok=True)
    build_s = build(repo, a.commits, a.agents)
    log = open(base / "daemon.log", "ab")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "agentstatefs.daemon.cli", "mount", "--foreground",
                             "--repo", str(repo), str(mp)], stdout=log, stderr=subprocess.STDOUT)
    try:
        while not os.path.ismount(mp):
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited: see {base}/daemon.log")
            time.sleep(0.01)
        os.statvfs(mp)
        startup = time.monotonic() - t0
        n = len(os.listdir(mp / "@history"))
        agent = "agent-00007"
        per_agent = len(os.listdir(mp / agent / "@history"))
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD~50000" if a.commits > 50000 else "HEAD~1"],
                              capture_output=True, text=True).stdout.strip()
        rows = [
            ("commits in @history", f"{n:,}", ""),
            ("mount start-up (index load)", f"{startup:.2f} s", ""),
            ("ls M/@history", f"{timed(lambda: os.listdir(mp / '@history'), a.runs):.3f} s", "target < 1 s"),
            (f"ls M/{agent}/@history ({per_agent} entries)",
             f"{timed(lambda: os.listdir(mp / agent / '@history'), a.runs) * 1000:.1f} ms", "target < 1 s"),
            ("cat @history/HEAD~50000/<agent>/memory.json",
             f"{timed(lambda: (mp / '@history/HEAD~50000' / agent / 'memory.json').read_bytes(), a.runs) * 1000:.2f} ms", ""),
            ("ls @history/<6-hex prefix>/ (1000 agents)",
             f"{timed(lambda: os.listdir(mp / '@history' / head[:6]), a.runs) * 1000:.1f} ms", ""),
            ("stat @history/<UTC time>/<agent>",
             f"{timed(lambda: os.stat(mp / '@history/2023-11-15T00:00:00Z' / agent), a.runs) * 1000:.2f} ms", ""),
            ("daemon RSS after listings", f"{int(open(f'/proc/{proc.pid}/status').read().split('VmRSS:')[1].split()[0]) // 1024} MiB", ""),
        ]
        if build_s:
            rows.append(("building the repository", f"{build_s:.0f} s", "(cached for later runs)"))
        w = max(len(r[0]) for r in rows)
        print(f"{'history at scale':<{w}}  {'result':>12}  note")
        for name, value, note in rows:
            print(f"{name:<{w}}  {value:>12}  {note}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-uz", str(mp)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
