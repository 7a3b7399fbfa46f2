"""Observability on a real mount: M/@metrics (Prometheus text, parsed with
prometheus_client's own parser), M/@stats (JSON), -o metrics_listen (HTTP), slow-commit
and scratch warnings, and ``agentstatefs status`` mounted and unmounted (issue 13)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import sh
from mounting import CLI


def parse(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, family: str, sample: str | None = None, **labels) -> float:
    for s in fams[family].samples:
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0.0


def read_metrics(mp) -> dict:
    return parse((mp / "@metrics").read_text())


def commits_total(mp) -> int:
    return int(value(read_metrics(mp), "agentstatefs_commits", "agentstatefs_commits_total"))


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["status", *args], capture_output=True, text=True)


def wait_for_log(m, text: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in m.log():
            return True
        time.sleep(0.1)
    return False


def test_metrics_commit_counter_rises_by_exactly_the_commits_made(mnt):
    mp = mnt.mp
    before = commits_total(mp)
    git_before = mnt.commit_count()
    (mp / "a1").mkdir()                                             # 1: create the agent
    (mp / "a1" / "config.json").write_text('{"n": 1}')              # 2
    sh(f"echo '{{\"m\": 1}}' > {mp}/a1/memory.json")                 # 3 (shell redirect)
    sh(f"echo '{{\"n\": 2}}' > {mp}/a1/t.tmp && mv {mp}/a1/t.tmp {mp}/a1/config.json")   # 4 (rename)
    with open(mp / "a1" / "config.json", "w") as f:                 # 5 (Python, several writes)
        json.dump({"n": 3, "pad": "x" * 10000}, f)
    (mp / "a1" / "config.json").write_text('{"n": 3, "pad": "' + "x" * 10000 + '"}')  # same content: no commit
    with pytest.raises(OSError) as e:
        with open(mp / "a1" / "config.json", "w") as f:              # refused: no commit
            f.write("not json")
    assert e.value.errno == errno.EINVAL
    (mp / "a1" / "runtime.json").write_text('{"r": 1}')             # RAM only: no commit
    (mp / "a2").mkdir()                                             # 6
    shutil.rmtree(mp / "a2")                                        # 7 (recorded delete)
    made = 7
    fams = read_metrics(mp)
    assert value(fams, "agentstatefs_commits", "agentstatefs_commits_total") - before == made
    assert mnt.commit_count() - git_before == made
    # Group sizes and durations were recorded; so were the requests and the refusal.
    assert value(fams, "agentstatefs_commit_group_size", "agentstatefs_commit_group_size_sum") >= made
    assert value(fams, "agentstatefs_commit_duration_seconds", "agentstatefs_commit_duration_seconds_count") >= 1
    assert value(fams, "agentstatefs_journal_fsync_seconds", "agentstatefs_journal_fsync_seconds_count") >= 1
    assert value(fams, "agentstatefs_op_duration_seconds", "agentstatefs_op_duration_seconds_count",
                 op="write") >= 4
    assert value(fams, "agentstatefs_refused_writes", "agentstatefs_refused_writes_total", errno="EINVAL") == 1
    assert value(fams, "agentstatefs_runtime_bytes") == len('{"r": 1}')
    assert value(fams, "agentstatefs_agents") == 1
    assert value(fams, "agentstatefs_repo_commits") == mnt.commit_count()
    hits = {s.labels["cache"] for s in fams["agentstatefs_cache_hits"].samples}
    assert {"agent", "blob", "tree"} <= hits
    # Reading the metrics is not a commit.
    assert commits_total(mp) - before == made


def test_stats_json_snapshot_and_files(mnt):
    mp = mnt.mp
    (mp / "a1").mkdir()
    with open(mp / "a1" / "notes.tmp", "w"):
        doc = json.loads((mp / "@stats").read_bytes())
    assert doc["info"]["commits"] == mnt.commit_count() == 1
    assert doc["info"]["agents"] == 1
    assert doc["metrics"]["commits_total"] == 1
    assert doc["metrics"]["open_handles"] == 1           # notes.tmp (not the @stats handle: made after)
    assert os.stat(mp / "@stats").st_size > 0
    # One snapshot per open: a commit between two reads of one descriptor is not in it.
    with open(mp / "@stats", "rb") as f:
        head = f.read(10)
        (mp / "a2").mkdir()
        rest = f.read()
    assert json.loads(head + rest)["metrics"]["commits_total"] == 1
    assert json.loads((mp / "@stats").read_bytes())["metrics"]["commits_total"] == 2
    # Resolve by name, stay out of listings (like @events), read-only.
    assert sorted(os.listdir(mp)) == ["a1", "a2"]
    for name in ("@stats", "@metrics"):
        with pytest.raises(PermissionError):
            open(mp / name, "w")
        with pytest.raises(OSError) as e:
            os.unlink(mp / name)
        assert e.value.errno == errno.EPERM
    # cat / cp see all of it (the stat size is never smaller than what a read returns).
    out = sh(f"cat {mp}/@metrics").stdout
    assert "agentstatefs_commits_total 2.0" in out
    parse(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_over_http(mounts):
    port = _free_port()
    m = mounts().start(f"metrics_listen=127.0.0.1:{port}")
    (m.mp / "a1").mkdir()
    (m.mp / "a1" / "config.json").write_text("{}")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        fams = parse(r.read().decode())
    assert value(fams, "agentstatefs_commits", "agentstatefs_commits_total") == 2 == commits_total(m.mp)
    assert "agentstatefs_op_duration_seconds" in fams


def test_metrics_listen_port_taken_fails_the_mount(mounts):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        m = mounts()
        m.start(f"metrics_listen=127.0.0.1:{port}", wait=False)
        assert m.proc.wait(timeout=60) == 1
        assert "cannot serve metrics on 127.0.0.1:" in m.log()
        assert not os.path.ismount(m.mp)


def test_bad_metrics_listen_option():
    r = subprocess.run(CLI + ["mount", "-o", "metrics_listen=nohost", "/nonexistent-mp"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "metrics_listen" in r.stderr


def test_status_matches_the_repo_mounted_and_unmounted(mounts):
    m = mounts().start()
    for a in ("a1", "a2", "a3"):
        (m.mp / a).mkdir()
        (m.mp / a / "config.json").write_text(json.dumps({"a": a}))
    shutil.rmtree(m.mp / "a3")
    m.git_settled()
    r = status(str(m.mp), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["mounted"] is True
    assert st["head"] == m.git("rev-parse", "main").strip()
    assert st["commits"] == m.commit_count() == 8     # 3 mkdir, 3 writes, rm config.json, rmdir
    assert st["agents"] == len(os.listdir(m.mp)) == 2
    assert st["repo"] == str(m.repo)
    assert st["replication"]["enabled"] is False
    assert st["warnings"] == []
    human = status(str(m.mp))
    assert human.returncode == 0
    assert "agents       2" in human.stdout and st["head"] in human.stdout

    head = st["head"]
    assert m.stop() == 0
    r = status("--repo", str(m.repo), "--json")
    assert r.returncode == 0, r.stderr
    off = json.loads(r.stdout)
    assert off["mounted"] is False
    assert (off["head"], off["commits"], off["agents"]) == (head, 8, 2)
    assert off["repo_size_bytes"] > 0 and off["last_checkpoint"]
    # Not mounted and no repository named: a clear refusal.
    r = status(str(m.mp))
    assert r.returncode == 1 and "no agentstatefs mount" in r.stderr


def test_warnings_slow_commit_and_scratch_near_cap(mounts):
    m = mounts().start("slow_commit_ms=0", "scratch_max=64K")
    (m.mp / "a1").mkdir()
    (m.mp / "a1" / "config.json").write_text("{}")
    (m.mp / "a1" / "big.tmp").write_bytes(b"x" * (62 << 10))
    doc = json.loads((m.mp / "@stats").read_bytes())
    assert any(w.startswith("scratch space") for w in doc["info"]["warnings"])
    assert doc["metrics"]["slow_commits_total"] >= 2
    st = json.loads(status(str(m.mp), "--json").stdout)
    assert any("scratch" in w for w in st["warnings"])
    assert wait_for_log(m, "slow commit: a group of")
    assert wait_for_log(m, "scratch space")
    # Rate-limited: one line for many slow groups.
    for i in range(5):
        (m.mp / "a1" / "config.json").write_text(json.dumps({"i": i}))
    assert m.log().count("slow commit: a group of") == 1


def test_prune_progress_and_commit_count_after_prune(mounts):
    m = mounts().start()
    (m.mp / "a1").mkdir()
    for i in range(5):
        (m.mp / "a1" / "config.json").write_text(json.dumps({"i": i}))
    before = read_metrics(m.mp)
    assert value(before, "agentstatefs_maintenance_running", kind="prune") == 0
    made = value(before, "agentstatefs_commits", "agentstatefs_commits_total")
    r = subprocess.run(CLI + ["prune", "--repo", str(m.repo), "--keep-last", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fams = read_metrics(m.mp)
    assert value(fams, "agentstatefs_maintenance_runs", "agentstatefs_maintenance_runs_total", kind="prune") == 1
    assert value(fams, "agentstatefs_maintenance_failures", "agentstatefs_maintenance_failures_total",
                 kind="prune") == 0
    assert value(fams, "agentstatefs_maintenance_running", kind="prune") == 0
    assert value(fams, "agentstatefs_maintenance_progress_ratio") == 1.0
    # commits_total counts commits made by writers; the history served is the pruned chain
    assert value(fams, "agentstatefs_commits", "agentstatefs_commits_total") == made
    assert value(fams, "agentstatefs_repo_commits") == m.commit_count() == 2
    st = json.loads(status(str(m.mp), "--json").stdout)
    assert st["commits"] == 2 and st["maintenance"]["state"] == "done"
    assert "maintenance  prune done" in status(str(m.mp)).stdout


def test_replication_in_metrics_and_status(mounts, tmp_path):
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    m = mounts().start(f"replicate={remote},replicate_interval=0.2")
    (m.mp / "a1").mkdir()
    (m.mp / "a1" / "config.json").write_text('{"x": 1}')
    m.git_settled()
    head = m.git("rev-parse", "main").strip()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = subprocess.run(["git", "-C", str(remote), "rev-parse", "main"], capture_output=True, text=True)
        if r.stdout.strip() == head:
            break
        time.sleep(0.1)
    while time.monotonic() < deadline:    # the gauges are set right after the push returns
        fams = read_metrics(m.mp)
        if value(fams, "agentstatefs_replication_lag_commits") == 0 and \
                value(fams, "agentstatefs_replication_pushes", "agentstatefs_replication_pushes_total") >= 1:
            break
        time.sleep(0.1)
    assert value(fams, "agentstatefs_replication_enabled") == 1
    assert value(fams, "agentstatefs_replication_errors", "agentstatefs_replication_errors_total") == 0
    st = json.loads(status(str(m.mp), "--json").stdout)
    assert st["replication"]["enabled"] is True
    assert st["replication"]["detail"]["mode"] == "push"
    assert st["replication"]["detail"]["url"] == str(remote)
    assert f"pushing to {remote}: 0 s / 0 commits behind, 0 errors" in status(str(m.mp)).stdout
