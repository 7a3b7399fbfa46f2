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
from .store import Group, Store

log = logging.getLogger(__name__)


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
        self.commit_latency_ns: list[int] = []
        self.packs = 0
        self.on_publish = lambda group: None   # set by the namespace
        self._flush_wanted = trio.Event()
        self.flush_delay = 0.05      # seconds the repository as git may trail the journal

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

    async def run_committer(self) -> None:
        while True:
            if not self._pending:
                self._idle.set()
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            batch, self._pending = self._pending, []
            t0 = time.monotonic_ns()
            try:
                group = await trio.to_thread.run_sync(
                    self.store.commit_group, [s.change for s in batch], False)
            except Exception:
                log.exception("commit of a group of %d change(s) failed", len(batch))
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
            if packs <= max_packs and (every_commits is None or self.store.commits - packed_at < every_commits):
                continue
            packed_at = self.store.commits
            t0 = time.monotonic()
            try:
                result = await trio.run_process(geometric_repack_command(self.store.repo_dir),
                                                capture_stdout=True, capture_stderr=True, check=False)
            except OSError as exc:
                log.error("background packing could not start: %s", exc)
                continue
            if result.returncode != 0:
                log.error("background packing failed: %s", result.stderr.decode(errors="replace").strip())
            else:
                log.info("combined %d packs in %.2f s", packs, time.monotonic() - t0)
                self.packs += 1
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
