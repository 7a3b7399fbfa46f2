"""Give freed heap memory back to the operating system.

The daemon's big transient structures (a walk of 65,536 fan-out trees, a listing of
100,000 agents at a past commit) are many small allocations. Freed, they stay in
glibc's heaps, so the daemon's RSS would keep its high-water mark for good;
``malloc_trim`` returns the free pages. Called after such work, never per request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

try:
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    _malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):     # not glibc: nothing to do
    _malloc_trim = None


def trim() -> None:
    """Release free heap memory of every arena (a few ms at most; it locks each arena
    while it works, so call it after big work, not on a hot path)."""
    if _malloc_trim is not None:
        try:
            _malloc_trim(0)
        except Exception as exc:   # never worth failing the caller
            log.debug("malloc_trim failed: %s", exc)
