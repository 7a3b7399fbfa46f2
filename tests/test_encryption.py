"""Encryption at rest and tenants on real mounts: no plaintext on disk, keys refused, CLI verbs."""

import errno
import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import pygit2
import pytest

from agentstatefs.fs import crypto
from conftest import sh
from mounting import CLI, Mount

CANARY = "canary-7f3e9b1c-plaintext"


def cli(*args, check=True, env=None):
    r = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env} if env else None)
    if check and r.returncode != 0:
        raise AssertionError(f"agentstatefs {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def keygen(path: Path) -> Path:
    cli("keygen", str(path))
    return path


def plaintext_places(repo: Path, needle: bytes) -> list[str]:
    """Everywhere ``needle`` can be read from the repository's files: every git object
    (packs and loose, through git itself, which decompresses), every loose object
    decompressed by hand, and every file's raw bytes (journal, index, packs, config)."""
    found = []
    r = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch-all-objects", "--batch"],
                       capture_output=True, check=True)
    if needle in r.stdout:
        found.append("git cat-file --batch-all-objects")
    for root, _, files in os.walk(repo):
        for name in files:
            path = os.path.join(root, name)
            try:
                data = open(path, "rb").read()
            except OSError:
                continue
            if needle in data:
                found.append(path)
            parent = os.path.basename(root)
            if len(parent) == 2 and os.path.basename(os.path.dirname(root)) == "objects":
                try:
                    if needle in zlib.decompress(data):
                        found.append(f"{path} (decompressed)")
                except zlib.error:
                    if not name.startswith("tmp_"):    # git's temporary files are not objects yet
                        found.append(f"{path} (not a zlib stream)")
    return found


def object_count(repo: Path) -> int:
    r = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch-all-objects", "--batch-check"],
                       capture_output=True, text=True, check=True)
    return len(r.stdout.splitlines())


def test_no_canary_plaintext_anywhere_on_disk(mounts, tmp_path):
    key = keygen(tmp_path / "k")
    m: Mount = mounts()
    # A long checkpoint interval keeps the journal's records on disk to be looked at.
    m.start(f"keyfile={key}", "checkpoint_interval=3600")
    assert "encrypted at rest" in m.log()
    sh("mkdir a1 a2", cwd=m.mp)
    for i in range(5):
        (m / "a1/config.json").write_text(json.dumps({"secret": CANARY, "i": i}))
    (m / "a1/memory.json").write_text(json.dumps({"notes": [CANARY] * 3}))
    (m / "a2/config.json").write_text(json.dumps({"k": CANARY + "-a2"}))
    # the read paths: live, @history (by id and HEAD~N), a temp renamed over, a state-to-state
    # rename, @patch, compare-and-swap
    assert json.loads((m / "a1/config.json").read_text())["i"] == 4
    assert json.loads((m / "a1/@history/HEAD~2/config.json").read_text())["i"] == 3   # HEAD: the memory write
    head = m.git("rev-parse", "main").strip()
    assert json.loads((m / f"@history/{head}/a1/config.json").read_text())["i"] == 4
    (m / "a2/tmp").write_text(json.dumps({"k": CANARY + "-tmp"}))
    os.rename(m / "a2/tmp", m / "a2/memory.json")
    os.rename(m / "a1/memory.json", m / "a1/config.json")     # state-to-state: re-sealed for its new path
    assert json.loads((m / "a1/config.json").read_text()) == {"notes": [CANARY] * 3}
    with open(m / "a2/@patch/memory.json", "w") as f:
        f.write(json.dumps({"patched": CANARY + "-patch"}))
    assert json.loads((m / "a2/memory.json").read_text()) == {"k": CANARY + "-tmp", "patched": CANARY + "-patch"}
    (m / "a2/cas").write_text(json.dumps({"cas": CANARY}))
    v = int(os.getxattr(m / "a2/memory.json", "user.agentstatefs.version"))
    os.setxattr(m / "a2/cas", "user.agentstatefs.if-version", str(v).encode())
    os.rename(m / "a2/cas", m / "a2/memory.json")
    # a copy out of @history is a restore (the sealed blob ids match), content unchanged
    # makes no commit
    (m / "a2/config.json").write_text(json.dumps({"k": CANARY + "-a2", "x": 1}))
    n = m.commit_count()
    (m / "a2/config.json").write_text(json.dumps({"k": CANARY + "-a2", "x": 1}))
    assert m.commit_count() == n
    shutil.copyfile(m / "a2/@history/HEAD~1/config.json", m / "a2/config.json")
    assert m.git("log", "-1", "--format=%s", "main").startswith("restore a2/config.json from ")
    assert json.loads((m / "a2/config.json").read_text()) == {"k": CANARY + "-a2"}
    # nothing readable while mounted (journal records + packs), and after a kill -9
    m.git_settled()
    jdir = m.repo / "agentstatefs" / "journal"
    assert any(p.stat().st_size for p in jdir.glob("*.log")), "the journal should hold records"
    assert plaintext_places(m.repo, CANARY.encode()) == []
    m.kill9()
    assert plaintext_places(m.repo, CANARY.encode()) == []
    m.start(f"keyfile={key}")            # replays the sealed journal
    assert json.loads((m / "a2/memory.json").read_text()) == {"cas": CANARY}
    assert json.loads((m / "a1/config.json").read_text()) == {"notes": [CANARY] * 3}
    assert m.stop() == 0
    assert plaintext_places(m.repo, CANARY.encode()) == []
    assert object_count(m.repo) > 20
    # meta.json is sealed too: no owner/mode/size facts in the clear
    assert plaintext_places(m.repo, b'"versions"') == []
    r = cli("fsck", "--repo", str(m.repo), "--keyfile", str(key))
    assert r.stdout.startswith("ok:"), r.stdout


