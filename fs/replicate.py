"""Replication: push ``main`` to a git remote in the background (``-o replicate=URL``).

A thread of its own runs ``git push`` (a subprocess) every ``replicate_interval``
seconds when ``main`` moved; the FUSE thread and the committer never wait for it.
It pushes only what git holds durably enough to be read by another process: the
commit that ``refs/heads/main`` *on disk* names (the flusher writes each group's pack
before the ref, so every object of that commit is in a pack; objects still in memory
are never named by it).

Every push but the first is ``--force-with-lease=refs/heads/main:<last pushed>``: a
fast-forward normally, and after a prune (which rewrites the chain) a forced update
that only succeeds if the remote still has what this host pushed, so another writer's
commits are never overwritten. If the lease fails because our record is stale (a
crash right after a push), a remote head that ``main`` contains, or the old head of
the last prune, is adopted as the lease and the push retried; anything else is an
error ("remote main has commits this host did not push"), reported and retried.

Lag (seconds since the oldest commit not on the remote, and commits behind) and
errors are kept in ``stats`` and in the metrics registry.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time

from .metrics import metrics
from .monitor import redact_url
from .prune import read_record

log = logging.getLogger(__name__)

BRANCH = "refs/heads/main"
PUSH_TIMEOUT = 600.0


def git_env() -> dict:
    """Never prompt for credentials (a daemon has no terminal); ssh in batch mode
    unless the operator set GIT_SSH_COMMAND (see docs/operations.md)."""
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    return env


def check_url(url: str) -> str:
    if not url or url.startswith("-") or any(c in url for c in "\n\r\0 "):
        raise ValueError(f"bad remote URL {url!r}")
    return url


def read_main(repo_dir: str) -> str | None:
    """What ``refs/heads/main`` names on disk (loose ref, else packed-refs)."""
    try:
        with open(os.path.join(repo_dir, BRANCH)) as f:
            value = f.read().strip()
        if len(value) == 40:
            return value
    except OSError:
        pass
    try:
        with open(os.path.join(repo_dir, "packed-refs")) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1] == BRANCH:
                    return parts[0]
    except OSError:
        pass
    return None


class ReplicationStats:
    def __init__(self, url: str):
        self.url = url
        self.local: str | None = None        # main on disk at the last check
        self.pushed: str | None = None       # what the remote has (as far as we know)
        self.lag_seconds = 0.0
        self.lag_commits = 0
        self.pushes = 0
        self.errors = 0
        self.forced = 0
        self.last_push = 0.0
        self.last_error: str | None = None
        self.last_error_time = 0.0

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["url"] = redact_url(self.url)      # the root xattr is readable by every user of the mount
        return d


class Replicator:
    """Pushes ``repo_dir``'s main to ``url`` every ``interval`` seconds, in a thread."""

    def __init__(self, repo_dir: str, url: str, interval: float = 5.0):
        self.repo_dir = os.path.abspath(repo_dir)
        self.url = check_url(url)
        self.interval = interval
        self.stats = ReplicationStats(url)
        self.shown = redact_url(url)       # for log lines
        self._state_path = os.path.join(self.repo_dir, "agentstatefs", "replicate.json")
        self.stats.pushed = self._load_pushed()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()      # one push at a time (the final push at shutdown)
        metrics.replication_enabled.set(1)

    # -- state ------------------------------------------------------------------------
    def _load_pushed(self) -> str | None:
        try:
            with open(self._state_path) as f:
                d = json.load(f)
            return d.get(self.url) if isinstance(d, dict) else None
        except (OSError, ValueError):
            return None

    def _save_pushed(self, sha: str) -> None:
        try:
            try:
                with open(self._state_path) as f:
                    d = json.load(f)
                if not isinstance(d, dict):
                    d = {}
            except (OSError, ValueError):
                d = {}
            d[self.url] = sha
            tmp = self._state_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(d, f)
            os.replace(tmp, self._state_path)
        except OSError as exc:
            log.warning("replication: could not record the pushed head (%s)", exc)

    # -- git ----------------------------------------------------------------------------
    def _git(self, *args: str, timeout: float = PUSH_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", self.repo_dir, *args], capture_output=True, text=True,
                              errors="replace", env=git_env(), stdin=subprocess.DEVNULL, timeout=timeout)

    def _remote_head(self) -> str | None:
        r = self._git("ls-remote", self.url, BRANCH, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"ls-remote failed: {r.stderr.strip()[-300:]}")
        line = r.stdout.split()
        return line[0] if line else None

    def _contains(self, sha: str, other: str) -> bool:
        """``other`` is ``sha`` or one of its ancestors."""
        return self._git("merge-base", "--is-ancestor", other, sha, timeout=60).returncode == 0

    def _lag(self, sha: str) -> None:
        s = self.stats
        if sha == s.pushed:
            s.lag_seconds, s.lag_commits = 0.0, 0
        else:
            args = ["log", "--format=%ct", sha]
            if s.pushed and self._git("cat-file", "-e", s.pushed + "^{commit}", timeout=60).returncode == 0:
                args += ["--not", s.pushed]
            r = self._git(*args, timeout=120)
            times = r.stdout.split() if r.returncode == 0 else []
            s.lag_commits = len(times)
            s.lag_seconds = max(0.0, time.time() - int(times[-1])) if times else 0.0
        metrics.replication_lag_seconds.set(s.lag_seconds)
        metrics.replication_lag_commits.set(s.lag_commits)

    def _push(self, sha: str, lease: str | None) -> subprocess.CompletedProcess:
        args = ["push", "--porcelain", "--quiet"]
        if lease is not None:
            args.append(f"--force-with-lease={BRANCH}:{lease}")
        return self._git(*args, self.url, f"{sha}:{BRANCH}")

    def push_once(self) -> bool:
        """Push main as it is on disk now, if the remote lacks it. True when in sync."""
        with self._lock:
            s = self.stats
            sha = read_main(self.repo_dir)
            s.local = sha
            if sha is None:
                return True
            try:
                self._lag(sha)
            except (OSError, subprocess.SubprocessError) as exc:
                log.debug("replication: lag not computed (%s)", exc)
            if sha == s.pushed:
                return True
            try:
                r = self._push(sha, s.pushed)
                if r.returncode != 0:
                    # Our record may be stale or the chain was rewritten since: look.
                    remote = self._remote_head()
                    lease = None
                    if remote is None or remote == sha or self._contains(sha, remote):
                        lease = remote or ""
                    else:
                        rec = read_record(self.repo_dir)
                        if rec and remote in (rec.get("old_head"), s.pushed):
                            lease = remote
                    if lease is None:
                        raise RuntimeError(f"remote main is at {remote[:12]}, which this host did not push "
                                           f"(another writer?); not overwriting it")
                    if lease == sha:
                        r = subprocess.CompletedProcess([], 0, "", "")
                    else:
                        r = self._push(sha, lease)
                    if r.returncode != 0:
                        raise RuntimeError(f"git push failed: {(r.stderr or r.stdout).strip()[-500:]}")
                forced = s.pushed is not None and not self._contains(sha, s.pushed)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                s.errors += 1
                s.last_error, s.last_error_time = str(exc), time.time()
                metrics.replication_errors.inc()
                log.error("replication to %s: %s", self.shown, exc)
                return False
            if forced:
                s.forced += 1
                log.info("replication: %s rewritten on %s (after a prune), with lease", BRANCH, self.shown)
            s.pushed, s.pushes, s.last_push = sha, s.pushes + 1, time.time()
            s.lag_seconds, s.lag_commits = 0.0, 0
            self._save_pushed(sha)
            metrics.replication_pushes.inc()
            metrics.replication_last_push.set(s.last_push)
            metrics.replication_lag_seconds.set(0)
            metrics.replication_lag_commits.set(0)
            return read_main(self.repo_dir) == sha

    # -- thread --------------------------------------------------------------------------
    def start(self) -> "Replicator":
        self._thread = threading.Thread(target=self._run, name="replicate", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.push_once()
            except Exception:
                log.exception("replication: unexpected error (will retry)")
            self._wake.wait(self.interval)
            self._wake.clear()

    def stop(self, final_push: bool = True, timeout: float = 30.0) -> None:
        """Stop the thread; with ``final_push``, push once more (after the final
        checkpoint the ref names the last head), bounded by ``timeout``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if final_push:
            done = threading.Event()

            def last():
                try:
                    self.push_once()
                finally:
                    done.set()
            threading.Thread(target=last, name="replicate-final", daemon=True).start()
            if not done.wait(timeout):
                log.warning("replication: final push to %s did not finish within %.0f s", self.shown, timeout)
