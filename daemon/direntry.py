"""Directory entries the kernel gets without a node (``ls`` of 100,000 agents).

pyfuse3 answers every readdir with readdirplus entries, and the kernel treats each one
as a lookup: it creates an inode for it and holds a reference the daemon must remember
until a FORGET. An entry whose node id is 0 is the exception (fs/fuse/readdir.c,
``fuse_direntplus_link``: "the userspace filesystem did not want to return
attributes/handle for this entry"): the kernel passes on its name, number and type and
keeps nothing, and a later ``stat`` of the name is an ordinary LOOKUP.

pyfuse3 3.5 sets the node id and ``st_ino`` together and offers no way to set one
alone, so :func:`nodeless_slot` gives a ctypes view of the node id field: the first
field of the ``fuse_entry_param`` an ``EntryAttributes`` holds right after its Python
object header. :func:`available` checks that layout once against known values; on a
pyfuse3 whose objects differ it answers False and listings register their entries as
before (decision 44).
"""

from __future__ import annotations

import ctypes

import pyfuse3

_OFFSET = object.__basicsize__          # PyObject_HEAD; fuse_entry_param.ino comes next
_checked: bool | None = None


def nodeless_slot(entry: pyfuse3.EntryAttributes) -> ctypes.c_uint64:
    """The node id of ``entry``: set ``.value = 0`` after each ``st_ino`` assignment
    (which sets both). The caller keeps ``entry`` alive as long as it uses the slot."""
    return ctypes.c_uint64.from_address(id(entry) + _OFFSET)


def _layout_ok() -> bool:
    e = pyfuse3.EntryAttributes()
    ino, gen = 0x5A17_0000_C0DE_0001, 0x0000_7E57_0000_0042
    e.st_ino, e.generation = ino, gen
    if type(e).__basicsize__ < _OFFSET + 5 * 8:
        return False
    words = (ctypes.c_uint64 * 5).from_address(id(e) + _OFFSET)
    # fuse_entry_param: ino, generation, then struct stat (st_dev, st_ino, ...)
    if words[0] != ino or words[1] != gen or words[3] != ino:
        return False
    nodeless_slot(e).value = 0
    return e.st_ino == 0 and words[3] == ino and e.generation == gen


def available() -> bool:
    """Whether this pyfuse3 lets a listing give entries without a node."""
    global _checked
    if _checked is None:
        try:
            _checked = _layout_ok()
        except Exception:
            _checked = False
    return _checked
