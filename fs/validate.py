"""Validation of state file content: one UTF-8 JSON document (RFC 8259), size cap."""

import errno
import gc
import json
from itertools import accumulate

from .errors import FsError

# Deepest nesting of arrays/objects accepted in a state file. RFC 8259 lets an
# implementation set a limit; deeper documents are refused with EINVAL (rather than
# exhausting the decoder's recursion and failing with EIO).
MAX_DEPTH = 512


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# Numbers are checked for syntax by the scanner but never converted: no big-int
# conversion (Python refuses ints over 4300 digits; RFC 8259 sets no limit) and faster.
_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_int=str, parse_float=str)

# Skeleton of a document: brackets and quotes; brackets become 1 (openers) and
# 0xff (closers, -1 as a signed byte).
_SKELETON = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_SKELETON = bytes(c for c in range(256) if c not in b'[{]}"')


def _too_deep(data: bytes) -> bool:
    """True when ``data`` nests arrays/objects deeper than MAX_DEPTH.

    A non-recursive scan at C speed (no per-byte Python loop): escaped backslashes
    and escaped quotes are dropped, so every quote left delimits a string; every
    byte but brackets and quotes is dropped; the parts between quotes (string
    contents) are dropped; the deepest running bracket count is the depth.
    For invalid JSON the answer is a best effort; the decoder then reports the error.
    """
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return False  # fast path: not enough openers, whatever is inside strings
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = data.translate(_SKELETON, _NOT_SKELETON)
    if b'"' in skeleton:
        # Two adjacent quotes can go (the parity of every bracket after them stays):
        # that drops strings without brackets. Of what is left, the even parts are
        # outside strings; an unterminated string is an odd last part.
        skeleton = skeleton.replace(b'""', b"")
        if b'"' in skeleton:
            skeleton = b"".join(skeleton.split(b'"')[::2])
    if skeleton.count(1) <= MAX_DEPTH:
        return False
    return max(accumulate(memoryview(skeleton).cast("b"))) > MAX_DEPTH


def check_json(data: bytes) -> None:
    """Raise EINVAL unless ``data`` is exactly one valid UTF-8 JSON document.

    Python's json module accepts NaN/Infinity and a leading BOM is not RFC 8259
    text; both are refused. Surrounding whitespace is allowed (RFC 8259 ``ws``).
    Arrays/objects nested deeper than MAX_DEPTH levels are refused. Numbers of any
    length are accepted.
    """
    if not data or data.isspace():
        raise FsError(errno.EINVAL, "empty file is not a JSON document")
    if data.startswith(b"\xef\xbb\xbf"):
        raise FsError(errno.EINVAL, "byte order mark is not allowed in JSON text")
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise FsError(errno.EINVAL, f"not UTF-8 at byte {exc.start}") from None
    if _too_deep(data):
        raise FsError(errno.EINVAL, f"JSON nested deeper than {MAX_DEPTH} levels")
    # The decoded document is thrown away and holds no cycles: collecting garbage while
    # it is built only slows big documents down (about 2x for many small containers).
    collecting = gc.isenabled()
    gc.disable()
    try:
        _decoder.decode(text)
    except RecursionError:  # defensive: the pre-scan should have refused it
        raise FsError(errno.EINVAL, f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise FsError(errno.EINVAL, f"invalid JSON: {exc}") from None
    finally:
        if collecting:
            gc.enable()


def check_size(size: int, limit: int) -> None:
    """Raise EFBIG when a state file would exceed its size cap."""
    if size > limit:
        raise FsError(errno.EFBIG, f"{size} bytes exceeds the state file cap of {limit} bytes")
