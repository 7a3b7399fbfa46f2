"""Validation of state file content: one UTF-8 JSON document (RFC 8259), size cap."""

import errno
import json

from .errors import FsError


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def check_json(data: bytes) -> None:
    """Raise EINVAL unless ``data`` is exactly one valid UTF-8 JSON document.

    Python's json module accepts NaN/Infinity and a leading BOM is not RFC 8259
    text; both are refused. Surrounding whitespace is allowed (RFC 8259 ``ws``).
    """
    if not data.strip():
        raise FsError(errno.EINVAL, "empty file is not a JSON document")
    if data.startswith(b"\xef\xbb\xbf"):
        raise FsError(errno.EINVAL, "byte order mark is not allowed in JSON text")
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise FsError(errno.EINVAL, f"not UTF-8 at byte {exc.start}") from None
    try:
        _decoder.decode(text)
    except ValueError as exc:
        raise FsError(errno.EINVAL, f"invalid JSON: {exc}") from None


def check_size(size: int, limit: int) -> None:
    """Raise EFBIG when a state file would exceed its size cap."""
    if size > limit:
        raise FsError(errno.EFBIG, f"{size} bytes exceeds the state file cap of {limit} bytes")
