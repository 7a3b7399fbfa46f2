"""Permission checks made by the daemon itself: mode bits, owner/group (supplementary
groups included), POSIX ACLs, root and the admin group.

The mount runs without ``default_permissions`` so that every decision is the daemon's
and every denial can reach the audit log (docs/decisions.md). A *Perm* is what one
object grants: ``(mode, uid, gid, acl)`` where ``mode`` holds the permission bits
(with an ACL, the group bits are the ACL's mask, as on Linux) and ``acl`` is None or
the *extended* entries: ``[[tag, perm, id], ...]`` of named users, named groups and the
owning group (``GROUP_OBJ``); the owner, mask and other entries live in the mode.

ACL xattrs (``system.posix_acl_access`` / ``_default``) use the kernel's binary form:
a little-endian u32 version 2 header, then 8-byte entries (u16 tag, u16 perm, u32 id).
Everything in them is the caller's: ``parse_acl`` refuses anything malformed (EINVAL).

Group membership is read from ``/proc/<pid>/status`` only when a decision depends on
it, and cached per (pid, uid, gid) for a second in a bounded table.
"""

from __future__ import annotations

import errno
import struct
import time

from .errors import FsError

R, W, X = 4, 2, 1

ACL_XATTR = "system.posix_acl_access"
DEFAULT_ACL_XATTR = "system.posix_acl_default"
ACL_XATTRS = (ACL_XATTR, DEFAULT_ACL_XATTR)

USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_TAGS = (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER)
UNDEFINED_ID = 0xFFFFFFFF
ACL_VERSION = 2
ACL_MAX_ENTRIES = 1024
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

GROUPS_TTL = 1.0
GROUPS_CACHE_MAX = 4096


# -- ACLs -------------------------------------------------------------------------------

def parse_acl(value: bytes) -> list[tuple[int, int, int]]:
    """Decode and validate a binary POSIX ACL; returns its entries sorted (tag, id)."""
    value = bytes(value)
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise FsError(errno.EINVAL, "ACL: not a whole number of entries")
    if _HEADER.unpack_from(value)[0] != ACL_VERSION:
        raise FsError(errno.EINVAL, "ACL: unknown version (expected 2)")
    n = (len(value) - _HEADER.size) // _ENTRY.size
    if n > ACL_MAX_ENTRIES:
        raise FsError(errno.EINVAL, f"ACL: more than {ACL_MAX_ENTRIES} entries")
    entries, seen = [], set()
    for i in range(n):
        tag, perm, ident = _ENTRY.unpack_from(value, _HEADER.size + i * _ENTRY.size)
        if tag not in _TAGS:
            raise FsError(errno.EINVAL, f"ACL: unknown entry tag {tag:#x}")
        if perm & ~7:
            raise FsError(errno.EINVAL, f"ACL: bad permission bits {perm:#x}")
        if tag not in (USER, GROUP):
            ident = UNDEFINED_ID
        elif ident == UNDEFINED_ID:
            raise FsError(errno.EINVAL, "ACL: a named entry without an id")
        if (tag, ident) in seen:
            raise FsError(errno.EINVAL, "ACL: duplicate entry")
        seen.add((tag, ident))
        entries.append((tag, perm, ident))
    tags = [e[0] for e in entries]
    for required in (USER_OBJ, GROUP_OBJ, OTHER):
        if required not in tags:
            raise FsError(errno.EINVAL, "ACL: owner, group and other entries are required")
    if (USER in tags or GROUP in tags) and MASK not in tags:
        raise FsError(errno.EINVAL, "ACL: named entries need a mask entry")
    entries.sort(key=lambda e: (e[0], e[2]))
    return entries


def encode_acl(entries) -> bytes:
    out = [_HEADER.pack(ACL_VERSION)]
    for tag, perm, ident in sorted(entries, key=lambda e: (e[0], e[2])):
        out.append(_ENTRY.pack(tag, perm, UNDEFINED_ID if tag not in (USER, GROUP) else ident))
    return b"".join(out)


def split_acl(entries, mode: int) -> tuple[int, list | None]:
    """A full ACL as (new mode, extended entries or None when the ACL is just the mode).
    The file type and special bits of ``mode`` are kept."""
    d = {t: p for t, p, _ in entries if t not in (USER, GROUP)}
    group_bits = d[MASK] if MASK in d else d[GROUP_OBJ]
    new_mode = (mode & ~0o777) | d[USER_OBJ] << 6 | group_bits << 3 | d[OTHER]
    named = [[t, p, i] for t, p, i in entries if t in (USER, GROUP)]
    if not named and MASK not in d:
        return new_mode, None
    return new_mode, [[GROUP_OBJ, d[GROUP_OBJ], UNDEFINED_ID]] + named


