"""Inode numbers and kernel lookup counts.

Agent directories and state files get inode numbers derived from their path (xxh64),
so they are stable across remounts. Scratch nodes get numbers from a private serial.
The table maps every number the kernel may still use to its key, and forgets a number
when its lookup count drops to zero (and nothing else holds it).
"""

from __future__ import annotations

import errno

import pyfuse3
import xxhash

from ..fs.errors import FsError

ROOT = pyfuse3.ROOT_INODE

# Keys are tuples: ("root",), ("agent", id), ("state", id, name), ("scratch", node),
# ("alias", id, name): a scratch inode renamed onto a state file keeps answering as it.


def _hash_ino(text: str, salt: int = 0) -> int:
    ino = xxhash.xxh64_intdigest(text.encode(), seed=salt) & ((1 << 63) - 1)
    return ino if ino > 1024 else ino + 1024


class InodeTable:
    def __init__(self):
        self._keys: dict[int, tuple] = {ROOT: ("root",)}
        self._lookups: dict[int, int] = {}
        self._scratch_serial = 0

    def stable(self, key: tuple) -> int:
        """The stable inode number of a path key, registering it."""
        text = "\0".join(key)
        salt = 0
        while True:
            ino = _hash_ino(text, salt)
            have = self._keys.get(ino)
            if have is None or have == key:
                self._keys[ino] = key
                return ino
            salt += 1  # astronomically rare collision: probe

    def agent(self, agent: str) -> int:
        return self.stable(("agent", agent))

    def state(self, agent: str, name: str) -> int:
        return self.stable(("state", agent, name))

    def new_scratch_ino(self) -> int:
        while True:
            self._scratch_serial += 1
            ino = _hash_ino(f"scratch:{self._scratch_serial}")
            if ino not in self._keys:
                return ino

    def set(self, ino: int, key: tuple) -> None:
        self._keys[ino] = key

    def key(self, ino: int) -> tuple:
        try:
            return self._keys[ino]
        except KeyError:
            raise FsError(errno.ENOENT, f"stale inode {ino}") from None

    def remember(self, ino: int, n: int = 1) -> None:
        self._lookups[ino] = self._lookups.get(ino, 0) + n

    def known_to_kernel(self, ino: int) -> bool:
        return self._lookups.get(ino, 0) > 0

    def forget(self, ino: int, n: int) -> None:
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        key = self._keys.get(ino)
        if key is not None and (key[0] in ("agent", "state", "alias") or key[0].startswith("hist-")) and ino != ROOT:
            del self._keys[ino]
        elif key is not None and key[0] == "scratch" and getattr(key[1], "nlink", 1) == 0:
            del self._keys[ino]