def test_wrong_missing_and_unwanted_keys_refuse_the_mount(mounts, tmp_path):
    key, other = keygen(tmp_path / "k"), keygen(tmp_path / "other")
    m: Mount = mounts()
    m.start(f"keyfile={key}")
    (m / "a1").mkdir()
    (m / "a1/config.json").write_text('{"x": 1}')
    assert m.stop() == 0

    def refused(*options, env=None) -> str:
        r = subprocess.run(CLI + ["mount", "--repo", str(m.repo), str(m.mp)]
                           + [x for o in options for x in ("-o", o)],
                           capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
        assert r.returncode != 0
        assert not os.path.ismount(m.mp)
        return r.stderr

    assert "wrong key" in refused(f"keyfile={other}")
    assert "is encrypted: give its key" in refused()
    assert "No such file" in refused(f"keyfile={tmp_path}/nope")
    (tmp_path / "bad").write_bytes(b"not a key")
    assert "a key must be 64 bytes" in refused(f"keyfile={tmp_path}/bad")
    # the systemd credential 'key' is the key when no keyfile is given
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "key").write_bytes(other.read_bytes())
    assert "wrong key" in refused(env={"CREDENTIALS_DIRECTORY": str(creds)})
    (creds / "key").write_bytes(key.read_bytes())
    m.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert json.loads((m / "a1/config.json").read_text()) == {"x": 1}
    assert m.stop() == 0

    plain: Mount = mounts("plain")
    plain.start()
    (plain / "p1").mkdir()
    (plain / "p1/config.json").write_text('{"plain": 1}')
    assert plain.stop() == 0
    r = subprocess.run(CLI + ["mount", "--repo", str(plain.repo), str(plain.mp), "-o", f"keyfile={key}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unencrypted state" in r.stderr and "agentstatefs encrypt" in r.stderr


def _plant(repo: Path, agent: str, name: str, blob: pygit2.Oid) -> None:
    """Point main (and the checkpoint, which recovery trusts) at a commit whose
    ``agent/name`` is ``blob``: what an attacker with write access to the disk can do."""
    r = pygit2.Repository(str(repo))
    head = r.references["refs/heads/main"].target
    from agentstatefs.fs.layout import fanout
    a, b = fanout(agent)
    tree = r[head].tree
    l1, l2, at = tree[a], r[tree[a].id][b], r[r[tree[a].id][b].id][agent]
    tb = r.TreeBuilder(r[at.id])
    tb.insert(name, blob, pygit2.enums.FileMode.BLOB)
    t3 = r.TreeBuilder(r[l2.id])
    t3.insert(agent, tb.write(), pygit2.enums.FileMode.TREE)
    t2 = r.TreeBuilder(r[l1.id])
    t2.insert(b, t3.write(), pygit2.enums.FileMode.TREE)
    t1 = r.TreeBuilder(tree)
    t1.insert(a, t2.write(), pygit2.enums.FileMode.TREE)
    sig = pygit2.Signature("attacker", "a@b", 0, 0)
    new = r.create_commit(None, sig, sig, "planted", t1.write(), [head])
    r.references.create("refs/heads/main", new, force=True)
    cp = repo / "agentstatefs" / "checkpoint"
    d = json.loads(cp.read_text())
    d["commit"] = str(new)
    cp.write_text(json.dumps(d))


def test_plaintext_or_moved_blob_is_refused_not_served(mounts, tmp_path):
    key = keygen(tmp_path / "k")
    m: Mount = mounts()
    m.start(f"keyfile={key}")
    sh("mkdir a1 a2", cwd=m.mp)
    (m / "a1/config.json").write_text('{"a1": "config"}')
    (m / "a1/memory.json").write_text('{"a1": "memory"}')
    (m / "a2/config.json").write_text('{"a2": "config"}')
    assert m.stop() == 0
    r = pygit2.Repository(str(m.repo))
    plain = r.create_blob(b'{"planted": "plaintext"}')
    _plant(m.repo, "a1", "config.json", plain)
    # a2's sealed config moved to a1/memory.json: it does not open there
    moved = r.revparse_single(f"main:{m.tree_path('a2', 'config.json')}").id
    _plant(m.repo, "a1", "memory.json", moved)
    m.start(f"keyfile={key}")
    # the moved blob is refused at its new place even while its own place holds it open
    with open(m / "a2/config.json", "rb") as held:
        assert json.loads(held.read()) == {"a2": "config"}
        for name in ("config.json", "memory.json"):
            with pytest.raises(OSError) as e:
                (m / "a1" / name).read_bytes()
            assert e.value.errno == errno.EIO
    assert "plaintext blob in an encrypted store, refused" in m.log()
    assert "does not decrypt here" in m.log()
    # the daemon keeps serving the rest; a new version replaces the bad one
    assert json.loads((m / "a2/config.json").read_text()) == {"a2": "config"}
    (m / "a1/tmp").write_text('{"fixed": 1}')
    os.rename(m / "a1/tmp", m / "a1/config.json")
    assert json.loads((m / "a1/config.json").read_text()) == {"fixed": 1}
    os.unlink(m / "a1/memory.json")
    assert sorted(os.listdir(m / "a1")) == ["config.json"]
    assert m.stop() == 0
    r = cli("fsck", "--repo", str(m.repo), "--keyfile", str(key), check=False)
    assert r.returncode == 1
    assert "plaintext blob in an encrypted store" in r.stdout and "does not decrypt here" in r.stdout


def test_tenants_share_nothing(mounts, tmp_path):
    ka, kb = keygen(tmp_path / "ka"), keygen(tmp_path / "kb")
    a: Mount = mounts("tenant-a")
    b: Mount = mounts("tenant-b")
    a.start(f"keyfile={ka}")
    b.start(f"keyfile={kb}")
    same = json.dumps({"shared": CANARY})
    for t in (a, b):
        (t / "x1").mkdir()
        (t / "x1/config.json").write_text(same)
    assert not (b / "only-a").exists()
    (a / "only-a").mkdir()
    assert not (b / "only-a").exists()
    assert a.stop() == 0 and b.stop() == 0
    # even the same content at the same path is a different blob in each store
    ida = a.git("rev-parse", f"main:{a.tree_path('x1', 'config.json')}").strip()
    idb = b.git("rev-parse", f"main:{b.tree_path('x1', 'config.json')}").strip()
    assert ida != idb
    rec_a, rec_b = crypto.read_record(str(a.repo)), crypto.read_record(str(b.repo))
    assert rec_a["store_id"] != rec_b["store_id"]
    # one tenant's key opens nothing of the other's: mount, CLI and fsck all refuse
    r = subprocess.run(CLI + ["mount", "--repo", str(b.repo), str(b.mp), "-o", f"keyfile={ka}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "wrong key" in r.stderr
    r = cli("show", "--repo", str(b.repo), "--keyfile", str(ka), "HEAD", "x1/config.json", check=False)
    assert r.returncode == 1 and "wrong key" in r.stderr
    # even given the other's key check, its blobs do not open under this key
    blob_b = pygit2.Repository(str(b.repo))[idb].data
    cipher_a = crypto.Cipher(crypto.read_keyfile(str(ka)), bytes.fromhex(rec_b["store_id"]))
    with pytest.raises(crypto.CryptoError):
        cipher_a.open_blob("x1", "config.json", blob_b)
    assert json.loads(cli("show", "--repo", str(b.repo), "--keyfile", str(kb), "HEAD",
                          "x1/config.json").stdout) == {"shared": CANARY}


def test_cli_verbs_take_the_key(mounts, tmp_path):
    key = keygen(tmp_path / "k")
    m: Mount = mounts()
    m.start(f"keyfile={key}")
    (m / "a1").mkdir()
    for v in (1, 2, 3):
        (m / "a1/config.json").write_text(json.dumps({"v": v, "s": CANARY}))
    # on a mounted store the verbs read with the key too
    assert json.loads(cli("show", "--repo", str(m.repo), "--keyfile", str(key), "HEAD~1",
                          "a1/config.json").stdout)["v"] == 2
    r = cli("restore", "--repo", str(m.repo), "--keyfile", str(key), "a1", "config.json", "HEAD~2")
    assert "through" in r.stdout
    assert json.loads((m / "a1/config.json").read_text())["v"] == 1
    assert m.stop() == 0
    k = ["--repo", str(m.repo), "--keyfile", str(key)]
    assert json.loads(cli("show", *k, "HEAD~2", "a1/config.json").stdout)["v"] == 2
    log = cli("log", *k, "a1").stdout.splitlines()
    assert len(log) == 5 and "restore a1/config.json" in log[0]
    diff = cli("diff", *k, "HEAD~1", "HEAD", "a1/config.json").stdout
    assert '-{"v": 3' in diff and '+{"v": 1' in diff
    r = cli("restore", *k, "a1", "config.json", "HEAD~1")       # unmounted: through the store
    assert json.loads(cli("show", *k, "HEAD", "a1/config.json").stdout)["v"] == 3
    assert cli("fsck", *k).stdout.startswith("ok:")
    # without the key: refused with the reason, nothing printed
    for verb in (["show", "HEAD", "a1/config.json"], ["log"], ["diff", "HEAD~1", "HEAD"],
                 ["restore", "a1", "config.json", "HEAD~1"]):
        r = cli(verb[0], "--repo", str(m.repo), *verb[1:], check=False)
        assert r.returncode == 1 and "is encrypted: give its key" in r.stderr and r.stdout == ""
    r = cli("fsck", "--repo", str(m.repo), check=False)
    assert r.returncode == 1 and "is encrypted" in r.stdout
    assert plaintext_places(m.repo, CANARY.encode()) == []
    # offline retention and gc need the key too (recovery replays the sealed journal first)
    r = cli("prune", "--repo", str(m.repo), "--keep-last", "2", check=False)
    assert r.returncode == 1 and "is encrypted" in r.stderr
    cli("prune", *k, "--keep-last", "2")
    cli("gc", *k)
    assert len(cli("log", *k).stdout.splitlines()) == 2
    assert json.loads(cli("show", *k, "HEAD", "a1/config.json").stdout)["v"] == 3
    assert cli("fsck", *k).stdout.startswith("ok:")
    assert plaintext_places(m.repo, CANARY.encode()) == []


def test_encrypt_an_existing_store_into_a_new_one(mounts, tmp_path):
    key = keygen(tmp_path / "k")
    p: Mount = mounts("plain")
    p.start()
    sh("mkdir a1 a2", cwd=p.mp)
    for v in (1, 2, 3):
        (p / "a1/config.json").write_text(json.dumps({"v": v, "s": CANARY}))
    cli("restore", "--repo", str(p.repo), "a1", "config.json", "HEAD~2")    # v1, a restore
    (p / "a2/memory.json").write_text(json.dumps({"m": CANARY}))
    os.chmod(p / "a2/memory.json", 0o600)
    commits = p.commit_count()
    assert p.stop() == 0
    assert plaintext_places(p.repo, CANARY.encode()) != []     # the test can see plaintext
    new = tmp_path / "encrypted-repo"
    r = cli("encrypt", "--repo", str(p.repo), "--keyfile", str(key), str(new))
    assert f"{commits} commits" in r.stdout
    assert plaintext_places(new, CANARY.encode()) == []
    e: Mount = mounts("enc", repo=new)
    assert "is encrypted" in cli("mount", "--repo", str(new), str(e.mp), check=False).stderr
    e.start(f"keyfile={key}")
    assert json.loads((e / "a1/config.json").read_text()) == {"v": 1, "s": CANARY}
    assert json.loads((e / "a1/@history/HEAD~1/config.json").read_text())["v"] == 3
    assert (os.stat(e / "a2/memory.json").st_mode & 0o777) == 0o600
    assert e.commit_count() == commits
    subject = e.git("log", "-1", "--format=%s", "--", e.tree_path("a1", "config.json"))
    old_from = subject.split(" from ")[1].split()[0]
    assert e.git("rev-parse", old_from).strip() in e.git("rev-list", "main")   # rewritten to the new id
    (e / "a1/memory.json").write_text(json.dumps({"after": CANARY}))
    assert e.stop() == 0
    assert plaintext_places(new, CANARY.encode()) == []
    # the source is left as it was; a second run into a used directory is refused
    r = cli("encrypt", "--repo", str(p.repo), "--keyfile", str(key), str(new), check=False)
    assert r.returncode == 1 and "not empty" in r.stderr
    r = cli("encrypt", "--repo", str(new), "--keyfile", str(key), str(tmp_path / "x"), check=False)
    assert r.returncode == 1 and "encrypted already" in r.stderr


def test_replica_of_an_encrypted_store(mounts, tmp_path):
    """Replication pushes sealed objects only; a replica needs the writer's record
    (agentstatefs/encryption.json, no secret in it) and the key."""
    import time
    key = keygen(tmp_path / "k")
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    url = f"file://{bare}"
    w: Mount = mounts("w")
    w.start(f"keyfile={key}", f"replicate={url},replicate_interval=0.2")
    (w / "a1").mkdir()
    (w / "a1/config.json").write_text(json.dumps({"s": CANARY}))
    w.git_settled()
    head = os.getxattr(w.mp, "user.agentstatefs.git-head").decode()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = subprocess.run(["git", "ls-remote", url, "refs/heads/main"], capture_output=True, text=True)
        if r.stdout.split()[:1] == [head]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the push did not arrive")
    assert plaintext_places(bare, CANARY.encode()) == []
    r: Mount = mounts("r")
    refused = subprocess.run(CLI + ["mount", "--repo", str(r.repo), str(r.mp), "--replica", url,
                                    "-o", f"keyfile={key}"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "unencrypted state" in refused.stderr
    (r.repo / "agentstatefs").mkdir(exist_ok=True)
    shutil.copyfile(w.repo / "agentstatefs" / crypto.RECORD_NAME, r.repo / "agentstatefs" / crypto.RECORD_NAME)
    refused = subprocess.run(CLI + ["mount", "--repo", str(r.repo), str(r.mp), "--replica", url],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "is encrypted" in refused.stderr
    r.start(f"keyfile={key}", "replica_interval=0.2", extra=("--replica", url))
    assert json.loads((r / "a1/config.json").read_text()) == {"s": CANARY}
