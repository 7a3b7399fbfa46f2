"""Repository checks (``agentstatefs fsck``) and packing (``agentstatefs gc``).

fsck reads every object reachable from ``main`` once and recomputes its SHA-1, checks
each agent's ``meta.json`` against its files (sizes, valid JSON), the checkpoint and
the journal; in an encrypted store every blob of every agent tree in the history and
every journal record must open with the key given (and a plaintext one is a problem, as
is an encrypted one in a plaintext store). It runs ``git fsck --full --strict`` for the syntax of every object
(malformed author lines, trees, tags) and the connectivity of every ref. It never
modifies the repository.

gc packs every reachable object with ``git repack -a -d`` (packs fsynced) and prunes
every unreachable one. While mounted it runs through the daemon (which keeps new
objects in memory meanwhile); offline, after recovery.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field

import pygit2
from pygit2.enums import ObjectType, Option

from . import crypto
from .journal import Journal
from .names import DURABLE_FILES, META_FILE
from .validate import check_json

_TYPE = {ObjectType.COMMIT: b"commit", ObjectType.TREE: b"tree", ObjectType.BLOB: b"blob"}
_HEX_ID = re.compile(rb"[0-9a-f]{40}")
GIT_DURABLE = ["-c", "core.fsync=objects,derived-metadata", "-c", "core.fsyncMethod=fsync"]


@dataclass
class Report:
    commits: int = 0
    objects: int = 0
    agents: int = 0
    journal_records: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _verify(repo: pygit2.Repository, oid: pygit2.Oid, report: Report) -> tuple | None:
    try:
        kind, data = repo.odb.read(oid)
    except Exception as exc:  # missing, unreadable, bad zlib
        report.problems.append(f"object {oid} is missing or unreadable: {exc}")
        return None
    report.objects += 1
    header = _TYPE.get(kind, b"?") + b" " + str(len(data)).encode() + b"\0"
    if hashlib.sha1(header + data).hexdigest() != str(oid):
        report.problems.append(f"object {oid} is corrupt (content does not match its id)")
        return None
    return kind, data


def _open(repo_dir: str) -> pygit2.Repository:
    """Open for reading even when another user (the daemon's) owns the repository."""
    validating = pygit2.option(Option.GET_OWNER_VALIDATION)
    pygit2.option(Option.SET_OWNER_VALIDATION, 0)
    try:
        return pygit2.Repository(repo_dir)
    finally:
        pygit2.option(Option.SET_OWNER_VALIDATION, validating)


def check(repo_dir: str, key: bytes | None = None) -> Report:
    report = Report()
    try:
        repo = _open(repo_dir)
    except (pygit2.GitError, KeyError) as exc:
        report.problems.append(f"not a git repository: {exc}")
        return report
    try:
        codec = crypto.codec_for(repo_dir, repo, key, fresh=False, create=False)
    except crypto.CryptoError as exc:
        report.problems.append(f"encryption: {exc}")
        codec = None   # structure and git checks still run; contents cannot be verified
    _check_main(repo, repo_dir, report, codec)
    _check_git(repo_dir, report)
    return report


def _parse_commit(oid, kind, data: bytes) -> tuple[pygit2.Oid, list[pygit2.Oid]]:
    """Tree and parents of a commit from its raw bytes (the rest is git fsck's job)."""
    if kind != ObjectType.COMMIT:
        raise ValueError(f"object {oid} is a {_TYPE.get(kind, b'?').decode()}, not a commit")
    tree, parents = None, []
    for line in data.split(b"\n\n", 1)[0].split(b"\n"):
        key, _, value = line.partition(b" ")
        if key not in (b"tree", b"parent"):
            continue
        if not _HEX_ID.fullmatch(value):
            raise ValueError(f"commit {oid} is malformed: bad {key.decode()} line")
        if key == b"tree" and tree is None:
            tree = pygit2.Oid(hex=value.decode())
        elif key == b"parent":
            parents.append(pygit2.Oid(hex=value.decode()))
    if tree is None:
        raise ValueError(f"commit {oid} is malformed: no tree")
    return tree, parents


def _open_blob(codec, agent: str, name: str, data: bytes, report: Report) -> bytes | None:
    if codec is None:
        return None
    try:
        return codec.open_blob(agent, name, data)
    except crypto.CryptoError as exc:
        report.problems.append(str(exc))
        return None


def _check_main(repo: pygit2.Repository, repo_dir: str, report: Report, codec=crypto.PLAIN) -> None:
    try:
        ref = repo.references.get("refs/heads/main")
    except (pygit2.GitError, ValueError) as exc:
        report.problems.append(f"branch main unreadable: {exc}")
        return
    if ref is None:
        return  # empty repository
    seen: set = set()
    oid = ref.target
    chain = []
    head_tree = None
    while oid is not None:
        got = _verify(repo, oid, report)
        if got is None:
            break
        try:
            tree_id, parents = _parse_commit(oid, *got)
        except ValueError as exc:
            report.problems.append(str(exc))
            break
        report.commits += 1
        chain.append(str(oid))
        if head_tree is None:
            head_tree = tree_id
        stack = [(tree_id, 0, "")]    # (tree, depth: 3 = an agent's tree, agent id)
        while stack:
            t, depth, agent = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if _verify(repo, t, report) is None:
                continue
            try:
                entries = list(repo[t])
            except (pygit2.GitError, ValueError, KeyError) as exc:
                report.problems.append(f"tree {t} is unreadable: {exc}")
                continue
            for entry in entries:
                if entry.type == ObjectType.TREE:
                    stack.append((entry.id, depth + 1, entry.name if depth == 2 else agent))
                elif depth == 3 and codec is not None and codec.encrypted:
                    # Every place a blob appears must open it (a sealed blob copied to
                    # another agent or file does not).
                    placed = (entry.id, agent, entry.name)
                    if placed not in seen:
                        seen.add(placed)
                        got = _verify(repo, entry.id, report)
                        if got is not None:
                            _open_blob(codec, agent, entry.name, got[1], report)
                elif entry.id not in seen:
                    seen.add(entry.id)
                    got = _verify(repo, entry.id, report)
                    if got is not None and depth == 3:
                        _open_blob(codec, agent, entry.name, got[1], report)   # no sealed blob
        oid = parents[0] if parents else None
    if head_tree is not None:
        try:
            _check_agents(repo, repo[head_tree], report, codec)
        except (pygit2.GitError, ValueError, KeyError) as exc:
            report.problems.append(f"agent trees of main unreadable: {exc}")
    _check_journal(repo_dir, chain, report, codec)


GIT_FSCK_MAX_LINES = 100


def git_fsck_command(repo_dir: str) -> list[str]:
    # safe.directory: the repository may belong to another user (the daemon's), and
    # git would otherwise refuse to look at it ("dubious ownership").
    return ["git", "-c", f"safe.directory={os.path.realpath(repo_dir)}", "-C", repo_dir,
            "fsck", "--full", "--strict", "--no-dangling", "--no-progress"]


def _check_git(repo_dir: str, report: Report) -> None:
    """``git fsck --full --strict``: each line of a failed run becomes a problem."""
    try:
        r = subprocess.run(git_fsck_command(repo_dir), capture_output=True, text=True,
                           errors="replace", stdin=subprocess.DEVNULL)
    except OSError as exc:
        report.problems.append(f"git fsck could not run: {exc}")
        return
    if r.returncode == 0:
        return  # what it printed (notices, warnings) is not a failure under --strict
    lines = [line.strip() for line in (r.stderr + "\n" + r.stdout).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("notice:", "dangling "))]
    for line in lines[:GIT_FSCK_MAX_LINES]:
        report.problems.append(f"git fsck: {line}")
    if len(lines) > GIT_FSCK_MAX_LINES:
        report.problems.append(f"git fsck: ... and {len(lines) - GIT_FSCK_MAX_LINES} more lines")
    if not lines:
        report.problems.append(f"git fsck --full --strict failed (exit {r.returncode})")


