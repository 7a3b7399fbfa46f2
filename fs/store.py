"""The durable store: git + journal, with crash recovery, group commit and checkpoints.

Flow of a commit (``commit_batch``): every Change in the group is applied to git
(objects and ref written, unsynced), its record appended to the journal, then ONE
``fdatasync`` of the journal makes the whole group durable. A background checkpoint
``syncfs``-es the repository's filesystem, records ``(commit, seq)`` in
``agentstatefs/checkpoint`` and drops the journal segments it covers.

Recovery (on open): reset ``main`` to the checkpointed commit and replay the journal
records after it. Replay is deterministic, so commits get their original ids.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import pygit2

from . import changes as ch
from . import crypto, mempack
from .changes import Change
from .errors import FsError, RepoError
from .gitstore import GitStore
from .history import CommitIndex
from .journal import Journal, fsync_dir
from .metrics import metrics
from .patch import apply_patch
from .validate import check_json, check_size

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str) -> None:
    """Flush every dirty page of the filesystem holding ``path`` (one syscall)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def _errno_of(exc: BaseException, path: str | None = None) -> int:
    """The errno behind an OSError or a libgit2 error (whose message may be just "no error")."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    text = str(exc).lower()
    if "no space" in text:
        return errno.ENOSPC
    if "read-only" in text:
        return errno.EROFS
    if path is not None:
        try:
            st = os.statvfs(path)
            if st.f_bavail * st.f_frsize < (1 << 20) or st.f_favail == 0:
                return errno.ENOSPC
        except OSError:
            pass
    return errno.EIO


@dataclass
class Group:
    """What one committed group hands back to the publisher."""

    results: list
    head: pygit2.Oid | None
    views: dict          # agent -> AgentView or None (deleted), as of ``head``
    made: list = field(default_factory=list)   # (commit oid, concrete Change, {file: version}) in order
    root: pygit2.Oid | None = None              # the head's tree id (readers need not look it up)


class ThreadRepo:
    """``repo[oid]`` through the calling thread's own handle of ``git`` (see
    ``GitStore.repo``), for objects used from several threads (the commit index)."""

    def __init__(self, git: GitStore):
        self._git = git

    def __getitem__(self, key):
        return self._git.repo[key]

    def get(self, key, default=None):
        return self._git.repo.get(key, default)


class Store:
    """Open (and recover) a repository; commit groups of Changes durably."""

    def __init__(self, repo_dir: str, *, create: bool = True, readonly: bool = False,
                 key: bytes | None = None):
        self.repo_dir = os.path.abspath(repo_dir)
        self.readonly = readonly
        self.git = GitStore(self.repo_dir, create=create and not readonly)
        self.meta_dir = os.path.join(self.repo_dir, "agentstatefs")
        # Encryption at rest (fs/crypto.py): refused here, before anything is read or
        # replayed, when the key does not fit the store.
        try:
            self.codec = crypto.codec_for(self.repo_dir, self.git.repo, key, fresh=self._fresh(),
                                          create=not readonly)
        except crypto.CryptoError as exc:
            raise RepoError(str(exc)) from None
        self.git.codec = self.codec
        self._cp_path = os.path.join(self.meta_dir, "checkpoint")
        self._commit_lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self.commits = 0
        self.groups = 0
        self.last_checkpoint = time.monotonic()
        self.last_checkpoint_wall = 0.0   # Unix time of the last checkpoint (0: none yet)
        self.journal: Journal | None = None
        self.flushed_head = None     # what refs/heads/main on disk names
        self._serial = 0             # counts head moves; the ref only ever moves forward
        self._flushed_serial = 0
        self.hold_git = False        # gc running: objects stay in memory, the ref stays put
        self._cp = self._read_checkpoint()
        if not readonly:
            if not os.access(self.repo_dir, os.W_OK) or not os.access(os.path.join(self.repo_dir, "objects"), os.W_OK):
                raise RepoError(f"repository {self.repo_dir} is not writable (mount with -o ro to serve it read-only)")
            os.makedirs(self.meta_dir, exist_ok=True)
            self.journal = Journal(os.path.join(self.meta_dir, "journal"), codec=self.codec)
            self._recover()
        self.history = CommitIndex(ThreadRepo(self.git), os.path.join(self.meta_dir, "history-index"),
                                   writable=not readonly)
        self.history.load(self.git.head)
        self._reader: GitStore | None = None

    @property
    def reader(self) -> GitStore:
        """The readers' view (trio thread): a second repository handle whose head moves
        only when a durable group is published (``GitStore.publish``). The writer's
        GitStore (``self.git``) belongs to the committer thread alone."""
        if self._reader is None:
            self._reader = GitStore(self.repo_dir, create=False, codec=self.codec)
            # Objects of a durable group whose pack could not be written yet.
            self._reader.attach_memory(self.git.pending_objects)
            self._reader._head = self.git.head
            self._reader._root = self.git.repo[self.git.head].tree if self.git.head is not None else None
        return self._reader

    def _fresh(self) -> bool:
        """Nothing stored yet: no commit and no journal record (a key may start encrypting)."""
        if self.git.head is not None:
            return False
        jdir = os.path.join(self.meta_dir, "journal")
        try:
            return not any(n.endswith(".log") and os.path.getsize(os.path.join(jdir, n)) > 0
                           for n in os.listdir(jdir))
        except FileNotFoundError:
            return True

    # -- checkpoint file ---------------------------------------------------------
    def _read_checkpoint(self) -> dict | None:
        try:
            with open(self._cp_path) as f:
                cp = json.load(f)
            return {"commit": cp.get("commit"), "seq": int(cp.get("seq", 0))}
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as exc:
            raise RepoError(f"{self._cp_path} is unreadable ({exc}); run 'agentstatefs fsck'") from None

    def _write_checkpoint(self, commit: pygit2.Oid | None, seq: int) -> None:
        tmp = self._cp_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"commit": str(commit) if commit else None, "seq": seq, "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self._cp_path)
        fsync_dir(self.meta_dir)
        self._cp = {"commit": str(commit) if commit else None, "seq": seq}

    # -- recovery ---------------------------------------------------------------
    def _remove_stale_git_locks(self) -> None:
        """A kill -9 during a ref update leaves ``*.lock`` files that block every later commit.

        We hold the repository lock, so no other writer can own them."""
        candidates = [os.path.join(self.repo_dir, n) for n in ("HEAD.lock", "packed-refs.lock", "config.lock")]
        for root, _, files in os.walk(os.path.join(self.repo_dir, "refs")):
            candidates += [os.path.join(root, f) for f in files if f.endswith(".lock")]
        for path in candidates:
            if os.path.exists(path):
                log.warning("recovery: removing stale git lock %s", path)
                os.unlink(path)

    def _recover(self) -> None:
        self._remove_stale_git_locks()
        cp = self._cp
        base_seq = cp["seq"] if cp else 0
        try:
            records = list(self.journal.read_after(base_seq))
        except crypto.CryptoError as exc:
            raise RepoError(f"journal: {exc}; refusing to start (run 'agentstatefs fsck')") from None
        self.journal.next_seq = max(self.journal.next_seq, base_seq + 1)
        if cp is not None:
            base = pygit2.Oid(hex=cp["commit"]) if cp["commit"] else None
            if base is not None:
                try:
                    self.git.repo[base].tree
                except (KeyError, ValueError, pygit2.GitError) as exc:
                    raise RepoError(f"checkpointed commit {base} is missing or corrupt ({exc}); "
                                    f"run 'agentstatefs fsck'") from None
            if base != self.git.head or records:
                if base != self.git.head:
                    log.info("recovery: resetting main from %s to checkpoint %s", self.git.head, base)
                self.git.reset_head(base)
        if records:
            log.info("recovery: replaying %d journal record(s) after seq %d", len(records), base_seq)
            for seq, payload in records:
                try:
                    self.git.apply(Change.decode(payload))
                except FsError as exc:
                    log.error("recovery: journal record %d does not apply (%s); skipped", seq, exc)
        self.checkpoint(force=True)

    # -- commit -----------------------------------------------------------------
    def resolve(self, intent: Change) -> Change | str | None:
        """Turn an intent into the concrete Change to commit, against the writer's head.

        Returns the Change, None when it would change nothing, or ``ORPHAN`` when a
        write was meant for a file that no longer has a name (it was unlinked or
        replaced after the caller opened it: its data goes nowhere, as on ext4).
        Raises FsError when it does not apply (ENOENT, ESTALE for compare-and-swap).
        Runs in the committer thread only: the writer's head is its alone.
        """
        c = intent
        if c.op in (ch.MKDIR, ch.RMDIR, ch.CHMOD, ch.CHOWN, ch.DELETE, ch.TOUCH, ch.MOVE):
            return c
        view = self.git.agent(c.agent)
        if view is None:
            raise FsError(errno.ENOENT, f"agent {c.agent} does not exist")
        for name, want in c.expect_version.items():
            have = view.version(name)
            if have != want:
                raise FsError(errno.ESTALE, f"{c.agent}/{name} is at version {have}, not {want}")
        if c.op == ch.PATCH:
            c = self._resolve_patch(c, view)
            if c is None:
                return None
        if c.op in (ch.RENAME, ch.EXCHANGE):
            src, dst = c.move
            if src not in view.files:
                raise FsError(errno.ENOENT, f"{c.agent}/{src} does not exist")
            if src == dst:
                return None

            def carried(name: str) -> dict:
                fm = view.file_meta(name) or {}
                out = {k: fm[k] for k in ("mode", "uid", "gid", "mtime_ns", "atime_ns") if k in fm}
                out["acl"] = fm.get("acl")     # the moved file's ACL (or none), not the target's
                out["fid"] = view.fid(c.agent, name)
                return out
            if c.op == ch.RENAME:
                files = {src: None, dst: self.git.read_blob(view.files[src], c.agent, src)}
                attrs = {dst: carried(src)}
            else:
                if dst not in view.files:
                    raise FsError(errno.ENOENT, f"{c.agent}/{dst} does not exist")
                files = {src: self.git.read_blob(view.files[dst], c.agent, dst),
                         dst: self.git.read_blob(view.files[src], c.agent, src)}
                attrs = {src: carried(dst), dst: carried(src)}
            return Change(c.op, c.agent, c.who, c.time_ns, files=files, attrs=attrs, move=c.move)
        if c.op not in (ch.WRITE, ch.RESTORE) or len(c.files) != 1:
            return c
        (name, data), = c.files.items()
        if data is None:
            return c
        want = c.fids.get(name)
        attrs = dict(c.attrs.get(name, {}))
        if want is not None and not c.replace:
            # A handle writes to the file it opened, wherever that file is now named.
            holder = next((n for n in view.files if view.fid(c.agent, n) == want), None)
            if holder is None:
                if not c.create or name in view.files:
                    return ch.ORPHAN     # unlinked, or the name now holds another file
                attrs["fid"] = want
            else:
                name = holder
                attrs.pop("mode", None), attrs.pop("uid", None), attrs.pop("gid", None), attrs.pop("acl", None)
        elif want is not None:
            attrs["fid"] = want
        op, note = c.op, c.note
        blob = str(self.git.blob_id(c.agent, name, data))
        if name in view.files and str(view.files[name]) == blob:
            fm = view.file_meta(name) or {}
            if all(fm.get(k) == v for k, v in attrs.items() if k not in ("fid", "atime_ns")):
                return None      # same bytes and metadata (a user-set mtime included): no new version
        if op == ch.WRITE and blob in c.sources:
            # A copy out of @history (the namespace saw this process read that version):
            # a restore. Content that merely equals an old version is a plain write.
            op, note = ch.RESTORE, c.sources[blob][:7]
        return Change(op, c.agent, c.who, c.time_ns, files={name: data},
                      attrs={name: attrs} if attrs else {}, note=note)

    def _resolve_patch(self, c: Change, view) -> Change | None:
        """A patch intent applied to the file's content at the writer's head (so at its
        turn in the queue): the WRITE of the result, or None when it changes nothing."""
        (name, patch), = c.files.items()
        current = self.git.read_blob(view.files[name], c.agent, name) if name in view.files else None
        try:
            data, kind = apply_patch(current, patch)
        except FsError as exc:
            raise FsError(exc.errno, f"{c.agent}/{name}: {exc.reason}") from None
        if data is None or data == current:
            return None
        if c.limit:
            check_size(len(data), c.limit)
        check_json(data)
        return Change(ch.WRITE, c.agent, c.who, c.time_ns, files={name: data}, note=kind)

    def commit_batch(self, changes: list[Change]) -> list:
        """Resolve, apply and durably journal ``changes`` in order (see ``commit_group``)."""
        return self.commit_group(changes).results

    def reopen_writer(self) -> None:
        """After a repack: the committer's repository handle again (see GitStore.reopen)."""
        with self._commit_lock:
            self.git.reopen()

    def flush_git(self) -> None:
        """Write the objects of acknowledged groups as one pack and point ``main`` at
        the head. The state manager's flusher calls this right after each group is
        published, so the repository as git sees it trails the acknowledgement by about a
        millisecond. The pack is written without the commit lock: the next group is
        built meanwhile."""
        with self._commit_lock:
            if self.hold_git:
                return
            objects = dict(self.git.pending_objects)
            head, serial = self.git.head, self._serial
        try:
            if objects:
                mempack.write_pack(self.repo_dir, objects, durable=False)
        except OSError as exc:
            # Durable in the journal and readable from memory; the next try writes them.
            log.error("could not write git objects (%s); they stay in memory until the next try", exc)
            return
        with self._commit_lock:
            for oid in objects:
                self.git.pending_objects.pop(oid, None)
            try:
                if head is not None and serial > self._flushed_serial:
                    self.git.write_ref(head)   # recovery never trusts it anyway
                    self.flushed_head, self._flushed_serial = head, serial
            except OSError as exc:
                log.error("could not update branch main on disk (%s); the next try will", exc)

    def commit_group(self, changes: list[Change], flush: bool = True) -> "Group":
        """Resolve, apply and durably journal ``changes`` in order, as one group.

        Returns a Group: one result per change (the new commit Oid, None when nothing
        changed, ``ORPHAN``, or an FsError), the new head and the agents it changed.
        Every Oid returned is durable when this returns; on a journal failure nothing
        of the group is (the in-memory head goes back, the ref on disk never moved).
        With ``flush`` (offline use) its objects and the ref are written before returning;
        the daemon passes False and lets its flusher do that behind the acknowledgement.
        """
        if self.readonly or self.journal is None:
            return Group([FsError(errno.EROFS, "mounted read-only") for _ in changes], self.git.head, {})
        group = self._commit_group(changes)
        if flush and group.views:
            self.flush_git()
        return group

    def _commit_group(self, changes: list[Change]) -> "Group":
        with self._commit_lock:
            head0 = self.git.head
            self.git.group_objects = []
            results: list = []
            payloads: list[bytes] = []
            made: list[tuple] = []   # (commit oid, change, {file: blob hex}) for the history index
            views: dict = {}
            for intent in changes:
                try:
                    change = self.resolve(intent)
                    if change is None or change == ch.ORPHAN:
                        results.append(change)
                        continue
                    oid = self.git.apply(change, update_ref=False)
                except FsError as exc:
                    results.append(exc)
                    continue
                except (pygit2.GitError, OSError) as exc:
                    e = _errno_of(exc, self.repo_dir)
                    results.append(FsError(e, f"git write failed: {os.strerror(e)} (libgit2: {exc})"))
                    continue
                results.append(oid)
                if oid is not None:
                    payloads.append(change.encode())
                    view = self.git.agent(change.agent)
                    views[change.agent] = view
                    if change.op == ch.MOVE:
                        views[change.move[1]] = self.git.agent(change.move[1])
                    files = {n: (str(view.files[n]) if view is not None and n in view.files else "-")
                             for n in change.files}
                    versions = {n: (view.version(n) if view is not None and n in view.files else None)
                                for n in set(change.files) | {k for k in change.attrs if k}}
                    made.append((oid, change, files, versions))
            if not payloads:
                return Group(results, self.git.head, {})
            try:
                self.journal.append(payloads)
                self.journal.sync()
            except OSError as exc:
                # Nothing of this group is durable, and the journal guarantees it never
                # will be: forget it entirely. The ref on disk was not moved.
                log.error("journal write failed (%s); group of %d change(s) refused", exc, len(payloads))
                metrics.commit_failures.inc()
                self.git.rewind(head0, views)
                for oid in self.git.group_objects:
                    self.git.pending_objects.pop(oid, None)
                e = _errno_of(exc, self.repo_dir)
                err = FsError(e, f"journal write failed: {os.strerror(e)} ({exc})")
                results = [err if not isinstance(r, FsError) and r is not None and r != ch.ORPHAN else r
                           for r in results]
                return Group(results, head0, {})
            self.commits += len(payloads)
            self._serial += 1
            self.groups += 1
            for oid, change, files, _ in made:
                if change.op == ch.MOVE:   # the history continues under the new id
                    self.history.append(self.git.repo[oid], change.move[1], change.op,
                                        {"@from": change.move[0]})
                    continue
                self.history.append(self.git.repo[oid], change.agent, change.op, files)
            # The index file is written out at checkpoints, not per group: an append
            # between two journal fdatasyncs makes ext4 write it with each of them. After
            # a crash it is repaired from git on open.
            return Group(results, self.git.head, views, [(o, c, v) for o, c, _, v in made], self.git.root_id)

    # -- checkpoint ---------------------------------------------------------------
    def checkpoint(self, force: bool = False) -> bool:
        """Make git durable up to the current head and drop the journal it covers."""
        if self.readonly or self.journal is None or self.hold_git:
            return False
        with self._checkpoint_lock:
            with self._commit_lock:
                if self.hold_git:
                    return False
                head = self.git.head
                seq = self.journal.next_seq - 1
                cp_commit = self._cp["commit"] if self._cp else None
                if not force and self._cp is not None and cp_commit == (str(head) if head else None) \
                        and self._cp["seq"] == seq:
                    return False
                self.git.flush_objects()
                self.journal.open_new_segment()
                self.journal.bytes_since_checkpoint = 0
                if head is not None:
                    self.git.write_ref(head)
                    self.flushed_head, self._flushed_serial = head, self._serial
            if getattr(self, "history", None) is not None:   # (not yet during recovery)
                self.history.flush()
            syncfs(self.repo_dir)
            self._write_checkpoint(head, seq)
            self.journal.drop_through(seq)
            self.last_checkpoint = time.monotonic()
            self.last_checkpoint_wall = time.time()
            metrics.checkpoints.inc()
            metrics.last_checkpoint.set(self.last_checkpoint_wall)
            try:
                self.journal.prepare_spare()   # the next segment, pre-zeroed (journal.py)
            except OSError as exc:
                log.warning("could not prepare the next journal segment ahead (%s); it will grow as it is written", exc)
            return True

    # -- retention and gc (run by the state manager's committer, or offline) -----------
    def prune_snapshot(self) -> tuple[str | None, list]:
        """The history up to what git's ``main`` on disk names (every object of it is in
        a pack, so a prune job can read it with its own repository handle)."""
        head = self.flushed_head
        if head is None:
            return None, []
        return str(head), self.history.snapshot(str(head))

    def finish_prune(self, job) -> dict:
        """Finish ``job`` (prune.PruneJob, built from ``prune_snapshot``) and switch to
        the new chain. Holds the commit lock: no group is in progress or lost.

        Steps, and what a crash after each leaves (recovery resets ``main`` to the
        checkpointed commit and replays the journal after it):
        1. commits made since the snapshot are rewritten too; every pending object and
           the new chain's objects are written, fsynced, and ``syncfs`` -> old chain;
        2. ``agentstatefs/checkpoint`` names the new head with the journal's last
           sequence number (rename: the atomic switch) -> new chain, nothing to replay;
        3. ``main``, the in-memory heads, the history index, ``pruned.json``, journal
           segments -> each is repaired from the checkpoint on open."""
        from .prune import pause, write_record
        if self.readonly or self.journal is None:
            raise FsError(errno.EROFS, "mounted read-only")
        with self._checkpoint_lock:
            with self._commit_lock:
                if job.noop:
                    return job.summary()
                pos = self.history.position(job.old_head) if job.old_head else None
                if pos is None:
                    raise FsError(errno.EAGAIN, "history changed under the prune; try again")
                tail = self.history.entries[pos + 1:]
                self.git.flush_objects()
                job.extend(tail)
                job.write_objects()
                pause("pack")
                seq = self.journal.next_seq - 1
                self.journal.open_new_segment()
                self.journal.bytes_since_checkpoint = 0
                syncfs(self.repo_dir)
                pause("synced")
                new = pygit2.Oid(hex=job.new_head)
                self._write_checkpoint(new, seq)          # the switch
                job.progress.phase = "switched"
                pause("checkpoint")
                self.git.write_ref(new)
                self.git.move_head(new)
                self._serial += 1
                self.flushed_head, self._flushed_serial = new, self._serial
                self.history.replace(job.entries)
                pause("index")
            self.journal.drop_through(seq)
            self.last_checkpoint = time.monotonic()
            summary = job.summary()
            try:
                write_record(self.repo_dir, summary)
            except OSError as exc:
                log.warning("prune: could not write pruned.json (%s)", exc)
            job.progress.phase = "done"
            log.info("prune: kept %d commit(s), dropped %d; main is now %s (was %s)",
                     summary["kept"], summary["dropped"], job.new_head, job.old_head)
            return summary

    def hold_for_gc(self) -> None:
        """Before ``git repack -a -d`` + ``git prune --expire=now`` while mounted: every
        object is written and ``main`` names the head; from now on new objects stay in
        memory (readable) and the ref stays put until ``release_after_gc``, so nothing
        the repack does not see as reachable can be lost."""
        with self._checkpoint_lock:
            with self._commit_lock:
                self.git.flush_objects()
                if self.git.head is not None:
                    self.git.write_ref(self.git.head)
                    self.flushed_head, self._flushed_serial = self.git.head, self._serial
                self.hold_git = True

    def release_after_gc(self) -> None:
        """(The caller reopens the readers' handle on its own thread.)"""
        with self._commit_lock:
            self.hold_git = False
        self.reopen_writer()

    def close(self) -> None:
        self.hold_git = False
        self.history.close()
        if self.journal is not None:
            try:
                self.checkpoint()
            finally:
                self.journal.close()
                self.git.close()
