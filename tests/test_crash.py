"""kill -9 at a random moment during concurrent writes, remount, check every acknowledged version.

Rounds: AGENTSTATEFS_CRASH_ROUNDS (default 50). Each round: writer threads on many
agents (config, memory and runtime), kill -9 the daemon after a random delay, remount
(the stale mount and the journal are recovered without manual steps), then:
  - every version whose close() returned 0 is in git history, at its path;
  - each file's current content is the last acknowledged one or the one in flight;
  - runtime.json is gone everywhere; `git fsck --full` is clean.
"""

import json
import os
import random
import subprocess
import threading
import time

import pygit2

from mounting import Mount

ROUNDS = int(os.environ.get("AGENTSTATEFS_CRASH_ROUNDS", "50"))
AGENTS = [f"crash{i:02d}" for i in range(10)]
FILES = ("config.json", "memory.json")


def history_blobs(m: Mount) -> set[tuple[str, str]]:
    """Every (tree path, blob id) ever committed on main."""
    out = m.git("log", "--raw", "--no-abbrev", "--format=", "main")
    pairs = set()
    for line in out.splitlines():
        if line.startswith(":"):
            meta, path = line.split("\t", 1)
            pairs.add((path, meta.split()[3]))
    return pairs


def test_kill9_storm(mounts):
    m: Mount = mounts()
    m.start("checkpoint_interval=0.2")
    for a in AGENTS:
        os.mkdir(m / a)
    rng = random.Random(20261125)
    acked_total = 0
    for rnd in range(ROUNDS):
        stop = threading.Event()
        acked: dict[tuple[str, str], list[bytes]] = {}
        inflight: dict[tuple[str, str], bytes] = {}

        def writer(agent: str, name: str) -> None:
            seq = 0
            while not stop.is_set():
                data = json.dumps({"a": agent, "f": name, "round": rnd, "seq": seq,
                                   "pad": "x" * rng.randint(0, 3000)}).encode()
                inflight[(agent, name)] = data
                try:
                    with open(m / agent / name, "wb") as f:
                        f.write(data)
                except OSError:
                    return  # the daemon is gone: this close was not acknowledged
                if name != "runtime.json":
                    acked.setdefault((agent, name), []).append(data)
                seq += 1

        threads = [threading.Thread(target=writer, args=(a, n), daemon=True)
                   for a in rng.sample(AGENTS, 6) for n in FILES + ("runtime.json",)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, 0.6))
        m.kill9()
        stop.set()
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a writer hung on a dead mount"
        m.start("checkpoint_interval=0.2")

        head = m.git("rev-parse", "main").strip()
        committed = history_blobs(m)
        for (agent, name), versions in acked.items():
            path = m.tree_path(agent, name)
            for data in versions:
                assert (path, str(pygit2.hash(data))) in committed, \
                    (f"round {rnd}: acknowledged {agent}/{name} seq {json.loads(data)['seq']} "
                     f"(blob {pygit2.hash(data)}) not in history of {head} "
                     f"({m.commit_count()} commits now, main now {m.git('rev-parse', 'main').strip()})")
            current = (m / agent / name).read_bytes()
            assert current in (versions[-1], inflight.get((agent, name))), f"round {rnd}: {agent}/{name}"
            acked_total += len(versions)
        for a in AGENTS:
            assert not (m / a / "runtime.json").exists()
        fsck = subprocess.run(["git", "-C", str(m.repo), "fsck", "--full", "--no-dangling"],
                              capture_output=True, text=True)
        assert fsck.returncode == 0 and not fsck.stdout.strip(), f"round {rnd}: {fsck.stdout}{fsck.stderr}"
    assert acked_total > ROUNDS  # the storm really wrote
    print(f"{ROUNDS} crash rounds, {acked_total} acknowledged versions checked")
