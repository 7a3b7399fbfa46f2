"""Inode numbers and kernel lookup counts.

Every inode number the kernel may still use maps to a key naming what it is:
  ("root",) · ("agent", id) · ("state", id, name) · ("scratch", node) ·
  ("orphan", attrs): a file that lost its name while the kernel still holds it ·
  ("hist-...", ...): read-only history views (see historyview.py).

Durable state files are numbered by their identity (``fid``, kept in the tree and
moved by rename, as ext4 keeps a file's inode across rename), so a renamed file answers
under the number the kernel already has for it. Agents, runtime files and history
views get numbers hashed from their key, stable across remounts. A number is never
handed to a new key while the kernel may still hold it for an old one: the old key is
retired (an orphan) until the kernel forgets it, and the new key probes for another
number. Entries exist only for numbers the kernel (or an open handle) knows, so the
table is bounded by the kernel's own inode cache.
"""

from __future__ import annotations

import errno

from .errors import FsError
from .gitstore import hash_ino

ROOT = 1


class InodeTable:
    def __init__(self):
        self._keys: dict[int, tuple] = {ROOT: ("root",)}
        self._inos: dict[tuple, int] = {("root",): ROOT}
        self._lookups: dict[int, int] = {}
        self._generation: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    # -- numbering -------------------------------------------------------------------
    def stable(self, key: tuple) -> int:
        """The number of a hashed key (agents, runtime files, history), registering it."""
        ino = self._inos.get(key)
        if ino is None:
            ino = self.number(key)   # probes past numbers in use (collisions, retired keys)
            self.bind(ino, key)
        return ino

    def number(self, key: tuple) -> int:
        """The number ``key`` has, or would get from ``stable`` now, without registering
        it: for entries a listing shows but the kernel does not look up (the kernel
        takes no reference, so nothing need be remembered; a later lookup registers)."""
        ino = self._inos.get(key)
        if ino is not None:
            return ino
        text = "\0".join(map(str, key))
        salt = 0
        while True:
            ino = hash_ino(text, salt)
            if ino not in self._keys:
                return ino
            salt += 1

    def keys_of_kind(self, kind: str) -> list[tuple[tuple, int]]:
        """(key, inode) of every live key whose first element is ``kind``."""
        return [(k, i) for k, i in self._inos.items() if k[0] == kind]

    def peek(self, key: tuple) -> int | None:
        return self._inos.get(key)

    def bind(self, ino: int, key: tuple) -> None:
        """Make ``ino`` mean ``key`` (a renamed file keeps its number under a new name).

        Whatever number ``key`` had before is retired."""
        old_key = self._keys.get(ino)
        if old_key is not None and old_key != key and self._inos.get(old_key) == ino:
            del self._inos[old_key]
        old_ino = self._inos.get(key)
        if old_ino is not None and old_ino != ino:
            self.retire(old_ino)
        self._keys[ino] = key
        self._inos[key] = ino

    def retire(self, ino: int, orphan: tuple | None = None) -> None:
        """``ino`` no longer has a name: keep it as an orphan while the kernel holds it."""
        key = self._keys.get(ino)
        if key is None or ino == ROOT:
            return
        if self._inos.get(key) == ino:
            del self._inos[key]
        if self._lookups.get(ino, 0) > 0:
            self._keys[ino] = orphan or ("orphan", None)
            self._generation[ino] = self._generation.get(ino, 0) + 1
        else:
            del self._keys[ino]

    def generation(self, ino: int) -> int:
        return self._generation.get(ino, 0)

    def key(self, ino: int) -> tuple:
        try:
            return self._keys[ino]
        except KeyError:
            raise FsError(errno.ENOENT, f"stale inode {ino}") from None

    def has(self, ino: int) -> bool:
        return ino in self._keys

    # -- kernel lookup counts ----------------------------------------------------------
    def remember(self, ino: int, n: int = 1) -> None:
        self._lookups[ino] = self._lookups.get(ino, 0) + n

    def known_to_kernel(self, ino: int) -> bool:
        return self._lookups.get(ino, 0) > 0

    def forget(self, ino: int, n: int, keep=lambda ino: False) -> None:
        """The kernel dropped ``n`` references; an unreferenced number is freed unless
        ``keep(ino)`` (an open handle still uses it)."""
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self.drop_if_unused(ino, keep)

    def drop_if_unused(self, ino: int, keep=lambda ino: False) -> None:
        if ino == ROOT or self._lookups.get(ino, 0) > 0 or keep(ino):
            return
        key = self._keys.pop(ino, None)
        if key is not None and self._inos.get(key) == ino:
            del self._inos[key]
        self._generation.pop(ino, None)
