"""Test helper: run the real daemon on a temp repo and mount point, always torn down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "agentstatefs.daemon.cli"]


def is_stale(path: Path) -> bool:
    try:
        os.statvfs(path)
        return False
    except OSError:
        return True


def is_live_mount(path: Path) -> bool:
    """A mount answers at ``path``, checked atomically enough to survive the window in
    which a new daemon lazily detaches the dead mount it replaces: the device seen
    before and after the statvfs probe must be the same, and not the parent's."""
    try:
        before = os.stat(path).st_dev
        if before == os.stat(path.parent).st_dev:
            return False
        os.statvfs(path)
        return os.stat(path).st_dev == before
    except OSError:
        return False


class Mount:
    """One daemon process serving ``repo`` at ``mp``."""

    def __init__(self, base: Path, name: str = "m", repo: Path | None = None):
        self.base = base
        self.repo = repo or base / f"{name}-repo"
        self.mp = base / f"{name}-mnt"
        self.log_path = base / f"{name}-daemon.log"
        self.proc: subprocess.Popen | None = None
        self.mp.mkdir(parents=True, exist_ok=True)

    def start(self, *options: str, wait: bool = True, extra: tuple = (),
              env: dict[str, str] | None = None) -> "Mount":
        """Start the daemon; ``env`` entries are added to (override) the inherited environment."""
        args = CLI + ["mount", "--foreground", "--repo", str(self.repo), str(self.mp), *extra]
        for o in options:
            args += ["-o", o]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env} if env else None)
        if wait:
            self.wait_mounted()
        return self

    def wait_mounted(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_live_mount(self.mp):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise RuntimeError(f"mount did not appear within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon and wait for it; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self._log.close()
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()

    def cleanup(self) -> None:
        """Leave no daemon and no mount behind, whatever state we are in."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if os.path.ismount(self.mp) or is_stale(self.mp):
            subprocess.run(["fusermount3", "-uz", str(self.mp)], capture_output=True)
        try:
            self._log.close()
        except AttributeError:
            pass

    def git_settled(self, timeout: float = 10.0) -> None:
        """Wait until git's ``main`` on disk names the head the mount serves: the daemon
        writes each group's pack and ref right after acknowledging it."""
        if self.proc is None or self.proc.poll() is not None or not is_live_mount(self.mp):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                head = os.getxattr(self.mp, "user.agentstatefs.head")
                if os.getxattr(self.mp, "user.agentstatefs.git-head") == head:
                    return
            except OSError:
                return
            time.sleep(0.002)

    def git(self, *args: str, check: bool = True) -> str:
        self.git_settled()
        r = subprocess.run(["git", "-C", str(self.repo), *args], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed: {r.stderr}")
        return r.stdout

    def commit_count(self) -> int:
        out = self.git("rev-list", "--count", "main", check=False).strip()
        return int(out) if out.isdigit() else 0

    def tree_path(self, agent: str, name: str = "") -> str:
        """Path of an agent (or one of its files) inside the git tree."""
        from agentstatefs.fs.layout import agent_path
        return agent_path(agent) + (f"/{name}" if name else "")

    def __truediv__(self, other: str) -> Path:
        return self.mp / other
