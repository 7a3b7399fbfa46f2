"""Errors raised by the store, carrying the errno a filesystem caller should see."""

import errno as _errno


class FsError(Exception):
    """A failure with errno semantics.

    ``errno`` is what the FUSE layer returns to the caller; ``reason`` is the short
    human explanation that goes into the single log line for this failure.
    """

    def __init__(self, errno: int, reason: str = ""):
        super().__init__(errno, reason or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno
        self.reason = reason or _errno.errorcode.get(errno, str(errno))

    def __str__(self) -> str:
        return f"[{_errno.errorcode.get(self.errno, self.errno)}] {self.reason}"


class RepoError(Exception):
    """The repository cannot be used (corrupt, read-only, locked); refuse to mount."""
