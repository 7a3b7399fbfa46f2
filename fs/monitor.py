"""Watching a running mount: what ``M/@stats`` and ``M/@metrics`` show beyond the
counters, and the warnings an operator should see in the log.

- ``collect`` (a metrics source, see fs/metrics.py) reads values the namespace already
  keeps (scratch and runtime bytes, write buffers, open handles, cache hit counts,
  commits, agents) at collection time. It may run on the HTTP server's thread, so it
  only reads ints and ``len()``s (atomic under the GIL), never iterates shared dicts.
- ``run`` (a trio task): every ``TICK`` seconds checks the scratch cap (> 90 % used)
  and replication lag and logs rate-limited warnings; every ``scan_interval`` seconds
  measures the repository on disk in a worker thread (``repostats``), so no read ever
  walks the repository; at start it builds the agent set in a worker thread, which
  publishing keeps up to date from then on.
- ``report(name)``: the content of ``@stats`` (JSON) or ``@metrics`` (Prometheus text),
  generated when the file is opened: each open reads one consistent snapshot.
"""

from __future__ import annotations

import logging
import os
import re
import time

import trio

from . import repostats
from .metrics import PREFIX, RateLimited, metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("agentstatefs")

TICK = 5.0
SCRATCH_WARN = 0.9


def redact_url(url: str) -> str:
    """``https://user:token@host/x`` -> ``https://***@host/x``: @stats is readable by
    every user of the mount."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1***@", url)


class Monitor:
    def __init__(self, ns, *, scan_interval: float = 60.0, replication_lag_warn: float = 300.0):
        self.ns = ns
        self.scan_interval = scan_interval
        self.replication_lag_warn = replication_lag_warn
        self.started = time.time()
        self.scan: dict | None = None
        self._scratch_log = RateLimited(300.0)
        self._replication_log = RateLimited(300.0)
        self._last: dict[str, tuple[float, int]] = {}   # report name -> (time, size) of the newest render
        metrics.sources["namespace"] = self.collect

    # -- values read at collection time ------------------------------------------------
    def collect(self):
        ns = self.ns
        store = ns.store
        yield GaugeMetricFamily(PREFIX + "scratch_bytes", "Scratch bytes in use (RAM)", value=ns.scratch.used)
        yield GaugeMetricFamily(PREFIX + "scratch_max_bytes", "Scratch cap (scratch_max)", value=ns.scratch.limit)
        yield GaugeMetricFamily(PREFIX + "runtime_bytes", "runtime.json bytes kept in RAM (every kept version)",
                                value=ns.runtime.bytes)
        yield GaugeMetricFamily(PREFIX + "write_buffer_bytes", "Bytes in open state-file write buffers",
                                value=ns.buffer_bytes)
        yield GaugeMetricFamily(PREFIX + "open_handles", "Open file handles", value=len(ns.handles))
        yield GaugeMetricFamily(PREFIX + "inodes", "Inode numbers the daemon keeps (held by the kernel or a handle)",
                                value=len(ns.inodes))
        yield GaugeMetricFamily(PREFIX + "requests_in_flight", "FUSE requests being handled", value=ns.sm.in_flight)
        yield GaugeMetricFamily(PREFIX + "event_subscribers", "Open M/@events streams", value=len(ns.events.subs))
        j = store.journal
        yield GaugeMetricFamily(PREFIX + "journal_bytes", "Journal bytes written since the last checkpoint",
                                value=j.bytes_since_checkpoint if j is not None else 0)
        yield GaugeMetricFamily(PREFIX + "repo_commits", "Commits on main (as served)", value=len(store.history))
        agents = self.agents()
        if agents is not None:
            yield GaugeMetricFamily(PREFIX + "agents", "Agents at the head", value=agents)
        hits = CounterMetricFamily(PREFIX + "cache_hits", "Daemon cache hits, by cache", labels=["cache"])
        misses = CounterMetricFamily(PREFIX + "cache_misses", "Daemon cache misses, by cache", labels=["cache"])
        reader, writer = store._reader, store.git
        for cache, src in (("agent", reader), ("blob", reader), ("tree", writer)):
            if src is not None:
                hits.add_metric([cache], getattr(src, f"{cache}_hits", 0))
                misses.add_metric([cache], getattr(src, f"{cache}_misses", 0))
        yield hits
        yield misses
        mt = getattr(ns.sm, "maintenance", None)
        if mt is not None:
            running = GaugeMetricFamily(PREFIX + "maintenance_running", "1 while a prune or gc runs, by kind",
                                        labels=["kind"])
            runs = CounterMetricFamily(PREFIX + "maintenance_runs", "Prunes and gcs finished, by kind",
                                       labels=["kind"])
            failures = CounterMetricFamily(PREFIX + "maintenance_failures", "Prunes and gcs that failed, by kind",
                                           labels=["kind"])
            for kind in ("prune", "gc"):
                running.add_metric([kind], 1 if mt.busy and mt.kind == kind else 0)
                runs.add_metric([kind], mt.runs.get(kind, 0))
                failures.add_metric([kind], mt.failures.get(kind, 0))
            yield running
            yield runs
            yield failures
            done, total = mt.done, mt.total
            yield GaugeMetricFamily(PREFIX + "maintenance_progress_ratio",
                                    "Progress of the running (or last) prune/gc phase, 0 to 1",
                                    value=min(1.0, done / total) if total else (1.0 if mt.state == "done" else 0.0))
            yield GaugeMetricFamily(PREFIX + "maintenance_last_finished_timestamp_seconds",
                                    "Unix time the last prune/gc finished (0: none since mount)", value=mt.finished)

    def agents(self) -> int | None:
        git = self.ns.git
        if git.agents_loaded():
            return len(git._agents)
        return self.scan.get("agents") if self.scan else None

    # -- background ----------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await trio.to_thread.run_sync(self.ns.git.agents)   # the set publishing keeps current
        except Exception:
            log.exception("counting agents failed")
        next_scan = 0.0
        while True:
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + self.scan_interval
                await self.rescan()
            try:
                self.check()
            except Exception:
                log.exception("monitor check failed")
            await trio.sleep(TICK)

    async def rescan(self) -> None:
        try:
            self.scan = await trio.to_thread.run_sync(
                lambda: repostats.scan(self.ns.store.repo_dir, with_agents=not self.ns.git.agents_loaded(),
                               with_commits=False))
            metrics.repo_size.set(self.scan["size_bytes"])
            metrics.repo_scanned.set(self.scan["scanned"])
        except Exception:
            log.exception("measuring the repository failed")

    def warnings(self) -> list[str]:
        """Conditions an operator should look at, as short sentences (also in ``status``)."""
        out = []
        sc = self.ns.scratch
        if sc.limit and sc.used > SCRATCH_WARN * sc.limit:
            out.append(f"scratch space {sc.used * 100 // sc.limit}% full ({sc.used} of {sc.limit} bytes)")
        lag = self._sample("replication_lag_seconds")
        if self._sample("replication_enabled") and lag is not None and lag > self.replication_lag_warn:
            out.append(f"replication {lag:.0f} s behind (replication_lag_warn={self.replication_lag_warn:g})")
        r = self.replication()
        if r is not None and r["mode"] == "replica" and (r.get("behind_seconds") or 0) > self.replication_lag_warn:
            out.append(f"replica last fetched {r['behind_seconds']:.0f} s ago (replication_lag_warn="
                       f"{self.replication_lag_warn:g})")
        j = self.ns.store.journal
        if j is not None and j.failed is not None:
            out.append(f"journal unusable: {j.failed} (restart the daemon)")
        return out

    def check(self) -> None:
        for w in self.warnings():
            if w.startswith("scratch"):
                self._scratch_log.warn("%s; writes of scratch files get ENOSPC at the cap", w)
            elif w.startswith("replica"):
                self._replication_log.warn("%s", w)

    @staticmethod
    def _sample(name: str):
        return metrics.registry.get_sample_value(PREFIX + name)

    # -- @stats / @metrics -------------------------------------------------------------
    def info(self) -> dict:
        ns, store = self.ns, self.ns.store
        cp = store.last_checkpoint_wall
        return {
            "tenant": os.path.basename(store.repo_dir.rstrip("/")),
            "repo": store.repo_dir,
            "pid": os.getpid(),
            "started": self.started,
            "readonly": bool(store.readonly),
            "head": str(ns.git.head or "") or None,
            "git_head": str(store.flushed_head or "") or None,
            "commits": len(store.history),
            "agents": self.agents(),
            "repo_size_bytes": self.scan["size_bytes"] if self.scan else None,
            "repo_scanned": self.scan["scanned"] if self.scan else None,
            "last_checkpoint": cp or None,
            "replication": self.replication(),
            "maintenance": ns.sm.maintenance.status() if getattr(ns.sm, "maintenance", None) else None,
            "warnings": self.warnings(),
        }

    def replication(self) -> dict | None:
        """-o replicate (push) or --replica (follow) state, URL without credentials."""
        r = getattr(self.ns.sm, "replication", None)
        if r is None:
            return None
        d = dict(r.to_json())
        d["mode"] = "replica" if "fetches" in d else "push"
        if isinstance(d.get("url"), str):
            d["url"] = redact_url(d["url"])
        return d

    def report(self, name: str) -> bytes:
        data = metrics.text() if name == "@metrics" else metrics.to_json(self.info())
        self._last[name] = (time.monotonic(), len(data))
        return data

    def report_size(self, name: str) -> int:
        """stat's size: the newest render's, rendering again when older than a second."""
        last = self._last.get(name)
        if last is None or time.monotonic() - last[0] > 1.0:
            return len(self.report(name))
        return last[1]
