"""Encrypting an existing store: a copy of its whole history into a new, encrypted repository.

``encrypt_copy(SRC, DST, key)`` (the ``agentstatefs encrypt`` verb) replays every commit
of SRC's ``main``, oldest first, into DST with each blob of an agent's tree sealed for
its place (fs/crypto.py) and everything else (fan-out trees, authors, times, messages)
kept; so DST has the same number of commits with the same history, under new ids (a
restore's ``from <commit>`` is rewritten to the new id). SRC is never modified: the
operator swaps the directories once DST checks out, then destroys SRC (its objects are
plaintext). A copy rather than a rewrite in place, because plaintext objects in place
would survive in packs until a prune, and a crash half-way through an in-place rewrite
would leave a store that is neither. A crash here leaves SRC as it was and DST to delete.
"""

from __future__ import annotations

import hashlib
import os
import re

import pygit2
from pygit2.enums import ObjectType, SortMode

from . import crypto, mempack
from .errors import RepoError
from .gitstore import BRANCH, _Tree
from .repolock import RepoLock
from .store import Store

_RESTORE_FROM = re.compile(rb"^(restore .* from )([0-9a-f]{7})\b")
CHUNK_OBJECTS = 20000


class _Writer:
    def __init__(self, repo_dir: str):
        self.repo_dir = repo_dir
        self.objects: dict = {}
        self.written = 0

    def put(self, kind: int, data: bytes) -> pygit2.Oid:
        header = b"%s %d\x00" % (mempack.TYPE_NAMES[kind], len(data))
        oid = pygit2.Oid(raw=hashlib.sha1(header + data).digest())
        self.objects[oid] = (kind, bytes(data))
        if len(self.objects) >= CHUNK_OBJECTS:
            self.flush()
        return oid

    def flush(self) -> None:
        if self.objects:
            mempack.write_pack(self.repo_dir, self.objects, durable=True)
            self.written += len(self.objects)
            self.objects = {}


def encrypt_copy(src_dir: str, dst_dir: str, key: bytes) -> dict:
    """Copy SRC into a new encrypted repository DST; returns counts for the report."""
    src_dir, dst_dir = os.path.abspath(src_dir), os.path.abspath(dst_dir)
    if os.path.exists(dst_dir) and os.listdir(dst_dir):
        raise RepoError(f"{dst_dir} exists and is not empty; give a new directory")
    if not os.path.isdir(os.path.join(src_dir, "objects")):
        raise RepoError(f"{src_dir} is not an agentstatefs repository")
    if crypto.read_record(src_dir) is not None:
        raise RepoError(f"{src_dir} is encrypted already")
    lock = RepoLock(src_dir)
    lock.acquire("(agentstatefs encrypt)")
    try:
        # Recover and checkpoint: every acknowledged write is in git, the journal is empty.
        Store(src_dir).close()
        src = pygit2.Repository(src_dir)
        others = [r for r in src.references if r not in (BRANCH,)]
        if others:
            raise RepoError(f"{src_dir} has references besides main ({', '.join(others)}); "
                            f"only main is copied, remove them first")
        os.makedirs(dst_dir, mode=0o700, exist_ok=True)
        dst = pygit2.init_repository(dst_dir, bare=True, initial_head="main")
        cipher = crypto.create_record(dst_dir, dst, key)
        out = _Writer(dst_dir)
        trees: dict = {}
        blobs = 0

        def copy_tree(oid: pygit2.Oid, depth: int, agent: str) -> pygit2.Oid:
            nonlocal blobs
            memo = (oid, agent)
            if memo in trees:
                return trees[memo]
            info = {}
            for e in src[oid]:
                if e.type == ObjectType.TREE:
                    new = copy_tree(e.id, depth + 1, e.name if depth == 2 else agent)
                else:
                    data = src[e.id].data
                    if depth == 3:    # a blob of an agent's tree: sealed for agent/name
                        data = cipher.seal_blob(agent, e.name, data)
                        blobs += 1
                    new = out.put(ObjectType.BLOB, data)
                info[e.name] = (int(e.filemode), new.raw)
            new = out.put(ObjectType.TREE, _Tree.build(info).encode())
            trees[memo] = new
            return new

        ref = src.references.get(BRANCH)
        head = None
        renamed: dict[bytes, bytes] = {}   # old 7-digit prefix -> new one, for restore subjects
        commits = 0
        if ref is not None:
            for commit in src.walk(ref.target, SortMode.TOPOLOGICAL | SortMode.REVERSE):
                raw = src.odb.read(commit.id)[1]
                headers, sep, message = raw.partition(b"\n\n")
                lines = [b"tree %s" % str(copy_tree(commit.tree_id, 0, "")).encode()]
                lines += [b"parent %s" % str(p).encode() for p in ([head] if head is not None else [])]
                lines += [line for line in headers.split(b"\n") if not line.startswith((b"tree ", b"parent "))]
                m = _RESTORE_FROM.match(message)
                if m and m.group(2) in renamed:
                    message = m.group(1) + renamed[m.group(2)] + message[m.end():]
                head = out.put(ObjectType.COMMIT, b"\n".join(lines) + sep + message)
                renamed[str(commit.id)[:7].encode()] = str(head)[:7].encode()
                commits += 1
        out.flush()
        if head is not None:
            dst.references.create(BRANCH, head, force=True)
        # Opening the copy checkpoints it (syncfs) and builds its history index.
        copy = Store(dst_dir, key=key)
        try:
            _compare(src, ref.target if ref is not None else None, copy)
        finally:
            copy.close()
        return {"commits": commits, "blobs": blobs, "objects": out.written}
    finally:
        lock.release()


def _compare(src: pygit2.Repository, head, copy: Store) -> None:
    """Every agent's files at the head read back (decrypted) as in SRC."""
    if head is None:
        if copy.git.head is not None:
            raise RepoError("the copy has commits the source lacks")
        return
    from .gitstore import GitStore
    plain = GitStore(src.path, create=False)
    try:
        agents = set(plain.agents())
        if agents != set(copy.git.agents()):
            raise RepoError("the copy's agents differ from the source's")
        for agent in sorted(agents):
            a, b = plain.agent(agent), copy.git.agent(agent)
            if a.meta != b.meta or set(a.files) != set(b.files):
                raise RepoError(f"agent {agent} differs in the copy")
            for name in a.files:
                if plain.read_file(agent, name) != copy.git.read_file(agent, name):
                    raise RepoError(f"{agent}/{name} differs in the copy")
    finally:
        plain.close()