def _check_agents(repo, root, report: Report, codec) -> None:
    if root is None:
        return
    for l1 in root:
        if l1.type != ObjectType.TREE:
            continue
        for l2 in repo[l1.id]:
            for agent in repo[l2.id]:
                report.agents += 1
                where = f"agent {agent.name} ({l1.name}/{l2.name})"
                try:
                    tree = repo[agent.id]
                    meta_blob = repo[tree[META_FILE].id].data
                    if codec is None:
                        continue   # encrypted, no key: nothing more to check here
                    meta = json.loads(codec.open_blob(agent.name, META_FILE, meta_blob))
                except Exception as exc:
                    report.problems.append(f"{where}: meta.json missing or invalid: {exc}")
                    continue
                for entry in tree:
                    if entry.name == META_FILE:
                        continue
                    if entry.name not in DURABLE_FILES:
                        report.problems.append(f"{where}: unexpected entry {entry.name}")
                        continue
                    try:
                        data = codec.open_blob(agent.name, entry.name, repo[entry.id].data)
                        check_json(data)
                    except Exception as exc:
                        report.problems.append(f"{where}/{entry.name}: {exc}")
                        continue
                    fm = meta.get("files", {}).get(entry.name)
                    if fm is None or fm.get("size") != len(data):
                        report.problems.append(f"{where}/{entry.name}: meta.json disagrees with the file")


