#!/usr/bin/env python3
"""Cost of encryption at rest per durable write, in-process (no FUSE).

    .venv/bin/python benchmarks/crypto_bench.py [--writes 3000] [--size 1500] [--runs 3]

Two stores in the same process, one plain and one with a key, take the same writes
through ``Store.commit_group`` (resolve, seal, git objects in memory, journal append +
fdatasync: the daemon's path for one durable write, without FUSE), alternating runs so
both see the same machine. Prints the median time per write of each and the difference,
and the cost of sealing / opening one blob alone. Never fails on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # for a checkout not installed as agentstatefs

from agentstatefs.fs import crypto  # noqa: E402
from agentstatefs.fs.changes import MKDIR, WRITE, Change, Who  # noqa: E402
from agentstatefs.fs.store import Store  # noqa: E402

AGENTS = 100


def run(store: Store, writes: int, size: int, tag: int) -> float:
    who = Who(0, 0, os.getpid(), "crypto_bench")
    pad = "x" * max(0, size - 60)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(writes):
        data = json.dumps({"tag": tag, "i": i, "pad": pad}).encode()
        r = store.commit_group([Change(WRITE, f"a{i % AGENTS:03d}", who, time.time_ns(),
                                       files={"config.json": data})], flush=False).results[0]
        assert not isinstance(r, Exception), r
        if i % 200 == 199:
            store.flush_git()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    store.checkpoint(force=True)
    return dt / writes, cpu / writes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=3000)
    ap.add_argument("--size", type=int, default=1500)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as base:
        key = os.urandom(crypto.KEY_BYTES)
        stores = {"plain": Store(os.path.join(base, "plain")),
                  "encrypted": Store(os.path.join(base, "enc"), key=key)}
        who = Who(0, 0, os.getpid(), "crypto_bench")
        for s in stores.values():
            s.commit_group([Change(MKDIR, f"a{i:03d}", who, time.time_ns()) for i in range(AGENTS)])
        times: dict[str, list[float]] = {k: [] for k in stores}
        cpus: dict[str, list[float]] = {k: [] for k in stores}
        for r in range(a.runs):
            for k, s in stores.items():
                wall, cpu = run(s, a.writes, a.size, r)
                times[k].append(wall)
                cpus[k].append(cpu)
        p, e = statistics.median(times["plain"]), statistics.median(times["encrypted"])
        pc, ec = statistics.median(cpus["plain"]), statistics.median(cpus["encrypted"])
        print(f"durable write of {a.size} bytes via Store.commit_group (1 change/group, fdatasync each), "
              f"median of {a.runs} x {a.writes}:")
        print(f"  plain      {p * 1e6:8.1f} us/write")
        print(f"  encrypted  {e * 1e6:8.1f} us/write   (+{(e - p) * 1e6:.1f} us, {e / p:.3f}x)")
        print(f"  CPU of the process per write: plain {pc * 1e6:.1f} us, encrypted {ec * 1e6:.1f} us "
              f"(+{(ec - pc) * 1e6:.1f} us)")
        c = crypto.Cipher(key, os.urandom(16))
        data = os.urandom(a.size)
        sealed = c.seal_blob("a001", "config.json", data)
        n = 20000
        seal = timeit.timeit(lambda: c.seal_blob("a001", "config.json", data), number=n) / n
        open_ = timeit.timeit(lambda: c.open_blob("a001", "config.json", sealed), number=n) / n
        print(f"  AES-SIV seal {seal * 1e6:.1f} us, open {open_ * 1e6:.1f} us per {a.size}-byte blob "
              f"(a write seals its blob, its meta.json and its journal record)")
        for s in stores.values():
            s.close()


if __name__ == "__main__":
    main()
