"""One daemon per repository: an exclusive flock on ``REPO/agentstatefs/lock``."""

import fcntl
import os

from .errors import RepoError


class RepoLock:
    def __init__(self, repo_dir: str):
        self.path = os.path.join(repo_dir, "agentstatefs", "lock")
        self._fd: int | None = None

    def acquire(self, mountpoint: str) -> None:
        repo = os.path.dirname(os.path.dirname(self.path))
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RepoError(f"repository {repo} is not writable ({exc.strerror}); "
                            f"mount with -o ro to serve it read-only") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RepoError(f"repository {os.path.dirname(os.path.dirname(self.path))} is already in use "
                            f"({holder}); one daemon per repository") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} mounted at {mountpoint}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