def _check_journal(repo_dir: str, chain: list[str], report: Report, codec=crypto.PLAIN) -> None:
    meta = os.path.join(repo_dir, "agentstatefs")
    cp_path = os.path.join(meta, "checkpoint")
    seq = 0
    if os.path.exists(cp_path):
        try:
            with open(cp_path) as f:
                cp = json.load(f)
            seq = int(cp.get("seq", 0))
            if cp.get("commit") and cp["commit"] not in chain:
                report.problems.append(f"checkpoint commit {cp['commit']} is not on branch main")
        except (OSError, ValueError) as exc:
            report.problems.append(f"checkpoint unreadable: {exc}")
    jdir = os.path.join(meta, "journal")
    if os.path.isdir(jdir):
        try:
            report.journal_records = sum(1 for _ in Journal(jdir, codec=codec).read_after(seq))
        except OSError as exc:
            report.problems.append(f"journal unreadable: {exc}")
        except crypto.CryptoError as exc:
            report.problems.append(f"journal: {exc}")


def loose_object_count(repo_dir: str) -> int:
    objects = os.path.join(repo_dir, "objects")
    total = 0
    for name in os.listdir(objects):
        if len(name) == 2:
            try:
                total += len(os.listdir(os.path.join(objects, name)))
            except OSError:
                pass
    return total


def geometric_repack_command(repo_dir: str) -> list[str]:
    """Combine small packs (the daemon writes one per commit group) so that pack sizes
    form a geometric progression: cost proportional to the small packs, not the repo."""
    return ["git", "-C", repo_dir, *GIT_DURABLE, "repack", "-d", "-q", "--geometric=2"]


def repack_command(repo_dir: str) -> list[str]:
    """Pack everything (loose objects and the daemon's per-group packs) into one fsynced
    pack and delete what it replaces."""
    return ["git", "-C", repo_dir, *GIT_DURABLE, "repack", "-a", "-d", "-q"]


def gc_commands(repo_dir: str) -> list[list[str]]:
    """Pack every reachable object into one fsynced pack, deleting the packs it replaces
    with the unreachable objects they held (the old chain after a prune, commits dropped
    by recovery), then delete unreachable loose objects. Only safe when nothing is being
    written that ``main`` does not name yet: offline, or with the daemon holding its
    writes in memory (``Store.hold_for_gc``)."""
    return [repack_command(repo_dir), ["git", "-C", repo_dir, "prune", "--expire=now"]]


def repo_bytes(repo_dir: str) -> int:
    """Bytes of git objects (packs and loose) in the repository."""
    total = 0
    for root, _, files in os.walk(os.path.join(repo_dir, "objects")):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def gc(repo_dir: str) -> tuple[int, int]:
    """Pack and prune an unmounted, recovered repository; returns object bytes (before, after)."""
    before = repo_bytes(repo_dir)
    for cmd in gc_commands(repo_dir):
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return before, repo_bytes(repo_dir)
