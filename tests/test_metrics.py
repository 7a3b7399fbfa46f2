"""The metrics registry (fs/metrics.py) in-process: the text parses with prometheus_client's
own parser, JSON carries the same numbers, quantiles come from the buckets."""

import json

from prometheus_client.parser import text_string_to_metric_families

from agentstatefs.fs.metrics import Metrics, gauge, quantile


def families(m: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.text().decode())}


def sample(fams, family, name, **labels):
    for s in fams[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, name, labels))


def test_text_parses_and_counts():
    m = Metrics()
    t = m.op_timer("read")
    for v in (2e-5, 3e-5, 4e-3):
        t.observe(v)
    m.note_commit(0.002, changes=4, commits=3)
    m.note_commit(0.001, changes=1, commits=1)
    m.note_fsync(0.0015)
    m.denials.labels(op="open").inc()
    m.refused_writes.labels(errno="EINVAL").inc(2)
    m.replication_lag_seconds.set(7.5)
    m.sources["t"] = lambda: [gauge("scratch_bytes", "scratch", 123)]
    fams = families(m)
    assert sample(fams, "agentstatefs_commits", "agentstatefs_commits_total") == 4
    assert sample(fams, "agentstatefs_commit_group_size", "agentstatefs_commit_group_size_count") == 2
    assert sample(fams, "agentstatefs_commit_group_size", "agentstatefs_commit_group_size_sum") == 5
    assert sample(fams, "agentstatefs_op_duration_seconds", "agentstatefs_op_duration_seconds_count",
                  op="read") == 3
    assert sample(fams, "agentstatefs_op_duration_seconds", "agentstatefs_op_duration_seconds_bucket",
                  op="read", le="5e-05") == 2
    assert sample(fams, "agentstatefs_journal_fsync_seconds", "agentstatefs_journal_fsync_seconds_count") == 1
    assert sample(fams, "agentstatefs_denials", "agentstatefs_denials_total", op="open") == 1
    assert sample(fams, "agentstatefs_refused_writes", "agentstatefs_refused_writes_total", errno="EINVAL") == 2
    assert sample(fams, "agentstatefs_replication_lag_seconds", "agentstatefs_replication_lag_seconds") == 7.5
    assert sample(fams, "agentstatefs_scratch_bytes", "agentstatefs_scratch_bytes") == 123
    assert not any(n.endswith("_created") for n in fams)

    doc = json.loads(m.to_json({"tenant": "t"}))
    s = doc["metrics"]
    assert doc["info"] == {"tenant": "t"}
    assert s["commits_total"] == 4
    assert s["denials_total"] == {"open": 1}
    assert s["op_duration_seconds"]["read"]["count"] == 3
    assert 2.5e-5 <= s["op_duration_seconds"]["read"]["p50"] <= 5e-5
    assert s["scratch_bytes"] == 123


def test_broken_source_does_not_break_the_page():
    m = Metrics()

    def broken():
        raise RuntimeError("boom")
        yield
    m.sources["broken"] = broken
    m.commits.inc()
    assert sample(families(m), "agentstatefs_commits", "agentstatefs_commits_total") == 1


def test_slow_warnings_rate_limited(caplog):
    m = Metrics()
    m.slow_commit_s = 0.01
    with caplog.at_level("WARNING", logger="agentstatefs"):
        for _ in range(5):
            m.note_commit(0.5, changes=1, commits=1)
    assert sum("slow commit" in r.getMessage() for r in caplog.records) == 1
    assert sample(families(m), "agentstatefs_slow_commits", "agentstatefs_slow_commits_total") == 5


def test_quantile():
    buckets = [(1.0, 0), (2.0, 10), (4.0, 20), (float("inf"), 20)]
    assert quantile(buckets, 0.5) == 2.0
    assert quantile(buckets, 0.25) == 1.5
    assert quantile(buckets, 0.75) == 3.0
    assert quantile([(1.0, 0), (float("inf"), 0)], 0.5) is None
