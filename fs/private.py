"""The repository is private to the daemon's user: 0700 directories, 0600 files.

Git (libgit2 and the ``git`` command) creates files and directories with the
process umask, so every process that writes a repository (the daemon and the CLI
verbs that open one) first calls ``restrict_umask()``; ``tighten()`` removes group
and other bits from everything already there (a repository made under umask 022
by an older version, or copied in), once, at mount.
"""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger("agentstatefs")

UMASK = 0o077


def restrict_umask() -> int:
    """Make files this process creates from now on private; returns the old umask."""
    return os.umask(UMASK)


def tighten(path: str) -> int:
    """Remove group/other permission bits from ``path`` and everything under it
    (symbolic links are not followed). Returns how many entries were changed.

    Only entries that have such bits are touched (one ``lstat`` each, as part of the
    directory walk)."""
    changed = 0

    def fix(p: str, st_mode: int) -> None:
        nonlocal changed
        if stat.S_ISLNK(st_mode) or not st_mode & 0o077:
            return
        try:
            os.chmod(p, stat.S_IMODE(st_mode) & ~0o077)
            changed += 1
        except OSError as exc:
            log.warning("cannot make %s private: %s", p, exc.strerror)

    try:
        fix(path, os.lstat(path).st_mode)
    except FileNotFoundError:
        return 0
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError as exc:
            log.warning("cannot make %s private: %s", d, exc.strerror)
            continue
        with it:
            for e in it:
                try:
                    mode = e.stat(follow_symlinks=False).st_mode
                except OSError:
                    continue
                fix(e.path, mode)
                if stat.S_ISDIR(mode):
                    stack.append(e.path)
    if changed:
        log.info("made %d entries of %s private (0700/0600)", changed, path)
    return changed
