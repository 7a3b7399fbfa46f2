"""kill -9 at a random moment during concurrent writes, remount, check every acknowledged version.

Rounds: AGENTSTATEFS_CRASH_ROUNDS (default 50). Each round: writer threads on many
agents (config, memory and runtime), kill -9 the daemon after a random delay, remount
(the stale mount and the journal are recovered without manual steps), then:
  - every version whose close() returned 0 is in git history, at its path;
  - each file's current content is the last acknowledged one or the one in flight;
  - runtime.json is gone everywhere; `git fsck --full` is clean.
The same storm runs on an encrypted store (AGENTSTATEFS_CRASH_ROUNDS_ENCRYPTED, default
12 rounds): acknowledged versions are found by their sealed blob ids, and no git object
or journal file ever holds the plaintext canary.
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
ROUNDS_ENCRYPTED = int(os.environ.get("AGENTSTATEFS_CRASH_ROUNDS_ENCRYPTED", "12"))
CANARY = "crash-canary-5d1e"
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
    _storm(m, ROUNDS, ("checkpoint_interval=0.2",), lambda agent, name, data: str(pygit2.hash(data)))


def test_kill9_storm_encrypted(mounts, tmp_path):
    from agentstatefs.fs import crypto
    from test_encryption import keygen, plaintext_places
    key = keygen(tmp_path / "key")
    m: Mount = mounts()
    options = ("checkpoint_interval=0.2", f"keyfile={key}")
    m.start(*options)
    cipher = crypto.Cipher(crypto.read_keyfile(str(key)),
                           bytes.fromhex(crypto.read_record(str(m.repo))["store_id"]))
    m.stop()

    def sealed_id(agent, name, data):
        return str(pygit2.hash(cipher.seal_blob(agent, name, data)))

    def no_plaintext(rnd):
        assert plaintext_places(m.repo, CANARY.encode()) == [], f"round {rnd}"

    _storm(m, ROUNDS_ENCRYPTED, options, sealed_id, after_kill=no_plaintext)
    m.stop()
    no_plaintext("end")


def _storm(m: Mount, rounds: int, options: tuple, blob_id, after_kill=None) -> None:
    m.start(*options)
    for a in AGENTS:
        os.mkdir(m / a)
    rng = random.Random(20261125)
    acked_total = 0
    for rnd in range(rounds):
        stop = threading.Event()
        acked: dict[tuple[str, str], list[bytes]] = {}
        inflight: dict[tuple[str, str], bytes] = {}

        def writer(agent: str, name: str) -> None:
            seq = 0
            while not stop.is_set():
                data = json.dumps({"a": agent, "f": name, "round": rnd, "seq": seq, "s": CANARY,
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
        if after_kill is not None:
            after_kill(rnd)        # the journal as the crash left it, before replay
        m.start(*options)

        head = m.git("rev-parse", "main").strip()
        committed = history_blobs(m)
        for (agent, name), versions in acked.items():
            path = m.tree_path(agent, name)
            for data in versions:
                assert (path, blob_id(agent, name, data)) in committed, \
                    (f"round {rnd}: acknowledged {agent}/{name} seq {json.loads(data)['seq']} "
                     f"(blob {blob_id(agent, name, data)}) not in history of {head} "
                     f"({m.commit_count()} commits now, main now {m.git('rev-parse', 'main').strip()})")
            current = (m / agent / name).read_bytes()
            assert current in (versions[-1], inflight.get((agent, name))), f"round {rnd}: {agent}/{name}"
            acked_total += len(versions)
        for a in AGENTS:
            assert not (m / a / "runtime.json").exists()
        fsck = subprocess.run(["git", "-C", str(m.repo), "fsck", "--full", "--no-dangling"],
                              capture_output=True, text=True)
        assert fsck.returncode == 0 and not fsck.stdout.strip(), f"round {rnd}: {fsck.stdout}{fsck.stderr}"
    assert acked_total > rounds  # the storm really wrote
    print(f"{rounds} crash rounds, {acked_total} acknowledged versions checked")