def full_acl(mode: int, ext) -> list[tuple[int, int, int]]:
    """The whole ACL of an object: its mode bits plus its extended entries."""
    out = [(USER_OBJ, mode >> 6 & 7, UNDEFINED_ID), (OTHER, mode & 7, UNDEFINED_ID)]
    if ext:
        out.append((MASK, mode >> 3 & 7, UNDEFINED_ID))
        out += [(t, p, i) for t, p, i in ext]
    else:
        out.append((GROUP_OBJ, mode >> 3 & 7, UNDEFINED_ID))
    return sorted(out, key=lambda e: (e[0], e[2]))


def inherit(default, mode: int) -> tuple[int, list | None]:
    """Mode and ACL of an object created with ``mode`` in a directory whose default ACL
    is ``default`` (POSIX.1e: the default ACL, its owner/group-class/other entries
    limited by the creation mode)."""
    out = []
    has_mask = any(t == MASK for t, _, _ in default)
    for t, p, i in default:
        if t == USER_OBJ:
            p &= mode >> 6 & 7
        elif t == OTHER:
            p &= mode & 7
        elif t == MASK or (t == GROUP_OBJ and not has_mask):
            p &= mode >> 3 & 7
        out.append((t, p, i))
    return split_acl(out, mode & ~0o777)


def acl_text(ext) -> str:
    """Short text of extended entries for logs: ``u:1000:r--,g:50:rw-``."""
    def rwx(p):
        return "".join(c if p & b else "-" for c, b in (("r", 4), ("w", 2), ("x", 1)))
    return ",".join(f"{'u' if t == USER else 'g'}:{i}:{rwx(p)}" for t, p, i in (ext or ()) if t in (USER, GROUP))


# -- who is asking ------------------------------------------------------------------------

def read_groups(pid: int) -> frozenset[int]:
    """Supplementary groups of ``pid`` (``Groups:`` of /proc/<pid>/status); empty if gone."""
    try:
        with open(f"/proc/{int(pid)}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    except (OSError, ValueError):
        pass
    return frozenset()


class Access:
    """Decides, for one mount: root and the admin group may do everything."""

    def __init__(self, admin_gid: int | None = None, groups_of=read_groups, clock=time.monotonic):
        self.admin_gid = admin_gid
        self._groups_of = groups_of
        self._clock = clock
        self._cache: dict[tuple, tuple[float, frozenset]] = {}
        self.lookups = 0     # /proc reads (tests, @stats)

    def groups(self, caller) -> frozenset[int]:
        """The caller's primary and supplementary groups (cached briefly, bounded)."""
        key = (caller.pid, caller.uid, caller.gid)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        self.lookups += 1
        gs = frozenset((caller.gid,)) | (self._groups_of(caller.pid) if caller.pid else frozenset())
        if len(self._cache) >= GROUPS_CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (now + GROUPS_TTL, gs)
        return gs

    def in_group(self, caller, gid: int) -> bool:
        return caller.gid == gid or gid in self.groups(caller)

    def privileged(self, caller) -> bool:
        return caller.uid == 0 or (self.admin_gid is not None and self.in_group(caller, self.admin_gid))

    def grants(self, caller, perm, want: int) -> bool:
        """Does ``perm`` = (mode, uid, gid, acl) grant ``want`` (R|W|X bits) to the caller,
        by its owner, ACL, group and other entries (privilege not considered)?"""
        mode, uid, gid, ext = perm
        if caller.uid == uid:
            return (mode >> 6) & want == want
        if ext:
            mask = (mode >> 3) & 7
            for t, p, i in ext:
                if t == USER and i == caller.uid:
                    return p & mask & want == want
            matched = False
            for t, p, i in ext:
                if t == GROUP_OBJ:
                    i = gid
                elif t != GROUP:
                    continue
                if self.in_group(caller, i):
                    if p & mask & want == want:
                        return True
                    matched = True
            if matched:
                return False
            return mode & 7 & want == want
        g, o = (mode >> 3) & want == want, mode & want == want
        if g == o:
            return g          # the answer does not depend on membership: no /proc read
        return g if self.in_group(caller, gid) else o

    def allowed(self, caller, perms, want: int) -> bool:
        """Every perm in ``perms`` grants ``want``, or the caller is privileged."""
        if caller.uid == 0:
            return True
        for p in perms:
            if not self.grants(caller, p, want):
                return self.privileged(caller)
        return True

    def owns(self, caller, uid: int) -> bool:
        return caller.uid == uid or self.privileged(caller)
