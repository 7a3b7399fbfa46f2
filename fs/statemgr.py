"""State manager: the one owner of the head. Group commit, publishing, checkpoints.

Handlers hand an intent (a Change) to ``commit()`` and wait. One committer task takes
everything pending at that moment and hands it to a worker thread, which resolves and
commits it as one group on the writer's head (one journal fdatasync). Back on the trio
thread, the committer *publishes* the group (``on_publish``: the readers' head, inode
numbers, kernel invalidations) and only then wakes the waiting handlers, so a handler
that returns from ``commit()`` sees its own change, and no reader ever sees a change
that is not durable. No lock is ever taken on the trio thread.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import trio

from .changes import Change
from .errors import FsError
from .metrics import metrics
from .store import Group, Store

log = logging.getLogger(__name__)


# A group committed on the trio thread (see StateManager._inline_ok) whose journal
# fdatasync took longer than this (a stalling disk) sends the groups of the next
# INLINE_PAUSE_S to a worker thread again.
INLINE_SLOW_SYNC_S = 0.005
INLINE_PAUSE_S = 1.0
INLINE_MAX_BYTES = 64 << 10
CONCURRENT_WINDOW_S = 0.1


class _Slot:
    __slots__ = ("change", "done", "result")

    def __init__(self, change: Change):
        self.change = change
        self.done = trio.Event()
        self.result = None


class StateManager:
    def __init__(self, store: Store, checkpoint_interval: float = 1.0,
                 checkpoint_bytes: int = 64 << 20):
        self.store = store
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_bytes = checkpoint_bytes
        self._pending: list[_Slot] = []
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self.in_flight = 0          # FUSE handlers currently running
        self.commit_inline = True         # see _inline_ok (in-process interleaving tests turn it off)
        self._inline_paused_until = 0.0
        self._concurrent_until = 0.0
        # Whether requests wait in the kernel's queue, unread (the FUSE adapter sets it).
        self.requests_waiting = lambda: False
        self.groups_inline = self.groups_threaded = 0
        self.commit_latency_ns: list[int] = []
        self.packs = 0
        self.on_publish = lambda group: None   # set by the namespace
        self._flush_wanted = trio.Event()
        self.flush_delay = 0.05      # seconds the repository as git may trail the journal
        # Maintenance (prune, gc) asked for through the mount: one at a time.
        self.on_rewrite = lambda summary: None   # set by the namespace: history was rewritten
        self.maintenance = Maintenance()
        self._in_committer: list = []            # (function, trio.Event, box): run between groups
        self.replication = None      # stats of -o replicate (ReplicationStats) or --replica (ReplicaStats)
        self.background: list = []   # more tasks for the daemon's nursery (the replica's follower)

    async def commit(self, change: Change):
        """Commit ``change`` durably; returns the commit Oid or None (no change)."""
        slot = _Slot(change)
        self._pending.append(slot)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()
        with trio.CancelScope(shield=True):
            # Once handed over, a change is committed even if the caller goes away.
            await slot.done.wait()
        if isinstance(slot.result, FsError):
            raise slot.result
        return slot.result

    def _inline_ok(self, batch: list) -> bool:
        """Whether the next group may be committed on the trio thread (decision 45).

        A worker thread costs two hand-offs per group (measured: 10-28 % of the daemon's
        CPU per durable write, 20-50 % of one writer's rate), and it only pays when
        other requests can run meanwhile, during the journal's fdatasync. So a group is
        committed inline when every request in flight is one of its own waiters (a lone
        writer: nobody else to serve), unless an inline group's fdatasync lately took
        longer than INLINE_SLOW_SYNC_S (a stalling disk): then groups go to a thread for
        INLINE_PAUSE_S.
        Writers that overlap (a group of several, other requests in flight or waiting in
        the kernel's queue, or intents queued while a group was in the thread) keep
        groups in the thread for
        CONCURRENT_WINDOW_S: an inline group blocks the event loop, so requests queued in
        the kernel meanwhile could not join the next group (every writer would pay its
        own fdatasync).
        Groups carrying more than INLINE_MAX_BYTES (hashing and compressing them takes a
        while) always go to a thread."""
        now = time.monotonic()
        if len(batch) > 1 or self.in_flight > len(batch) or self.requests_waiting():
            self._concurrent_until = now + CONCURRENT_WINDOW_S    # writers overlap: group them
            return False
        if not self.commit_inline or now < self._concurrent_until or now < self._inline_paused_until:
            return False
        size = 0
        for slot in batch:
            for data in slot.change.files.values():
                size += len(data) if data is not None else 0
        return size <= INLINE_MAX_BYTES

    async def run_committer(self) -> None:
        while True:
            if self._in_committer:
                # Between two groups (the previous one is published): the one owner of the
                # head runs a history rewrite, so no group is in progress or lost.
                fn, after, done, box = self._in_committer.pop(0)
                try:
                    box.append(await trio.to_thread.run_sync(fn))
                except BaseException as exc:   # handed back to the waiting task
                    box.append(exc)
                else:
                    try:
                        after(box[0])          # e.g. move the readers' head, before any next group
                    except Exception:
                        log.exception("publishing the result of %s failed", getattr(fn, "__name__", fn))
                done.set()
                continue
            if not self._pending:
                self._idle.set()
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            batch, self._pending = self._pending, []
            t0 = time.monotonic_ns()
            try:
                if self._inline_ok(batch):
                    self.groups_inline += 1
                    group = self.store.commit_group([s.change for s in batch], False)
                    j = self.store.journal
                    if j is not None and j.last_sync_s > INLINE_SLOW_SYNC_S:
                        self._inline_paused_until = time.monotonic() + INLINE_PAUSE_S
                else:
                    self.groups_threaded += 1
                    group = await trio.to_thread.run_sync(
                        self.store.commit_group, [s.change for s in batch], False)
                    if self._pending:     # queued meanwhile: writers overlap (see _inline_ok)
                        self._concurrent_until = time.monotonic() + CONCURRENT_WINDOW_S
            except Exception:
                log.exception("commit of a group of %d change(s) failed", len(batch))
                metrics.commit_failures.inc()
                group = Group([FsError(errno.EIO, "internal error while committing")] * len(batch),
                              None, {})
            results = group.results
            if group.views:
                try:
                    self.on_publish(group)
                except Exception:
                    log.exception("publishing a group of %d change(s) failed", len(batch))
            dt = time.monotonic_ns() - t0
            self.commit_latency_ns.append(dt)
            if len(self.commit_latency_ns) > 4096:
                del self.commit_latency_ns[:2048]
            metrics.note_commit(dt / 1e9, len(batch), len(group.made))
            for slot, result in zip(batch, results):
                slot.result = result
                slot.done.set()
            if group.views:
                self._flush_wanted.set()

    async def run_flusher(self) -> None:
        """Behind the acknowledgements: acknowledged groups' objects as one pack, and the
        ref, while the committer already builds the next group."""
        while True:
            await self._flush_wanted.wait()
            # Coalesce: one pack for every group acknowledged in the next moment. Creating
            # files between two journal fdatasyncs makes each of those slower (ext4
            # commits their metadata with it), so a steady writer pays this once per
            # flush_delay, not once per group.
            await trio.sleep(self.flush_delay)
            self._flush_wanted = trio.Event()
            try:
                await trio.to_thread.run_sync(self.store.flush_git)
            except Exception:
                log.exception("writing git objects failed (they stay in memory)")

    async def run_checkpointer(self) -> None:
        """Checkpoint in the background: bounded journal, bounded replay time."""
        while True:
            await trio.sleep(self.checkpoint_interval / 4)
            j = self.store.journal
            if j is None or j.bytes_since_checkpoint == 0:
                continue
            due = time.monotonic() - self.store.last_checkpoint >= self.checkpoint_interval
            if due or j.bytes_since_checkpoint >= self.checkpoint_bytes:
                try:
                    await trio.to_thread.run_sync(self.store.checkpoint)
                except Exception:
                    log.exception("checkpoint failed (will retry)")

    async def run_packer(self, every_commits: int | None = 2000, poll: float = 30.0, max_packs: int = 16) -> None:
        """Combine the small per-group packs in the background (``git repack -d
        --geometric=2``, a separate process) once there are more than ``max_packs`` of
        them or ``every_commits`` commits were made since the last run.

        Writers never wait for it: new packs keep being written while it runs, and git
        deletes only packs whose objects are in the new one."""
        from .fsck import geometric_repack_command
        packed_at = self.store.commits
        pack_dir = os.path.join(self.store.repo_dir, "objects", "pack")
        first = True
        while True:
            await trio.sleep(0.5 if first else poll)   # a repository left with many packs: at once
            first = False
            if self.store.readonly:
                continue
            try:
                packs = sum(1 for e in os.scandir(pack_dir) if e.name.endswith(".pack"))
            except OSError:
                packs = 0
            if self.maintenance.busy:
                continue      # gc repacks everything itself
            if packs <= max_packs and (every_commits is None or self.store.commits - packed_at < every_commits):
                continue
            packed_at = self.store.commits
            t0 = time.monotonic()
            try:
                # At the lowest CPU priority: at 100,000 agents a run takes ~0.5 s of CPU
                # every few seconds under a write load, and it must not take a CPU from
                # the requests it serves (on 2 vCPUs it did: `ls M` 0.3 -> 0.56 s).
                result = await trio.run_process(["nice", "-n", "19", *geometric_repack_command(self.store.repo_dir)],
                                                capture_stdout=True, capture_stderr=True, check=False)
            except OSError as exc:
                log.error("background packing could not start: %s", exc)
                continue
            if result.returncode != 0:
                log.error("background packing failed: %s", result.stderr.decode(errors="replace").strip())
            else:
                log.info("combined %d packs in %.2f s", packs, time.monotonic() - t0)
                self.packs += 1
                metrics.repacks.inc()
                try:
                    # Let go of the packs git deleted (libgit2 keeps them open otherwise).
                    await trio.to_thread.run_sync(self.store.reopen_writer)
                    if self.store._reader is not None:
                        self.store.reader.reopen()
                except Exception:
                    log.exception("reopening the repository after packing failed")

    async def quiesce(self, timeout: float = 30.0) -> None:
        """Wait until no handler runs and nothing is pending (used before unmount)."""
        with trio.move_on_after(timeout):
            while True:
                await self._idle.wait()
                if self.in_flight == 0 and not self._pending:
                    await trio.sleep(0.05)
                    if self.in_flight == 0 and not self._pending:
                        return
                else:
                    await trio.sleep(0.01)

    # -- maintenance through the mount: prune and gc ---------------------------------------
    async def _run_in_committer(self, fn, after=lambda result: None):
        """Run ``fn`` in a worker thread between two groups, then ``after(result)`` on
        the trio thread before the committer takes the next group."""
        done, box = trio.Event(), []
        self._in_committer.append((fn, after, done, box))
        self._wakeup.set()
        await done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def request(self, kind: str, arg=None, token: str = "") -> None:
        """Start a prune (``arg``: a prune.Policy) or a gc in the background; EBUSY
        while one runs. Progress and outcome: ``self.maintenance.status()``."""
        m = self.maintenance
        if m.busy:
            raise FsError(errno.EBUSY, f"{m.kind} already running")
        m.start(kind, token)
        m._jobs.append((kind, arg))
        m._wakeup.set()

    async def run_maintenance(self) -> None:
        m = self.maintenance
        while True:
            if not m._jobs:
                await m._wakeup.wait()
                m._wakeup = trio.Event()
                continue
            kind, arg = m._jobs.pop(0)
            try:
                if kind == "prune":
                    result = await self._prune(arg)
                else:
                    result = await self._gc()
            except FsError as exc:
                log.error("%s failed: %s", kind, exc)
                m.finish(error=f"{exc.reason} ({errno.errorcode.get(exc.errno, exc.errno)})")
            except Exception as exc:
                log.exception("%s failed", kind)
                m.finish(error=f"internal error: {exc}")
            else:
                m.finish(result=result)

    async def _prune(self, policy) -> dict:
        import pygit2

        from .prune import PruneJob, pause
        m = self.maintenance
        await trio.to_thread.run_sync(self.store.flush_git)
        old_head, entries = self.store.prune_snapshot()
        repo = pygit2.Repository(self.store.repo_dir)
        job = PruneJob(repo, policy, on_progress=m.progress_from)
        m.job = job
        # The bulk of the work (reading every commit, writing new ones in memory) runs
        # beside the committer; only the commits made meanwhile and the switch run in it.
        await trio.to_thread.run_sync(job.build, entries)
        await trio.to_thread.run_sync(pause, "built")
        def published(summary):
            if not summary.get("noop"):
                self.on_rewrite(summary)
        return await self._run_in_committer(lambda: self.store.finish_prune(job), published)

    async def _gc(self) -> dict:
        from .fsck import gc_commands, repo_bytes
        m = self.maintenance
        before = repo_bytes(self.store.repo_dir)
        m.phase = "holding"
        await trio.to_thread.run_sync(self.store.hold_for_gc)
        try:
            for i, cmd in enumerate(gc_commands(self.store.repo_dir)):
                m.phase, m.done, m.total = "repacking" if i == 0 else "pruning", i, 2
                result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
                if result.returncode != 0:
                    raise FsError(errno.EIO, f"{'repack' if i == 0 else 'prune'} failed: "
                                  f"{result.stderr.decode(errors='replace').strip()[:500]}")
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.store.release_after_gc)
                if self.store._reader is not None:
                    self.store.reader.reopen()
                self._flush_wanted.set()
        after = repo_bytes(self.store.repo_dir)
        log.info("gc: repository %d -> %d bytes", before, after)
        return {"bytes_before": before, "bytes_after": after}


class Maintenance:
    """What the running (or last) prune/gc is doing: read by ``@``-xattrs and metrics."""

    def __init__(self):
        self.kind: str | None = None
        self.token = ""
        self.state = "idle"      # idle, running, done, failed
        self.phase = ""
        self.done = self.total = 0
        self.result: dict | None = None
        self.error: str | None = None
        self.started = self.finished = 0.0
        self.runs = {"prune": 0, "gc": 0}
        self.failures = {"prune": 0, "gc": 0}
        self.job = None
        self._jobs: list = []
        self._wakeup = trio.Event()

    @property
    def busy(self) -> bool:
        return self.state == "running"

    def start(self, kind: str, token: str) -> None:
        if kind == "prune":
            metrics.prune_running.set(1)
            metrics.prune_progress.set(0)
        self.kind, self.token, self.state = kind, token, "running"
        self.phase, self.done, self.total = "starting", 0, 0
        self.result = self.error = None
        self.job = None
        self.started, self.finished = time.time(), 0.0

    def progress_from(self, p) -> None:
        self.phase, self.done, self.total = p.phase, p.done, p.total
        if self.kind == "prune" and p.total:
            metrics.prune_progress.set(min(1.0, p.done / p.total))

    def finish(self, result: dict | None = None, error: str | None = None) -> None:
        if self.job is not None:
            self.progress_from(self.job.progress)
        self.result, self.error = result, error
        self.state = "failed" if error else "done"
        self.phase = self.state
        self.finished = time.time()
        self.runs[self.kind] = self.runs.get(self.kind, 0) + 1
        if self.kind == "prune":
            metrics.prune_running.set(0)
            if not error:
                metrics.prune_progress.set(1)
                metrics.prunes.inc()
                metrics.last_prune.set(self.finished)
        if error:
            self.failures[self.kind] = self.failures.get(self.kind, 0) + 1

    def status(self) -> dict:
        return {"kind": self.kind, "token": self.token, "state": self.state, "phase": self.phase,
                "done": self.done, "total": self.total, "result": self.result, "error": self.error,
                "started": self.started, "finished": self.finished}
