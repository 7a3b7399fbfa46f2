"""Metrics: one registry per daemon, rendered as Prometheus text (``M/@metrics``, the
``metrics_listen`` HTTP endpoint) and as JSON (``M/@stats``).

Everything lives on one ``prometheus_client.CollectorRegistry`` (``metrics.registry``),
and the text is always produced by ``prometheus_client.generate_latest``: nothing here
formats the exposition format by hand.

Using it from other modules (the API is the attributes of the module-level ``metrics``):

    from .metrics import metrics
    metrics.commits.inc(n)                        # prometheus_client Counter
    metrics.journal_fsync_seconds.observe(dt)     # prometheus_client Histogram
    metrics.replication_lag_seconds.set(12.5)     # prometheus_client Gauge
    metrics.denials.labels(op="open").inc()

Cost on the request path: FUSE operation latencies (per request) go to ``OpTimer``
objects, a plain list of bucket counts bumped without a lock (only the trio thread
writes them) and turned into a histogram family when someone reads the metrics.
Per-group instruments (commits, fsync) use prometheus_client's own classes (about
2 µs an observation, once per group). Values that already exist elsewhere (cache hit
counts, scratch and runtime bytes, open handles) are read at collection time by
``sources``: nothing is counted twice, and readers never make writers wait.

Slow commits and fsyncs are logged (rate-limited) by ``note_commit``/``note_fsync``.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import threading
import time

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

log = logging.getLogger("agentstatefs")

PREFIX = "agentstatefs_"
disable_created_metrics()   # no *_created samples: they double the page and say little here
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. FUSE requests take tens of microseconds; commits and fsyncs milliseconds.
OP_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05,
              0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
IO_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
              2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class OpTimer:
    """One operation's latency histogram: ``observe(seconds)`` is a bisect and two
    additions on plain Python numbers (no lock; one thread writes)."""

    __slots__ = ("op", "counts", "sum")

    def __init__(self, op: str):
        self.op = op
        self.counts = [0] * (len(OP_BUCKETS) + 1)   # last: above the largest bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(OP_BUCKETS, seconds)] += 1
        self.sum += seconds


class _OpsCollector:
    """Turns the OpTimers into ``agentstatefs_op_duration_seconds{op}`` at collection."""

    def __init__(self, owner: "Metrics"):
        self.owner = owner

    def describe(self):
        return []

    def collect(self):
        h = HistogramMetricFamily(PREFIX + "op_duration_seconds",
                                  "FUSE requests by operation: latency in the daemon (seconds)",
                                  labels=["op"])
        for op, t in sorted(self.owner.op_timers.items()):
            counts, total = list(t.counts), t.sum     # a copy: consistent buckets
            if not any(counts):
                continue
            cum, acc = [], 0
            for bound, n in zip(OP_BUCKETS, counts):
                acc += n
                cum.append((_fmt_bound(bound), acc))
            acc += counts[-1]
            cum.append(("+Inf", acc))
            h.add_metric([op], cum, total)
        yield h


class _SourcesCollector:
    """Values read from the running daemon at collection time (see ``Metrics.sources``)."""

    def __init__(self, owner: "Metrics"):
        self.owner = owner

    def describe(self):
        return []

    def collect(self):
        for fn in list(self.owner.sources.values()):
            try:
                yield from fn()
            except Exception:   # a broken source must not break the whole page
                log.debug("metrics source %r failed", fn, exc_info=True)


def _fmt_bound(b: float) -> str:
    return repr(float(b))


class RateLimited:
    """At most one log line per ``interval`` seconds; the next says how many were held back."""

    def __init__(self, interval: float = 60.0):
        self.interval = interval
        self._last = -math.inf
        self._held = 0
        self._lock = threading.Lock()

    def warn(self, fmt: str, *args) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                self._held += 1
                return False
            held, self._held, self._last = self._held, 0, now
        if held:
            fmt += " (%d similar warning(s) in the last %.0f s not logged)"
            args = args + (held, self.interval)
        log.warning(fmt, *args)
        return True


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.started = time.time()
        self.op_timers: dict[str, OpTimer] = {}
        self.sources: dict = {}     # name -> callable yielding metric families at collection
        r.register(_OpsCollector(self))
        r.register(_SourcesCollector(self))
        # -- requests
        self.op_errors = Counter(PREFIX + "op_errors", "FUSE requests answered with an error, by op and errno",
                                 ["op", "errno"], registry=r)
        # -- commits
        self.commits = Counter(PREFIX + "commits", "Commits made (one per durable change)", registry=r)
        self.commit_group_size = Histogram(PREFIX + "commit_group_size",
                                           "Changes per commit group (one journal fdatasync each)",
                                           buckets=SIZE_BUCKETS, registry=r)
        self.commit_seconds = Histogram(PREFIX + "commit_duration_seconds",
                                        "Commit group latency: taken from the queue to published (seconds)",
                                        buckets=IO_BUCKETS, registry=r)
        self.commit_failures = Counter(PREFIX + "commit_group_failures",
                                       "Commit groups refused as a whole (journal write or sync failed)",
                                       registry=r)
        self.journal_fsync_seconds = Histogram(PREFIX + "journal_fsync_seconds",
                                               "Journal fdatasync latency (seconds)", buckets=IO_BUCKETS,
                                               registry=r)
        self.slow_commits = Counter(PREFIX + "slow_commits", "Commit groups slower than slow_commit_ms",
                                    registry=r)
        self.slow_fsyncs = Counter(PREFIX + "slow_fsyncs", "Journal fdatasyncs slower than slow_fsync_ms",
                                   registry=r)
        self.checkpoints = Counter(PREFIX + "checkpoints", "Checkpoints written", registry=r)
        self.last_checkpoint = Gauge(PREFIX + "last_checkpoint_timestamp_seconds",
                                     "Unix time of the last checkpoint (0: none since mount)", registry=r)
        self.repacks = Counter(PREFIX + "repacks", "Background pack combinations (git repack)", registry=r)
        # -- refusals and denials
        self.refused_writes = Counter(PREFIX + "refused_writes",
                                      "State-file writes refused (kept in @rejected), by errno",
                                      ["errno"], registry=r)
        self.denials = Counter(PREFIX + "denials", "Permission denials (EACCES/EPERM by the access checks), by op",
                               ["op"], registry=r)
        # -- repository (computed in the background, see RepoSizer)
        self.repo_size = Gauge(PREFIX + "repo_size_bytes", "Bytes of the repository directory on disk",
                               registry=r)
        self.repo_scanned = Gauge(PREFIX + "repo_scan_timestamp_seconds",
                                  "Unix time the repository size was last measured",
                                  registry=r)
        self.start_time = Gauge(PREFIX + "start_time_seconds", "Unix time the daemon started", registry=r)
        self.start_time.set(self.started)
        # -- replication (set by the replication module)
        self.replication_enabled = Gauge(PREFIX + "replication_enabled", "1 when -o replicate is set", registry=r)
        self.replication_lag_seconds = Gauge(PREFIX + "replication_lag_seconds",
                                             "Age of the oldest commit not yet on the remote (0: in sync)",
                                             registry=r)
        self.replication_lag_commits = Gauge(PREFIX + "replication_lag_commits",
                                             "Commits on main not yet on the remote", registry=r)
        self.replication_errors = Counter(PREFIX + "replication_errors", "Failed pushes", registry=r)
        self.replication_pushes = Counter(PREFIX + "replication_pushes", "Successful pushes", registry=r)
        self.replication_last_push = Gauge(PREFIX + "replication_last_push_timestamp_seconds",
                                           "Unix time of the last successful push", registry=r)
        # -- retention (set by the state manager's maintenance; gc and the rest in fs/monitor.py)
        self.prune_running = Gauge(PREFIX + "prune_running", "1 while a prune runs", registry=r)
        self.prune_progress = Gauge(PREFIX + "prune_progress_ratio", "Progress of the running prune, 0 to 1",
                                    registry=r)
        self.prunes = Counter(PREFIX + "prunes", "Prunes completed", registry=r)
        self.last_prune = Gauge(PREFIX + "last_prune_timestamp_seconds", "Unix time of the last completed prune",
                                registry=r)
        # -- warnings
        self.slow_commit_s = 1.0
        self.slow_fsync_s = 0.5
        self._slow_commit_log = RateLimited()
        self._slow_fsync_log = RateLimited()

    # -- request path ---------------------------------------------------------------
    def op_timer(self, op: str) -> OpTimer:
        """The latency histogram of FUSE operation ``op`` (create once, keep the object)."""
        t = self.op_timers.get(op)
        if t is None:
            t = self.op_timers[op] = OpTimer(op)
        return t

    # -- per group --------------------------------------------------------------------
    def note_commit(self, seconds: float, changes: int, commits: int) -> None:
        """One commit group done (trio thread): latency, group size, commits made."""
        self.commit_seconds.observe(seconds)
        self.commit_group_size.observe(changes)
        if commits:
            self.commits.inc(commits)
        if seconds >= self.slow_commit_s:
            self.slow_commits.inc()
            self._slow_commit_log.warn("slow commit: a group of %d change(s) took %.0f ms (slow_commit_ms=%.0f)",
                                       changes, seconds * 1e3, self.slow_commit_s * 1e3)

    def note_fsync(self, seconds: float) -> None:
        """One journal fdatasync done (committer thread)."""
        self.journal_fsync_seconds.observe(seconds)
        if seconds >= self.slow_fsync_s:
            self.slow_fsyncs.inc()
            self._slow_fsync_log.warn("slow journal fdatasync: %.0f ms (slow_fsync_ms=%.0f); the disk is "
                                      "slow or busy", seconds * 1e3, self.slow_fsync_s * 1e3)

    # -- reading ----------------------------------------------------------------------
    def text(self) -> bytes:
        """The Prometheus text exposition (``M/@metrics``, the HTTP endpoint)."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """Every metric as plain JSON values (``M/@stats``): names without the
        ``agentstatefs_`` prefix; counters and gauges as numbers (by label when
        labelled); histograms as count, sum, mean and estimated p50/p90/p99."""
        out: dict = {}
        for fam in self.registry.collect():
            name = fam.name[len(PREFIX):] if fam.name.startswith(PREFIX) else fam.name
            if fam.type == "histogram":
                out.update(_histograms(name, fam))
                continue
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                sname = s.name[len(PREFIX):] if s.name.startswith(PREFIX) else s.name
                value = _num(s.value)
                if s.labels:
                    key = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) if len(s.labels) > 1 \
                        else next(iter(s.labels.values()))
                    out.setdefault(sname, {})[key] = value
                else:
                    out[sname] = value
        return out

    def to_json(self, info: dict | None = None) -> bytes:
        doc = {"time": time.time(), "uptime_seconds": round(time.time() - self.started, 3)}
        if info:
            doc["info"] = info
        doc["metrics"] = self.snapshot()
        return (json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n").encode()


def _num(v: float):
    if isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 53:
        return int(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _histograms(name: str, fam) -> dict:
    series: dict = {}
    for s in fam.samples:
        labels = {k: v for k, v in s.labels.items() if k != "le"}
        key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        d = series.setdefault(key, {"buckets": []})
        if s.name.endswith("_bucket"):
            d["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            d["count"] = int(s.value)
        elif s.name.endswith("_sum"):
            d["sum"] = s.value
    out: dict = {}
    for key, d in series.items():
        count = d.get("count", 0)
        v = {"count": count, "sum": d.get("sum", 0.0)}
        if count:
            v["mean"] = v["sum"] / count
            for q in (0.5, 0.9, 0.99):
                v[f"p{int(q * 100)}"] = quantile(d["buckets"], q)
        if key:
            label_value = key.split("=", 1)[1] if key.count("=") == 1 else key
            out.setdefault(name, {})[label_value] = v
        else:
            out[name] = v
    return out


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Estimate quantile ``q`` from cumulative buckets ``[(upper, count)...]`` by linear
    interpolation inside the bucket (as Prometheus' histogram_quantile does)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def gauge(name: str, doc: str, value) -> GaugeMetricFamily:
    """For ``sources``: one unlabelled gauge read at collection time."""
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def counter(name: str, doc: str, value) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


metrics = Metrics()
