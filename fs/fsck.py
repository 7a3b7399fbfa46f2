"""Repository checks (``agentstatefs fsck``) and packing (``agentstatefs gc``).

fsck reads every object reachable from ``main`` once and recomputes its SHA-1, checks
each agent's ``meta.json`` against its files (sizes, valid JSON), the checkpoint and
the journal. It never modifies the repository.

gc packs loose objects with ``git repack -d`` (packs fsynced) and prunes unreachable
objects older than two weeks. It takes no ref locks, so it is safe while mounted.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field

import pygit2
from pygit2.enums import ObjectType

from .journal import Journal
from .names import DURABLE_FILES, META_FILE
from .validate import check_json

_TYPE = {ObjectType.COMMIT: b"commit", ObjectType.TREE: b"tree", ObjectType.BLOB: b"blob"}
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


def check(repo_dir: str) -> Report:
    report = Report()
    try:
        repo = pygit2.Repository(repo_dir)
    except (pygit2.GitError, KeyError) as exc:
        report.problems.append(f"not a git repository: {exc}")
        return report
    try:
        ref = repo.references.get("refs/heads/main")
    except (pygit2.GitError, ValueError) as exc:
        report.problems.append(f"branch main unreadable: {exc}")
        return report
    if ref is None:
        return report  # empty repository
    seen: set = set()
    oid = ref.target
    chain = []
    while oid is not None:
        got = _verify(repo, oid, report)
        if got is None:
            break
        report.commits += 1
        commit = repo[oid]
        chain.append(str(oid))
        stack = [commit.tree_id]
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if _verify(repo, t, report) is None:
                continue
            for entry in repo[t]:
                if entry.type == ObjectType.TREE:
                    stack.append(entry.id)
                elif entry.id not in seen:
                    seen.add(entry.id)
                    _verify(repo, entry.id, report)
        oid = commit.parent_ids[0] if commit.parents else None
    _check_agents(repo, repo[ref.target].tree if report.commits else None, report)
    _check_journal(repo_dir, chain, report)
    return report


def _check_agents(repo, root, report: Report) -> None:
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
                    meta = json.loads(repo[tree[META_FILE].id].data)
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
                        data = repo[entry.id].data
                        check_json(data)
                    except Exception as exc:
                        report.problems.append(f"{where}/{entry.name}: {exc}")
                        continue
                    fm = meta.get("files", {}).get(entry.name)
                    if fm is None or fm.get("size") != len(data):
                        report.problems.append(f"{where}/{entry.name}: meta.json disagrees with the file")


def _check_journal(repo_dir: str, chain: list[str], report: Report) -> None:
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
            report.journal_records = sum(1 for _ in Journal(jdir).read_after(seq))
        except OSError as exc:
            report.problems.append(f"journal unreadable: {exc}")


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


def repack_command(repo_dir: str) -> list[str]:
    """Pack loose reachable objects into one fsynced pack and delete the packed loose ones."""
    return ["git", "-C", repo_dir, *GIT_DURABLE, "repack", "-d", "-q"]


def gc(repo_dir: str) -> tuple[int, int]:
    """Pack and prune; returns loose object counts (before, after)."""
    before = loose_object_count(repo_dir)
    subprocess.run(repack_command(repo_dir), check=True, capture_output=True, text=True)
    subprocess.run(["git", "-C", repo_dir, "prune", "--expire=2.weeks.ago"], check=True,
                   capture_output=True, text=True)
    return before, loose_object_count(repo_dir)
