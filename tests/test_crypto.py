"""Encryption at rest, in-process: keys, the codec, and the Store with and without a key."""

import base64
import binascii
import errno
import json
import os
import stat
import time

import pygit2
import pytest

from agentstatefs.fs import changes as ch
from agentstatefs.fs import crypto
from agentstatefs.fs.errors import FsError, RepoError
from agentstatefs.fs.layout import agent_path
from agentstatefs.fs.store import Store

WHO = ch.Who(0, 0, 1, "test")


def write(store, agent, name, data: bytes, op=ch.WRITE):
    return store.commit_batch([ch.Change(op, agent, WHO, time.time_ns(), files={name: data})])[0]


def mkdir(store, agent):
    return store.commit_batch([ch.Change(ch.MKDIR, agent, WHO, time.time_ns())])[0]


def test_key_formats(tmp_path):
    raw = os.urandom(64)
    assert crypto.parse_key(raw) == raw
    assert crypto.parse_key(binascii.hexlify(raw) + b"\n") == raw
    assert crypto.parse_key(base64.b64encode(raw) + b"\n") == raw
    for bad in (b"", b"short", os.urandom(63), b"z" * 128, binascii.hexlify(raw)[:-2]):
        with pytest.raises(crypto.CryptoError):
            crypto.parse_key(bad)
    path = tmp_path / "k"
    crypto.write_keyfile(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(crypto.read_keyfile(str(path))) == 64
    with pytest.raises(FileExistsError):
        crypto.write_keyfile(str(path))           # never overwrites a key
    with pytest.raises(crypto.CryptoError, match="No such file"):
        crypto.read_keyfile(str(tmp_path / "missing"))


def test_codec_is_deterministic_and_bound_to_its_place():
    key, sid = os.urandom(64), os.urandom(16)
    c = crypto.Cipher(key, sid)
    data = b'{"secret": "canary-1"}'
    sealed = c.seal_blob("a1", "config.json", data)
    assert sealed.startswith(crypto.MAGIC) and b"canary" not in sealed
    assert c.seal_blob("a1", "config.json", data) == sealed          # dedups
    assert crypto.Cipher(key, sid).open_blob("a1", "config.json", sealed) == data
    for agent, name in (("a2", "config.json"), ("a1", "memory.json")):
        with pytest.raises(crypto.CryptoError, match="does not decrypt"):
            c.open_blob(agent, name, sealed)
    with pytest.raises(crypto.CryptoError):
        crypto.Cipher(key, os.urandom(16)).open_blob("a1", "config.json", sealed)   # other store
    with pytest.raises(crypto.CryptoError):
        crypto.Cipher(os.urandom(64), sid).open_blob("a1", "config.json", sealed)   # other key
    with pytest.raises(crypto.CryptoError, match="plaintext blob"):
        c.open_blob("a1", "config.json", data)
    with pytest.raises(crypto.CryptoError, match="encrypted blob"):
        crypto.PLAIN.open_blob("a1", "config.json", sealed)
    rec = c.seal_record(7, b"payload")
    assert c.open_record(7, rec) == b"payload"
    with pytest.raises(crypto.CryptoError):
        c.open_record(8, rec)                                           # bound to its seq
    with pytest.raises(crypto.CryptoError):
        crypto.PLAIN.open_record(7, rec)
    # a tampered byte anywhere is refused
    bad = bytearray(sealed)
    bad[-1] ^= 1
    with pytest.raises(crypto.CryptoError):
        c.open_blob("a1", "config.json", bytes(bad))


def test_store_encrypts_blobs_and_journal_and_refuses_wrong_keys(tmp_path):
    repo = str(tmp_path / "repo")
    key = os.urandom(64)
    s = Store(repo, key=key)
    assert s.codec.encrypted and crypto.read_record(repo) is not None
    assert mkdir(s, "a1") is not None
    v1 = b'{"canary": "zebra-quartz-1"}'
    c1 = write(s, "a1", "config.json", v1)
    assert isinstance(c1, pygit2.Oid)
    assert write(s, "a1", "config.json", v1) is None        # unchanged: no commit
    c2 = write(s, "a1", "config.json", b'{"v": 2}')
    assert isinstance(c2, pygit2.Oid)
    # a copy of a past version (the namespace names its blob id in ``sources``): a restore
    blob = str(s.git.blob_id("a1", "config.json", v1))
    assert blob == str(s.git.repo[c1].tree[agent_path("a1") + "/config.json"].id)
    r = s.commit_batch([ch.Change(ch.WRITE, "a1", WHO, time.time_ns(), files={"config.json": v1},
                                  sources={blob: str(c1)})])[0]
    assert isinstance(r, pygit2.Oid) and s.history.entries[-1].op == ch.RESTORE
    assert s.git.read_file("a1", "config.json") == v1
    # the journal holds sealed records only
    jdir = os.path.join(repo, "agentstatefs", "journal")
    raw = b"".join(open(os.path.join(jdir, n), "rb").read() for n in os.listdir(jdir))
    assert raw and b"zebra-quartz" not in raw and b'"op"' not in raw
    s.journal.close()            # as a crash: no final checkpoint, replay at next open
    with pytest.raises(RepoError, match="is encrypted"):
        Store(repo)
    with pytest.raises(RepoError, match="wrong key"):
        Store(repo, key=os.urandom(64))
    s2 = Store(repo, key=key)   # replays the sealed journal
    assert s2.git.read_file("a1", "config.json") == v1
    assert s2.git.head == s.git.head
    s2.close()


def test_key_for_a_plaintext_store_is_refused(tmp_path):
    repo = str(tmp_path / "repo")
    s = Store(repo)
    mkdir(s, "a1")
    s.close()
    with pytest.raises(RepoError, match="unencrypted state"):
        Store(repo, key=os.urandom(64))
    # a fresh (empty) store may start encrypted
    Store(str(tmp_path / "new"), key=os.urandom(64)).close()


def test_record_deleted_is_still_an_encrypted_store(tmp_path):
    repo = str(tmp_path / "repo")
    key = os.urandom(64)
    s = Store(repo, key=key)
    mkdir(s, "a1")
    s.close()
    os.unlink(crypto.record_path(repo))
    for k in (None, key):
        with pytest.raises(RepoError, match="marked encrypted"):
            Store(repo, key=k)


def test_unopenable_blob_is_eio_not_served(tmp_path):
    """A plaintext blob planted at a1/config.json: the store answers EIO."""
    repo = str(tmp_path / "repo")
    key = os.urandom(64)
    s = Store(repo, key=key)
    mkdir(s, "a1")
    write(s, "a1", "config.json", b'{"ok": 1}')
    view = s.git.agent("a1")
    planted = s.git.repo.create_blob(b'{"planted": true}')
    with pytest.raises(FsError) as e:
        s.git.read_blob(planted, "a1", "config.json")
    assert e.value.errno == errno.EIO
    # a sealed blob of another place does not open here either
    with pytest.raises(FsError):
        s.git.read_blob(view.files["config.json"], "a1", "memory.json")
    assert json.loads(s.git.read_blob(view.files["config.json"], "a1", "config.json")) == {"ok": 1}
    s.close()
